"""Scale run: a search through `evomerge run` on a real-size checkpoint, as a user runs it, and its memory.

The ≈1B bf16 Llama of benchmarks/scale_models.py with base + 3 experts, TIES per layer (layer_weights space),
HF scorer on CPU, a few evaluations of a tiny task file (zoo math prompts; the random model scores 0, the point
is the cost). Measures the peak memory of the run's whole process tree, sampled from /proc/PID/smaps_rollup:
Pss (each shared page split among the processes mapping it: the tree's real footprint), its private (anonymous)
and file-backed parts, and Rss summed (what `ps` adds up); and each evaluation's timings from the run's journal.
When `evomerge run` has `--dry-run`, its output (the predicted plan) is recorded beside the measurement, with the
ratio of its "predicted peak RSS" to the measured peak: the tree's Pss, the memory it occupies (the pages a
process maps twice count once: while the scorer's loader maps the base checkpoint, the materializer maps the same
file), and the summed Rss, which counts them twice. `--checkout DIR` measures the
`evomerge run` of another checkout of the project (e.g. a branch's worktree) on the same models.

    python benchmarks/scale_run.py [--size 1b] [--evaluations 4] [--checkout DIR] [--out benchmarks/results/scale_run_1b.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's evomerge

from benchmarks import memstat, scale_models  # noqa: E402
from benchmarks.scale import warm_page_cache  # noqa: E402

TASKS = ROOT / "evomerge" / "zoo" / "data" / "math_j_dev.jsonl"


def run_config(sources: dict[str, str], tasks: Path, args) -> dict:
    return {
        "sources": sources, "base": "base",
        "space": {"name": "layer_weights", "options": {"method": "ties", "granularity": 1}},
        "optimizer": {"name": "cmaes", "options": {"sigma0": 0.2}},
        "fitness": {"backend": "hf", "handle": {"batch_size": args.examples},
                    "tasks": [{"name": "math_j", "path": str(tasks), "metrics": ["teacher_exact"]}]},
        "budget": {"evaluations": args.evaluations}, "executor": {"kind": "local"}, "seed": 0,
    }


def evomerge(*argv: str) -> list[str]:
    """`evomerge` of the checkout it runs in (`-m` from its root: the cwd comes first on sys.path)."""
    return [sys.executable, "-m", "evomerge.cli", *argv]


def dry_run(config: Path, checkout: Path, env: dict) -> dict:
    helped = subprocess.run(evomerge("run", "--help"), capture_output=True, text=True, cwd=checkout, env=env, timeout=120)
    if "--dry-run" not in helped.stdout:
        return {"available": False}
    done = subprocess.run(evomerge("run", "--dry-run", str(config)), capture_output=True, text=True, cwd=checkout,
                          env=env, timeout=600)
    out = {"available": True, "exit": done.returncode, "stdout": done.stdout, "stderr_tail": done.stderr[-2000:]}
    peak = re.search(r"predicted peak RSS ([\d.]+) ([KMG])iB", done.stdout)
    if peak:
        out["predicted_peak_rss_bytes"] = int(float(peak[1]) * 1024 ** " KMG".index(peak[2]))
    return out


def journal_timings(run_dir: Path) -> list[dict]:
    db = next(run_dir.rglob("*.sqlite"), None) or next(run_dir.rglob("*.db"), None)
    if db is None:
        return []
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT seq, status, timings FROM evaluations ORDER BY seq").fetchall()
    return [{"seq": s, "status": st, **json.loads(t)} for s, st, t in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1b", choices=scale_models.SIZES)
    ap.add_argument("--cache", default="/tmp/evomerge-scale")
    ap.add_argument("--evaluations", type=int, default=4)
    ap.add_argument("--examples", type=int, default=8, help="task examples per evaluation")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads of the run")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--checkout", type=Path, default=ROOT, help="the project checkout whose `evomerge run` is measured")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    sources = scale_models.checkpoints(args.size, args.cache)
    scratch = Path(tempfile.mkdtemp(prefix="scale-run-"))
    try:
        tasks = scratch / "tasks.jsonl"
        with open(TASKS, encoding="utf-8") as f:
            tasks.write_text("".join(itertools.islice(f, args.examples)), encoding="utf-8")
        config = scratch / "run.yaml"
        config.write_text(yaml.safe_dump(run_config(sources, tasks, args), sort_keys=False))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        report: dict = {"benchmark": "scale_run", "machine": memstat.machine(), "versions": memstat.versions(args.checkout),
                        "size": args.size, "parameters": scale_models.parameters(args.size),
                        "experts": len(scale_models.EXPERTS), "stored_dtype": "bfloat16",
                        "config": run_config(sources, Path("tasks.jsonl"), args),
                        "dry_run": dry_run(config, args.checkout, env)}
        warm_page_cache(sources)
        start = time.perf_counter()
        proc = subprocess.Popen(evomerge("run", str(config), "--run-dir", str(scratch / "run"), "--quiet"), cwd=args.checkout,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with memstat.TreePeak(proc.pid) as peak:
            try:
                output, _ = proc.communicate(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
        params = report["parameters"]
        report |= {
            "exit": proc.returncode, "wall_s": time.perf_counter() - start, "output_tail": output[-3000:],
            "peak_tree_bytes": peak.peak, "peak_tree_processes": peak.processes,
            "peak_tree_bytes_per_parameter": {k: round(v / params, 3) for k, v in peak.peak.items()},
            "max_rss_of_one_process_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            "evaluations": journal_timings(scratch / "run"),
        }
        if "predicted_peak_rss_bytes" in report["dry_run"]:
            predicted = report["dry_run"]["predicted_peak_rss_bytes"]
            report["predicted_over_measured_peak_pss"] = predicted / peak.peak["Pss"]
            report["predicted_over_measured_peak_rss"] = predicted / peak.peak["Rss"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    memstat.emit(report, args.out)


if __name__ == "__main__":
    main()
