"""Recipe push into a running vLLM engine at tensor-parallel sizes 1 and 2: each rank merges only the shard its
weight loaders keep (VLLMHandle learns it once per engine from the loaders), so a rank's bytes are 1/k of a
whole merge's at k ranks.

On a random Llama stored in bf16 with base + 2 experts (benchmarks/vllm_push.py's models and candidates: TIES,
DARE-TIES, task arithmetic in turn), one engine per size, ranks on their own cores. Per candidate: seconds of
`set_recipe` (median, after a warm-up push that also learns the shards) and the bytes of the sources' entries
each rank merged (Materializer.merged_bytes; trims' summaries, computed once per tensor and kept, not counted),
and all the bytes its merge kernels read (passes.traffic: DARE's rescale L1 pass included, which each rank makes
over its own share of a tensor, evomerge.merge.peers). Ratios TP 2 / TP 1 from the same run.
Prints one JSON and writes benchmarks/results/vllm_tp.json (or --out). Runs in the vLLM environment:

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_tp.py [--candidates 3] [--sizes 1 2]
        [--hidden 512 --layers 8 --intermediate 1408 --heads 8] [--models DIR] [--out F]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.vllm_push import build_models, candidate

ROOT = Path(__file__).resolve().parent.parent


def run_size(models: dict[str, str], tp: int, candidates: int) -> dict:
    """One engine of `tp` ranks: a warm-up push, then `candidates` timed pushes."""
    from evomerge.fitness.vllm_handle import VLLMHandle

    device = "cuda" if torch.cuda.is_available() else "cpu"
    handle = VLLMHandle(models["base"], models, base="base", dtype="bfloat16", max_model_len=256, block_size=32,
                        tensor_parallel_size=tp, **({"gpu_memory_utilization": 0.5} if device == "cuda" else {}))
    try:
        start = time.perf_counter()
        handle.set_recipe(candidate(0))  # learns each rank's shards, fills the trims' summaries
        first = time.perf_counter() - start
        seconds, merged = [], []
        for i in range(1, candidates + 1):
            before = handle.llm.collective_rpc("evomerge_merged_bytes")
            handle.set_recipe(candidate(i))
            seconds.append(handle.timings["swap"])
            after = handle.llm.collective_rpc("evomerge_merged_bytes")
            merged.append([(b[0] - a[0], b[1] - a[1]) for a, b in zip(before, after)])
        per_rank = statistics.median(max(m for m, _ in rows) for rows in merged)
        read = statistics.median(max(r for _, r in rows) for rows in merged)
        push = statistics.median(seconds)
        return {"ranks": tp, "device": device, "engine_start_seconds": round(handle.timings["engine_start"], 1),
                "first_push_seconds": round(first, 3), "push_seconds_median": round(push, 3),
                "merged_bytes_per_rank_per_candidate": int(per_rank),
                "kernel_bytes_read_per_rank_per_candidate": int(read),
                "merged_bytes_per_second_per_rank": round(per_rank / push)}
    finally:
        handle.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--candidates", type=int, default=3, help="timed candidates, after one warm-up")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes, the first the baseline")
    ap.add_argument("--models", help="keep the random checkpoints here (reused on the next run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_tp.json"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    root = Path(args.models or tempfile.mkdtemp(prefix="evomerge-vllm-tp-"))
    models = build_models(root, args)
    from evomerge.merge import Materializer

    reader = Materializer({"base": models["base"]}, prefault=False)
    params = sum(math.prod(reader.sources["base"].shape(n)) for n in reader.names)
    sizes = [run_size(models, tp, args.candidates) for tp in args.sizes]
    base = sizes[0]
    for s in sizes:
        s["bytes_over_baseline"] = round(s["merged_bytes_per_rank_per_candidate"] / base["merged_bytes_per_rank_per_candidate"], 4)
        s["kernel_bytes_over_baseline"] = round(s["kernel_bytes_read_per_rank_per_candidate"] / base["kernel_bytes_read_per_rank_per_candidate"], 4)
        s["push_seconds_over_baseline"] = round(s["push_seconds_median"] / base["push_seconds_median"], 3)
    result = {"model": {"parameters": params, "stored_dtype": "bfloat16", "hidden": args.hidden, "layers": args.layers,
                        "heads": args.heads, "intermediate": args.intermediate, "sources": 3},
              "cpus": len(os.sched_getaffinity(0)), "candidates": args.candidates, "sizes": sizes}
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
