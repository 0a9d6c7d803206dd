"""Scoring speed, HF transformers and vLLM on CPU: per candidate, the time to swap its weights into the
resident model (HF: written into the parameters in place; vLLM: pushed into the running engine) vs the
time to score it, and the same candidate scored the naive way, merged into a new checkpoint on disk then
a fresh model on it (HF: `from_pretrained`; vLLM: a new engine), with two merge steps:
- naive_evomerge: `evomerge merge`'s writer;
- naive_mergekit: mergekit's `run_merge` of the recipe's mergekit config, mergekit-evolve's on-disk loop
  (where mergekit is installed). Its masks for DARE / DELLA differ from evomerge's, so with those methods
  this row merges the TIES form of the candidate, compared with that recipe in place: scores and weights.

Two scorers: greedy generation + exact match (the fitness a search runs: the main row) and teacher-forced
exact match (one forward pass, the cheapest scorer, so the hardest case for swap / score).
The vLLM half runs in .venv-vllm (scripts/setup-vllm), as a subprocess of this script; without that
environment its rows are skipped with a note. Models: the zoo (`--zoo`, default evomerge/zoo) or, with
`--random`, a random Llama built here with two "experts" (base + random deltas).
Prints one JSON; targets: swap <= 5% of scoring, in-place >= 3x faster than the naive loop.

    python benchmarks/scoring_speed.py [--zoo DIR | --random] [--examples 200] [--candidates 2] [--device cuda] [--out F]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from evomerge.merge import Materializer  # noqa: E402
from evomerge.merge.mergekit_yaml import to_mergekit  # noqa: E402
from evomerge.merge.writer import write_checkpoint  # noqa: E402
from evomerge.recipe import ModelRef, Recipe  # noqa: E402
from evomerge.fitness.suite import TaskFitness  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def models_and_data(args: argparse.Namespace, scratch: Path) -> tuple[dict[str, str], Path]:
    if not args.random:
        zoo = Path(args.zoo)
        return {n: str(zoo / "models" / n) for n in ("base", "math", "lang")}, zoo / "data" / "math_j_dev.jsonl"
    from evomerge.zoo.random_models import random_expert, random_llama
    from evomerge.zoo.tasks import eval_splits

    base = random_llama(scratch / "base", seed=0, hidden=args.hidden, layers=args.layers, heads=args.hidden // 32,
                        intermediate=4 * args.hidden)
    sources = {"base": str(base), "math": str(random_expert(base, scratch / "math", seed=1)),
               "lang": str(random_expert(base, scratch / "lang", seed=2))}
    data = scratch / "math_j_dev.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "reference": r}, ensure_ascii=False) + "\n"
                            for p, r in eval_splits()["math_j_dev"]), encoding="utf-8")
    return sources, data


def candidate(i: int, method: str) -> Recipe:
    """A candidate with per-layer weight gradients (and densities for the sparsifying methods)."""
    w = 0.3 + 0.1 * i
    dense = method in ("task_arithmetic", "linear")
    return Recipe(merge_method=method, base_model="base", seed=i, models=[
        ModelRef("math", {"weight": [w, 1.0 - w, w], **({} if dense else {"density": 0.6})}),
        ModelRef("lang", {"weight": [1.0 - w, w, 0.5], **({} if dense else {"density": 0.8})})])


RANDOM_MASKS = {"dare_ties", "dare_linear", "della", "della_linear"}  # mergekit's masks differ from evomerge's


def mergekit_merge(recipe: Recipe, sources: dict[str, str], out: Path) -> Path:
    """mergekit-evolve's merge step: mergekit's own `run_merge` of the recipe's mergekit config, to disk."""
    import logging

    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    logging.getLogger("mergekit").setLevel(logging.ERROR)
    config = MergeConfiguration.model_validate(yaml.safe_load(to_mergekit(recipe, sources)))
    run_merge(config, str(out), MergeOptions(quiet=True))
    return out


