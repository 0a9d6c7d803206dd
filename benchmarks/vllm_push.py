"""Weight swap in a running vLLM engine, per candidate: recipe push vs bytes push vs engine restart.

On a random Llama stored in bf16 (~0.2B parameters by default) with base + 2 experts, three ways to make
one running vLLM engine answer as a new candidate merge:
- recipe_push: what `VLLMHandle.set_recipe` does: only the recipe (a small dict) crosses the process
  boundary; the vLLM worker merges it from its own memory-mapped sources straight into its weights;
- bytes_push: the previous design, rebuilt here as the baseline: the whole merged model is materialized
  in the driver, serialized to safetensors bytes and sent through `collective_rpc` to every worker rank
  (each rank receives the full model), which loads it through the same reload path;
- engine_restart: the merge written to disk (`evomerge merge`'s writer) and a fresh engine started on it.
Per candidate: seconds (medians), bytes crossing the process boundary, and whether greedy outputs agree
across the three. Also: the first push of each kind (one-time warm-up), engine start, and the vLLM
worker's resident memory, private (anonymous) and file-backed (page cache), with its peak during each
kind of push.
Prints one JSON and writes it to benchmarks/results/vllm_push.json (or --out).

Runs in the vLLM environment (scripts/setup-vllm):

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python benchmarks/vllm_push.py [--candidates 3] [--restarts 1]
        [--hidden 1024 --layers 16 --intermediate 2816 --heads 16] [--models DIR] [--out F]
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
from types import SimpleNamespace

# The baseline sends a function to the workers (`collective_rpc` with a callable), which vLLM pickles only
# when this is set; it must be set before the engine (and its processes) start.
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

from evomerge.merge.writer import write_checkpoint  # noqa: E402
from evomerge.recipe import ModelRef, Recipe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.",
    "In 1969 the first humans walked on the Moon; decades later robots explore the surface of Mars.",
    "def add(a, b): return a + b  # a tiny function that adds two numbers and returns the result",
]
CHUNK_BYTES = 1 << 30  # the baseline's chunks: below msgpack's 4 GiB limit for one binary value


def build_models(root: Path, args: argparse.Namespace) -> dict[str, str]:
    """base + 2 experts, bf16 safetensors with the zoo's character tokenizer; reused when already there."""
    from evomerge.zoo.random_models import random_expert, random_llama
    from evomerge.zoo.tokenizer import char_tokenizer

    names = {"base": root / "base", "a": root / "a", "b": root / "b"}
    if not all((p / "config.json").is_file() for p in names.values()):
        base = random_llama(names["base"], seed=0, dtype=torch.bfloat16, hidden=args.hidden, layers=args.layers,
                            heads=args.heads, intermediate=args.intermediate, vocab=len(char_tokenizer()), positions=512)
        random_expert(base, names["a"], seed=1, scale=0.5)
        random_expert(base, names["b"], seed=2, scale=0.5)
    return {k: str(v) for k, v in names.items()}


def candidate(i: int) -> Recipe:
    """Candidate i: TIES, DARE-TIES and task arithmetic in turn, with weights that differ per candidate."""
    method = ("ties", "dare_ties", "task_arithmetic")[i % 3]
    wa, wb = 0.3 + 0.2 * (i % 4), 1.0 - 0.15 * (i % 5)
    dense = method != "task_arithmetic"
    return Recipe(merge_method=method, base_model="base", seed=i,
                  models=[ModelRef("a", {"weight": wa, **({"density": 0.5} if dense else {})}),
                          ModelRef("b", {"weight": wb, **({"density": 0.7} if dense else {})})])


def push_blobs(worker, blobs: list[bytes]) -> None:
    """Runs inside each vLLM worker (the baseline): load safetensors bytes through the reload path."""
    from safetensors.torch import load

    worker.reload_weights(weights_iterator=(kv for blob in blobs for kv in load(blob).items()),
                          is_checkpoint_format=True)


