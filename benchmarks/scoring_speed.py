"""Scoring speed (HF transformers on CPU): for each candidate, the time to swap its weights into the
resident model in place vs the time to score it, and the same candidate scored the naive way: merged
checkpoint written to disk and a fresh model loaded from it (what mergekit-evolve's default loop does).

Two scorers are timed: greedy generation + exact match (the usual fitness) and teacher-forced exact
match (one forward pass; the cheapest scorer, so the hardest case for the swap-to-score ratio).
Models: the zoo (`--zoo DIR`, after `evomerge zoo build DIR`) or a random Llama built here with two
"experts" (base + random deltas). Prints JSON; targets: swap <= 5% of scoring, in-place >= 3x reload.

    python benchmarks/scoring_speed.py [--zoo DIR] [--examples 200] [--candidates 3] [--method dare_ties]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from evomerge.merge import Materializer  # noqa: E402
from evomerge.recipe import ModelRef, Recipe  # noqa: E402
from fitness.hf import HFHandle  # noqa: E402
from fitness.suite import TaskFitness  # noqa: E402


def models_and_data(args: argparse.Namespace, scratch: Path) -> tuple[dict[str, str], Path]:
    if args.zoo:
        zoo = Path(args.zoo)
        sources = {n: str(zoo / "models" / n) for n in ("base", "math", "lang")}
        return sources, zoo / "data" / "math_j_dev.jsonl"
    from evomerge.zoo.random_models import random_expert, random_llama
    from evomerge.zoo.tasks import eval_splits

    base = random_llama(scratch / "base", seed=0, hidden=args.hidden, layers=args.layers, heads=4,
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


def write_checkpoint(weights: dict[str, torch.Tensor], like: str, out: Path) -> Path:
    """The least a naive loop must write: the merged tensors, plus the base's config and tokenizer."""
    from safetensors.torch import save_file

    shutil.copytree(like, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", help="a built zoo directory (default: random Llama built here)")
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--method", default="dare_ties", help="merge method of the candidates (dare_ties, ties, task_arithmetic, ...)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="scoring-speed-"))
    try:
        sources, data = models_and_data(args, scratch)
        task = {"name": "math_j", "path": str(data), "limit": args.examples, "max_new_tokens": args.max_new_tokens}
        scorers = {
            "generation": TaskFitness.from_config([{**task, "metrics": ["exact_match"]}]),
            "teacher_forced": TaskFitness.from_config([{**task, "metrics": ["teacher_exact"]}]),
        }
        materializer = Materializer(sources, base="base")
        handle = HFHandle(sources["base"], materializer, batch_size=args.batch_size)
        handle.set_recipe(candidate(99, args.method))  # warm-up: one-time statistics, allocator, kernels
        for fit in scorers.values():
            fit.evaluate(handle)

        rows: dict[str, dict[str, list[float]]] = {k: {"swap": [], "score": [], "reload": [], "reload_score": []} for k in scorers}
        agree = True
        for i in range(args.candidates):
            recipe = candidate(i, args.method)
            for name, fit in scorers.items():
                t = time.perf_counter()
                handle.set_recipe(recipe)
                t_swap = time.perf_counter() - t
                t = time.perf_counter()
                in_place = fit.evaluate(handle)
                rows[name]["swap"].append(t_swap)
                rows[name]["score"].append(time.perf_counter() - t)

                # naive: merged checkpoint to disk, fresh model from disk, score
                t = time.perf_counter()
                ckpt = write_checkpoint(materializer.materialize(recipe), sources["base"], scratch / f"cand-{name}-{i}")
                reloaded = HFHandle(ckpt, batch_size=args.batch_size)
                t_load = time.perf_counter() - t
                t = time.perf_counter()
                naive = fit.evaluate(reloaded)
                rows[name]["reload"].append(t_load + time.perf_counter() - t)
                rows[name]["reload_score"].append(time.perf_counter() - t)
                agree &= naive.objectives == in_place.objectives and naive.per_example == in_place.per_example
                shutil.rmtree(ckpt)

        med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in rows.items()}
        out = {
            "benchmark": "scoring_speed", "backend": "hf", "device": "cpu", "threads": torch.get_num_threads(),
            "models": "zoo" if args.zoo else f"random llama hidden={args.hidden} layers={args.layers}",
            "parameters": sum(p.numel() for p in handle.model.parameters()),
            "examples": len(scorers["generation"].tasks[0].examples), "candidates": args.candidates,
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "method": args.method,
            "same_scores_in_place_and_reloaded": agree,
            "seconds_median": med,
            "swap_over_score": {k: round(m["swap"] / m["score"], 4) for k, m in med.items()},
            "reload_over_in_place": {k: round(m["reload"] / (m["swap"] + m["score"]), 2) for k, m in med.items()},
            "targets": {"swap_over_score_max": 0.05, "reload_over_in_place_min": 3.0},
        }
        text = json.dumps(out, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