def synchronize(device: str) -> None:
    """A GPU swap is queued, not done, when set_recipe returns: wait for it before reading the clock."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(backend: str, sources: dict[str, str], data: Path, args: argparse.Namespace, scratch: Path) -> dict:
    """One backend's medians over the candidates: in-place swap + score, and two naive loops (merge to
    disk, fresh model, score): with evomerge's writer and with mergekit (mergekit-evolve's loop)."""
    m = _Measure(backend, sources, data, args, scratch)
    try:
        for i in range(args.candidates):
            m.candidate(i)
        return m.summary()
    finally:
        m.close(m.handle)


class _Measure:
    """The resident handle (warmed up), the scorers, and the timings gathered per candidate."""

    def __init__(self, backend: str, sources: dict[str, str], data: Path, args: argparse.Namespace, scratch: Path):
        self.backend, self.sources, self.args, self.scratch = backend, sources, args, scratch
        task = {"name": "math_j", "path": str(data), "limit": args.examples, "max_new_tokens": args.max_new_tokens}
        self.scorers = {
            "generation": TaskFitness.from_config([{**task, "metrics": ["exact_match"]}]),
            "teacher_forced": TaskFitness.from_config([{**task, "metrics": ["teacher_exact"]}]),
        }
        self.device = args.device if backend == "hf" else "cpu"  # vLLM places its own weights
        # mergekit's DARE / DELLA masks differ from evomerge's: its row uses TIES so the merged weights match
        self.mk_method = (None if importlib.util.find_spec("mergekit") is None
                          else "ties" if args.method in RANDOM_MASKS else args.method)
        self.rows: dict[str, dict[str, list[float]]] = {k: {} for k in self.scorers}
        self.disk: dict[str, list[float]] = {}
        self.agree: dict[str, bool] = {}
        self.weight_diff: dict[str, float] = {}
        self.handle = self.fresh(sources["base"], merging=True)
        self.handle.set_recipe(candidate(99, args.method))  # warm-up: one-time statistics, allocator, kernels
        for fit in self.scorers.values():
            fit.evaluate(self.handle)
        # and the naive loops' one-time imports
        shutil.rmtree(write_checkpoint(candidate(99, args.method), sources, scratch / f"{backend}-warm"))
        if self.mk_method:
            self.handle.set_recipe(candidate(99, self.mk_method))
            shutil.rmtree(mergekit_merge(candidate(99, self.mk_method), sources, scratch / f"{backend}-warm-mk"))

    def fresh(self, model_dir, merging: bool = False):
        if self.backend == "hf":
            from evomerge.fitness.hf import HFHandle

            mat = Materializer(self.sources, base="base", device=self.device) if merging else None
            return HFHandle(model_dir, mat, batch_size=self.args.batch_size, device=self.device)
        from evomerge.fitness.vllm_handle import VLLMHandle  # the vLLM workers open the sources themselves

        return VLLMHandle(model_dir, self.sources if merging else None, base="base")

    def close(self, h) -> None:
        if self.backend == "vllm":
            h.close()

    def scored(self, h) -> tuple[dict, dict[str, float]]:
        results, secs = {}, {}
        for name, fit in self.scorers.items():
            t = time.perf_counter()
            results[name] = fit.evaluate(h)
            secs[name] = time.perf_counter() - t
        return results, secs

    def same(self, a: dict, b: dict) -> bool:
        return all(a[k].objectives == b[k].objectives and a[k].per_example == b[k].per_example for k in self.scorers)

    def naive(self, write, recipe: Recipe, out: Path, in_place: dict) -> tuple[float, float, dict[str, float], bool, float | None]:
        """merge to disk, a fresh model on it, score: (write s, load s, score s per scorer, same scores as
        in place, max |weight difference| to the resident model (HF))."""
        t = time.perf_counter()
        ckpt = write(recipe, self.sources, out)
        written = time.perf_counter() - t
        t = time.perf_counter()
        other = self.fresh(ckpt)
        loaded = time.perf_counter() - t
        results, secs = self.scored(other)
        diff = None
        if self.backend == "hf":
            own = self.handle.model.state_dict()
            diff = max((v - own[k]).abs().max().item() for k, v in other.model.state_dict().items())
        self.close(other)
        del other
        shutil.rmtree(ckpt)
        return written, loaded, secs, self.same(results, in_place), diff

    def add(self, row: str, secs: dict[str, float], extra: float = 0.0) -> None:
        for k, v in secs.items():
            self.rows[k].setdefault(row, []).append(extra + v)

    def note(self, row: str, written: float, loaded: float, secs: dict[str, float], ok: bool, diff: float | None) -> None:
        self.disk.setdefault(f"{row}_write", []).append(written)
        self.disk.setdefault(f"{row}_load", []).append(loaded)
        self.add(f"{row}_score", secs)
        self.add(row, secs, written + loaded)
        self.agree[row] = self.agree.get(row, True) and ok
        if diff is not None:
            self.weight_diff[row] = max(self.weight_diff.get(row, 0.0), diff)

    def candidate(self, i: int) -> None:
        """Candidate i in place, then through both naive loops."""
        recipe = candidate(i, self.args.method)
        swap, secs, results = {}, {}, {}
        for name, fit in self.scorers.items():
            t = time.perf_counter()
            self.handle.set_recipe(recipe)
            synchronize(self.device)
            swap[name] = time.perf_counter() - t
            t = time.perf_counter()
            results[name] = fit.evaluate(self.handle)
            secs[name] = time.perf_counter() - t
        self.add("swap", swap)
        self.add("score", secs)
        self.note("naive_evomerge", *self.naive(write_checkpoint, recipe, self.scratch / f"{self.backend}-cand-{i}", results))
        if self.mk_method:
            mk_recipe = candidate(i, self.mk_method)
            if self.mk_method != self.args.method:  # the in-place time and scores of the recipe mergekit merges
                t = time.perf_counter()
                self.handle.set_recipe(mk_recipe)
                synchronize(self.device)
                swapped = time.perf_counter() - t
                results, secs = self.scored(self.handle)
                self.add("in_place_mergekit_method", secs, swapped)
            self.note("naive_mergekit", *self.naive(mergekit_merge, mk_recipe, self.scratch / f"{self.backend}-mk-{i}", results))

    def summary(self) -> dict:
        args, mk_method = self.args, self.mk_method
        med = {k: {m: round(statistics.median(v), 4) for m, v in r.items()} for k, r in self.rows.items()}
        in_place_mk = "in_place_mergekit_method" if mk_method != args.method else None
        out = {
            "methods": {"in_place": args.method, "naive_evomerge": args.method,
                        "naive_mergekit": mk_method or "skipped: mergekit is not installed in this environment"},
            "same_scores_in_place_and_naive": self.agree,
            "max_abs_weight_diff_naive_vs_in_place": {k: float(v) for k, v in self.weight_diff.items()},
            "seconds_median": med,
            "naive_disk_seconds_median": {k: round(statistics.median(v), 4) for k, v in self.disk.items()},
            "swap_over_score": {k: round(m["swap"] / m["score"], 4) for k, m in med.items()},
            "naive_evomerge_over_in_place": {k: round(m["naive_evomerge"] / (m["swap"] + m["score"]), 2) for k, m in med.items()},
        }
        if mk_method:
            out["naive_mergekit_over_in_place"] = {
                k: round(m["naive_mergekit"] / (m[in_place_mk] if in_place_mk else m["swap"] + m["score"]), 2)
                for k, m in med.items()}
        if self.backend == "hf":
            out["batch_size"] = args.batch_size
            out["parameters"] = sum(p.numel() for p in self.handle.model.parameters())
        else:
            out["engine_start_seconds"] = round(self.handle.timings["engine_start"], 2)
            out["open_sources_seconds"] = round(self.handle.timings["open_sources"], 2)
        return out


def run_vllm(args: argparse.Namespace) -> dict:
    """The vLLM half in its own environment; a note instead when that environment is missing."""
    python = Path(args.vllm_python)
    if not python.is_file():
        return {"skipped": f"no vLLM environment at {python}: build it with scripts/setup-vllm"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(python), __file__, "--backend", "vllm", "--out", f"{tmp}/vllm.json", "--zoo", args.zoo,
               "--examples", str(args.examples), "--candidates", str(args.candidates), "--method", args.method,
               "--max-new-tokens", str(args.max_new_tokens), "--hidden", str(args.hidden), "--layers", str(args.layers)]
        if args.random:
            cmd.append("--random")
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise SystemExit(f"the vLLM half failed (exit {done.returncode}): {tail}")
        return json.loads(Path(f"{tmp}/vllm.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", default=str(ROOT / "evomerge" / "zoo"), help="a zoo directory (models/, data/)")
    ap.add_argument("--random", action="store_true", help="a random Llama built here instead of the zoo")
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=50, help="HF batch size (vLLM schedules its own)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256, help="with --random")
    ap.add_argument("--layers", type=int, default=8, help="with --random")
    ap.add_argument("--method", default="dare_ties", help="merge method of the candidates (dare_ties, ties, task_arithmetic, ...)")
    ap.add_argument("--backend", choices=("both", "hf", "vllm"), default="both")
    ap.add_argument("--device", default="cpu", help="the HF half's device (cuda on a GPU machine; vLLM picks its own)")
    ap.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="the python of the vLLM environment")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="scoring-speed-"))
    try:
        sources, data = models_and_data(args, scratch)
        if args.backend != "both":  # one half (the vLLM one is this script run in .venv-vllm)
            out = measure(args.backend, sources, data, args, scratch)
        else:
            out = {
                "benchmark": "scoring_speed", "device": args.device, "threads": torch.get_num_threads(),
                "models": f"zoo ({args.zoo})" if not args.random else f"random llama hidden={args.hidden} layers={args.layers}",
                "examples": args.examples, "candidates": args.candidates, "max_new_tokens": args.max_new_tokens,
                "method": args.method, "main_scorer": "generation",
                "naive_loops": {
                    "naive_evomerge": "per candidate: merge from the source checkpoints to disk (evomerge merge's "
                                      "writer), a fresh model on it (HF from_pretrained / a new vLLM engine), score",
                    "naive_mergekit": "the same with mergekit's run_merge as the merge step (mergekit-evolve's loop); "
                                      "TIES when --method has random masks (DARE / DELLA)"},
                "targets": {"swap_over_score_max": 0.05, "naive_over_in_place_min": 3.0},
                "hf": measure("hf", sources, data, args, scratch),
                "vllm": run_vllm(args),
            }
        text = json.dumps(out, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
        if args.backend == "both" or not args.out:
            print(text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