def bytes_push(handle, materializer, recipe: Recipe) -> tuple[dict[str, float], int]:
    """The baseline: materialize in the driver, serialize, push the bytes to every rank.
    Returns (seconds per stage, bytes sent to one rank)."""
    from safetensors.torch import save

    t0 = time.perf_counter()
    weights = materializer.materialize(recipe)
    t1 = time.perf_counter()
    chunks: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in weights.items():
        if chunks[-1] and size + t.nbytes > CHUNK_BYTES:
            chunks.append({})
            size = 0
        chunks[-1][name] = t.contiguous()
        size += t.nbytes
    blobs = [save(c) for c in chunks]
    del weights, chunks
    t2 = time.perf_counter()
    handle.llm.collective_rpc(push_blobs, args=(blobs,))
    handle.llm.reset_prefix_cache()
    t3 = time.perf_counter()
    secs = {"materialize": t1 - t0, "serialize": t2 - t1, "rpc_and_load": t3 - t2, "total": t3 - t0}
    return secs, sum(len(b) for b in blobs)


def memory(pid: int) -> dict[str, float]:
    """Resident GiB of a process: private (anonymous), file-backed (memory-mapped sources, page cache), and
    the peak since the last `reset_peak`."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 2**20, 3)
    return {"rss_gib": fields["VmRSS"], "private_gib": fields["RssAnon"], "file_backed_gib": fields["RssFile"],
            "peak_rss_gib": fields["VmHWM"]}


def reset_peak(pid: int) -> None:
    """Restart the process's peak-RSS count (Linux: 5 > /proc/PID/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--candidates", type=int, default=3, help="timed candidates, after one warm-up of each kind")
    ap.add_argument("--restarts", type=int, default=1, help="how many of them also go through an engine restart")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", help="the engine's dtype")
    ap.add_argument("--models", help="keep the random checkpoints here (reused on the next run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_push.json"))
    return ap.parse_args()


def _measure(args: argparse.Namespace) -> SimpleNamespace:
    """The engine's one-time costs, then each candidate pushed as a recipe, as bytes, and (the first `restarts`)
    through a fresh engine; what the summary reads."""
    from evomerge.fitness.vllm_handle import VLLMHandle

    scratch = Path(tempfile.mkdtemp(prefix="vllm_push_"))
    try:
        t = time.perf_counter()
        sources = build_models(Path(args.models) if args.models else scratch / "models", args)
        build_s = time.perf_counter() - t
        engine_kw = dict(dtype=args.dtype, max_model_len=512, block_size=32)
        handle = VLLMHandle(sources["base"], sources, base="base", **engine_kw)
        params = sum(torch.Size(s).numel() for s in handle.shapes.values())
        (pid, _), *_ = handle.identity()

        def greedy(h) -> list[list[int]]:
            return h.generate_ids(PROMPTS, max_new_tokens=args.new_tokens)

        # One-time costs first (statistics computed on first use, allocator, reload-path set-up), apart.
        warm = candidate(30)  # TIES, with weights no timed candidate has
        started = memory(pid)
        t = time.perf_counter()
        handle.set_recipe(warm)
        first_recipe = time.perf_counter() - t
        after_recipe = memory(pid)  # what the recipe path adds to the worker, before any bytes push
        first_bytes, _ = bytes_push(handle, handle.checker, warm)

        rows: dict[str, list[float]] = {"recipe_push": [], "bytes_push": [], "engine_restart": []}
        parts: dict[str, list[float]] = {}
        recipe_bytes, blob_bytes, agree = [], [], {"bytes_push": True, "engine_restart": True}
        changed = []
        after_bytes = memory(pid)
        peaks = {"recipe_push": 0.0, "bytes_push": 0.0}
        for i in range(args.candidates):
            recipe = candidate(i)
            recipe_bytes.append(len(json.dumps(recipe.to_dict()).encode()))
            reset_peak(pid)
            handle.set_recipe(recipe)
            rows["recipe_push"].append(handle.timings["swap"])
            peaks["recipe_push"] = max(peaks["recipe_push"], memory(pid)["peak_rss_gib"])
            via_recipe = greedy(handle)
            reset_peak(pid)
            secs, size = bytes_push(handle, handle.checker, recipe)
            peaks["bytes_push"] = max(peaks["bytes_push"], memory(pid)["peak_rss_gib"])
            blob_bytes.append(size)
            rows["bytes_push"].append(secs.pop("total"))
            for k, v in secs.items():
                parts.setdefault(f"bytes_push.{k}", []).append(v)
            via_bytes = greedy(handle)
            agree["bytes_push"] &= via_bytes == via_recipe
            changed.append(via_recipe)
            if i < args.restarts:
                t = time.perf_counter()
                ckpt = write_checkpoint(recipe, sources, scratch / f"cand{i}", base="base")
                written = time.perf_counter() - t
                fresh = VLLMHandle(ckpt, **engine_kw)
                rows["engine_restart"].append(time.perf_counter() - t)  # written and ready to score
                agree["engine_restart"] &= greedy(fresh) == via_recipe
                fresh.close()
                parts.setdefault("engine_restart.write", []).append(written)
                parts.setdefault("engine_restart.engine_start", []).append(fresh.timings["engine_start"])
                shutil.rmtree(ckpt)
        worker_memory = {"engine_started": started, "after_first_recipe_push": after_recipe,
                         "after_first_bytes_push": after_bytes, "end": memory(pid), "peak_rss_gib_during": peaks}
        (same_pid, pushes), *_ = handle.identity()
        handle.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return SimpleNamespace(params=params, sources=sources, build_s=build_s, timings=handle.timings, first_recipe=first_recipe,
                           first_bytes=first_bytes, rows=rows, parts=parts, recipe_bytes=recipe_bytes, blob_bytes=blob_bytes,
                           agree=agree, changed=changed, worker_memory=worker_memory, pid=pid, same_pid=same_pid, pushes=pushes)


