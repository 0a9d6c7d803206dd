"""The data-aware merges (fisher, regmean, regmean_plus) on the real-model test bed (issue 28): SmolLM2-135M's MATH and FR experts
merged from calibration statistics, with the time to compute those statistics and the held-out scores.

Calibration set: the first N examples of each expert's dev file (MATH, FR; never a test example), each as its chat
turn (prompt, answer, end of turn). Statistics are computed into a fresh EVOMERGE_CACHE (timed per model; regmean_plus's,
which depend on both experts, inside its merge's time), the merges run through `evomerge merge` (bfloat16, as the test bed's checkpoints), and each merged model is scored
by teacher-forced exact match on the test files (MATH, FR, MATH_FR), as the real zoo's card scores the experts.

    python benchmarks/data_aware_real.py [--zoo /work/realzoo] [--per-task 32] [--limit 200] [--out FILE]
Prints JSON (and writes it to --out, default benchmarks/results/data_aware_real.json).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TESTS = ["math_test", "fr_test", "math_fr_test"]
METHODS = {"fisher": {"parameters": {}, "weights": {"math": 1.0, "fr": 1.0}}, "regmean": {"parameters": {"alpha": 0.9}, "weights": None},
           "regmean_plus": {"parameters": {"alpha": 0.9}, "weights": None}}


def calibration_set(zoo: Path, per_task: int, out: Path) -> Path:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(zoo / "models" / "base")
    rows = []
    for task in ("math_dev", "fr_dev"):
        for line in (zoo / "data" / f"{task}.jsonl").read_text().splitlines()[:per_task]:
            ex = json.loads(line)
            chat = [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["reference"]}]
            rows.append(json.dumps({"text": tok.apply_chat_template(chat, tokenize=False)}))
    out.write_text("\n".join(rows) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="/work/realzoo")
    ap.add_argument("--per-task", type=int, default=32)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/data_aware_real.json")
    args = ap.parse_args()
    import torch

    from evomerge.merge import calibration
    from evomerge.zoo.real import scores

    zoo = Path(args.zoo)
    work = Path(tempfile.mkdtemp(prefix="data-aware-"))
    os.environ["EVOMERGE_CACHE"] = str(work / "cache")
    calib = calibration_set(zoo, args.per_task, work / "calib.jsonl")
    seconds, sizes = {}, {}
    for m in ("math", "fr"):
        t0 = time.perf_counter()
        calibration.statistics(str(zoo / "models" / m), str(calib))
        seconds[m] = round(time.perf_counter() - t0, 1)
        sizes[m] = calibration.statistics_path(zoo / "models" / m, calib).stat().st_size
    report = {"calibration_examples": 2 * args.per_task, "torch_threads": torch.get_num_threads(), "statistics_seconds": seconds,
              "statistics_bytes": sizes, "scored_examples": args.limit, "scores": {}, "merge_seconds": {}}
    for method, spec in METHODS.items():
        models = [{"model": str(zoo / "models" / m), **({"parameters": {"weight": spec["weights"][m]}} if spec["weights"] else {})}
                  for m in ("math", "fr")]
        cfg = {"merge_method": method, "dtype": "bfloat16", "parameters": {"calibration": str(calib), **spec["parameters"]}, "models": models}
        (work / f"{method}.yaml").write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(work / f"{method}.yaml"), "-o", str(work / method)], check=True)
        report["merge_seconds"][method] = round(time.perf_counter() - t0, 1)
        report["scores"][method] = scores(work / method, zoo / "data", TESTS, args.limit)
    text = json.dumps(report, indent=1)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
