"""Per-evaluation overhead of the lm-eval fitness (fitness.lmeval) against the native scorer, same task, same
candidates, same forward passes: the zoo's 200 J-math dev problems, scored teacher-forced ("reference<eos>"
reproduced by greedy decoding) by evomerge's TaskFitness (`teacher_exact`) and by lm-eval's evaluation core
over the shipped task runs/lmeval_tasks/math_j_dev.yaml (`acc`), both on one resident HF handle, candidates
written in place. Scorers alternate per candidate and round; medians over rounds x candidates. The first
lm-eval evaluation (requests built then) is reported apart. `forward_s` is the time inside the handle's
`score` (the model), so `outside_forward_s` is what each scorer adds around it.
Target: overhead = lm-eval / native - 1 <= 15% (`overhead_outside_forward` counts only the time outside the
model, steadier on a shared machine). Prints one JSON and writes it to benchmarks/results/.

    python benchmarks/lmeval_overhead.py [--rounds 3] [--batch-size 200] [--out F]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from evomerge.merge import Materializer  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402
from evomerge.fitness.hf import HFHandle  # noqa: E402
from evomerge.fitness.lmeval import LMEvalFitness  # noqa: E402
from evomerge.fitness.suite import TaskFitness  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "evomerge" / "zoo"
CANDIDATES = [
    {"merge_method": "ties", "base_model": "base", "models": [{"model": "math", "parameters": {"weight": 1.0, "density": 0.2}},
                                                               {"model": "lang", "parameters": {"weight": 1.0, "density": 0.2}}]},
    {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "math", "parameters": {"weight": 0.7}},
                                                                          {"model": "lang", "parameters": {"weight": 1.0}}]},
    {"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 1.0}}]},
]


class TimedScore:
    """The handle's `score`, with the seconds spent in it added up (the forward passes)."""

    def __init__(self, handle: HFHandle) -> None:
        self.inner, self.seconds = handle.score, 0.0
        handle.score = self  # type: ignore[method-assign]

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lmeval_overhead.json")
    args = ap.parse_args()

    sources = {k: str(ZOO / "models" / k) for k in ("base", "math", "lang")}
    handle = HFHandle(sources["base"], Materializer(sources, base="base"), batch_size=args.batch_size)
    timer = TimedScore(handle)
    native = TaskFitness.from_config([{"name": "math_j", "path": str(ZOO / "data" / "math_j_dev.jsonl"),
                                       "metrics": ["teacher_exact"]}])
    start = time.perf_counter()
    lmeval = LMEvalFitness(["zoo_math_j_dev"], include_path=ROOT / "runs" / "lmeval_tasks")
    build_s = time.perf_counter() - start

    recipes = [Recipe.from_dict(c) for c in CANDIDATES]
    handle.set_recipe(recipes[0])
    start = time.perf_counter()
    lmeval.evaluate(handle)  # requests built here, once per worker
    first_s = time.perf_counter() - start
    native.evaluate(handle)  # warm-up alike
    times: dict[str, list[float]] = {"native": [], "lm_eval": []}
    forward: dict[str, list[float]] = {"native": [], "lm_eval": []}
    values: dict[str, list[float]] = {"native": [], "lm_eval": []}
    for r in range(args.rounds):
        for i, recipe in enumerate(recipes):
            handle.set_recipe(recipe)
            order = [("native", native), ("lm_eval", lmeval)][:: 1 if (r + i) % 2 == 0 else -1]
            for name, fit in order:
                timer.seconds = 0.0
                start = time.perf_counter()
                result = fit.evaluate(handle)
                times[name].append(time.perf_counter() - start)
                forward[name].append(timer.seconds)
                values[name].append(next(iter(result.objectives.values())))
    med = {k: statistics.median(v) for k, v in times.items()}
    fwd = {k: statistics.median(v) for k, v in forward.items()}
    report = {
        "task": "zoo J-math dev, 200 problems, teacher-forced exact match",
        "candidates": len(recipes), "rounds": args.rounds, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "per_evaluation_s": med,
        "forward_s": fwd,
        "outside_forward_s": {k: med[k] - fwd[k] for k in med},
        "overhead": med["lm_eval"] / med["native"] - 1.0,
        # the same, counting only the time spent outside the model (steadier on a shared machine)
        "overhead_outside_forward": (med["lm_eval"] - fwd["lm_eval"] - med["native"] + fwd["native"]) / med["native"],
        "target_overhead": 0.15,
        "lm_eval_build_s": build_s,
        "lm_eval_first_evaluation_s": first_s,
        "scores": {k: v[: len(recipes)] for k, v in values.items()},  # one round: lm-eval's acc is the stricter
    }
    report["meets_target"] = report["overhead"] <= report["target_overhead"]
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