def _summary(args: argparse.Namespace, m: SimpleNamespace) -> dict:
    med = {k: median(v) for k, v in m.rows.items() if v}
    out = {
        "model": {"parameters": m.params, "stored_dtype": "bfloat16", "hidden": args.hidden, "layers": args.layers,
                  "heads": args.heads, "intermediate": args.intermediate, "sources": len(m.sources),
                  "build_seconds": round(m.build_s, 1)},
        "engine": {"dtype": args.dtype, "device": "cuda" if torch.cuda.is_available() else "cpu",
                   "start_seconds": round(m.timings["engine_start"], 1),
                   "open_sources_seconds": round(m.timings["open_sources"], 2)},
        "candidates": args.candidates, "restarts": min(args.restarts, args.candidates),
        "first_push_seconds": {"recipe_push": round(m.first_recipe, 2), "bytes_push": round(m.first_bytes["total"], 2)},
        "seconds_per_candidate_median": med,
        "stage_seconds_median": {k: median(v) for k, v in m.parts.items()},
        "bytes_per_candidate_per_rank": {"recipe_json": max(m.recipe_bytes), "safetensors_blob": max(m.blob_bytes),
                                         "blob_over_recipe": round(max(m.blob_bytes) / max(m.recipe_bytes))},
        "bytes_push_over_recipe_push": round(med["bytes_push"] / med["recipe_push"], 2),
        **({"engine_restart_over_recipe_push": round(med["engine_restart"] / med["recipe_push"], 1)}
           if "engine_restart" in med else {}),
        "same_greedy_as_recipe_push": m.agree if args.restarts else {"bytes_push": m.agree["bytes_push"]},
        "candidates_decode_differently": len({json.dumps(c) for c in m.changed}) == len(m.changed),
        "same_engine_process": m.same_pid == m.pid, "recipe_pushes": m.pushes,
        "vllm_worker_memory": m.worker_memory,
    }
    return out


def main() -> None:
    args = _arguments()
    out = _summary(args, _measure(args))
    text = json.dumps(out, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
