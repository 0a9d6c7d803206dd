"""Scoring speed, HF transformers and vLLM on CPU: per candidate, the time to swap its weights into the
resident model (HF: written into the parameters in place; vLLM: pushed into the running engine) vs the
time to score it, and the same candidate scored the naive way, as mergekit-evolve's on-disk loop does:
merge from the source checkpoints into a new checkpoint on disk (`evomerge merge`'s writer, the
equivalent of mergekit-yaml), then a fresh model on it (HF: `from_pretrained`; vLLM: a new engine).

Two scorers: greedy generation + exact match (the fitness a search runs: the main row) and teacher-forced
exact match (one forward pass, the cheapest scorer, so the hardest case for swap / score).
The vLLM half runs in .venv-vllm (scripts/setup-vllm), as a subprocess of this script; without that
environment its rows are skipped with a note. Models: the zoo (`--zoo`, default evomerge/zoo) or, with
`--random`, a random Llama built here with two "experts" (base + random deltas).
Prints one JSON; targets: swap <= 5% of scoring, in-place >= 3x faster than the naive loop.

    python benchmarks/scoring_speed.py [--zoo DIR | --random] [--examples 200] [--candidates 2] [--out F]
"""
from __future__ import annotations

import argparse
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
from evomerge.merge.writer import write_checkpoint  # noqa: E402
from evomerge.recipe import ModelRef, Recipe  # noqa: E402
from fitness.suite import TaskFitness  # noqa: E402

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


def measure(backend: str, sources: dict[str, str], data: Path, args: argparse.Namespace, scratch: Path) -> dict:
    """One backend's medians over the candidates: swap, score, and the naive load + score."""
    task = {"name": "math_j", "path": str(data), "limit": args.examples, "max_new_tokens": args.max_new_tokens}
    scorers = {
        "generation": TaskFitness.from_config([{**task, "metrics": ["exact_match"]}]),
        "teacher_forced": TaskFitness.from_config([{**task, "metrics": ["teacher_exact"]}]),
    }
    materializer = Materializer(sources, base="base")
    if backend == "hf":
        from fitness.hf import HFHandle

        def fresh(model_dir, mat=None):
            return HFHandle(model_dir, mat, batch_size=args.batch_size)
    else:
        from fitness.vllm_handle import VLLMHandle

        def fresh(model_dir, mat=None):
            return VLLMHandle(model_dir, mat)
    handle = fresh(sources["base"], materializer)
    handle.set_recipe(candidate(99, args.method))  # warm-up: one-time statistics, allocator, kernels
    for fit in scorers.values():
        fit.evaluate(handle)

    rows: dict[str, dict[str, list[float]]] = {k: {"swap": [], "score": [], "naive": [], "naive_score": []} for k in scorers}
    naive_load: list[float] = []
    agree = True
    for i in range(args.candidates):
        recipe = candidate(i, args.method)
        results = {}
        for name, fit in scorers.items():
            t = time.perf_counter()
            handle.set_recipe(recipe)
            rows[name]["swap"].append(time.perf_counter() - t)
            t = time.perf_counter()
            results[name] = fit.evaluate(handle)
            rows[name]["score"].append(time.perf_counter() - t)

        # naive: merged checkpoint from the sources on disk, a fresh model on it, score
        t = time.perf_counter()
        ckpt = write_checkpoint(recipe, sources, scratch / f"{backend}-cand-{i}")
        other = fresh(ckpt)
        naive_load.append(time.perf_counter() - t)
        for name, fit in scorers.items():
            t = time.perf_counter()
            naive = fit.evaluate(other)
            rows[name]["naive_score"].append(time.perf_counter() - t)
            rows[name]["naive"].append(naive_load[-1] + rows[name]["naive_score"][-1])
            agree &= naive.objectives == results[name].objectives and naive.per_example == results[name].per_example
        if backend == "vllm":
            other.close()
        del other
        shutil.rmtree(ckpt)

    med = {k: {m: round(statistics.median(v), 4) for m, v in r.items()} for k, r in rows.items()}
    out = {
        "same_scores_in_place_and_naive": agree,
        "seconds_median": med,
        "naive_load_seconds_median": round(statistics.median(naive_load), 4),
        "swap_over_score": {k: round(m["swap"] / m["score"], 4) for k, m in med.items()},
        "naive_over_in_place": {k: round(m["naive"] / (m["swap"] + m["score"]), 2) for k, m in med.items()},
    }
    if backend == "hf":
        out["batch_size"] = args.batch_size
        out["parameters"] = sum(p.numel() for p in handle.model.parameters())
    else:
        out["engine_start_seconds"] = round(handle.timings["engine_start"], 2)
        out["last_swap_seconds"] = {k: round(handle.timings[k], 4) for k in ("materialize", "push")}
        handle.close()
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
                "benchmark": "scoring_speed", "device": "cpu", "threads": torch.get_num_threads(),
                "models": f"zoo ({args.zoo})" if not args.random else f"random llama hidden={args.hidden} layers={args.layers}",
                "examples": args.examples, "candidates": args.candidates, "max_new_tokens": args.max_new_tokens,
                "method": args.method, "main_scorer": "generation",
                "naive_loop": "per candidate: merge from the source checkpoints to disk (evomerge merge's writer), "
                              "a fresh model on it (HF from_pretrained / a new vLLM engine), score",
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
