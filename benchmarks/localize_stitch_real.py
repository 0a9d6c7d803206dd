"""Dataless Localize-and-Stitch (evomerge's localize_stitch, issue 28) on the real-model test bed, and its memory.

Scores: SmolLM2-135M's MATH and FR experts stitched onto the base through `evomerge merge` (bfloat16, as the test bed's
checkpoints), each weight 1 (the paper's stitch), at each --densities value (the paper's sparsity, per tensor here);
each merged model scored by teacher-forced exact match on the held-out test files (MATH, FR, MATH_FR), as the real
zoo's card scores the experts.

Memory: the peak resident bytes per entry of one bfloat16 tensor merged from a base and 2 experts (1 thread),
localize_stitch beside linear (the working set the run's memory plan counts for methods it has no entry for) and pcb
(which it counts as more), each the slope between a 4096 x 4096 and an 8192 x 4096 tensor, each merge in its own
process, so fixed costs (imports, kernel compilation) cancel; the memory-mapped inputs' pages (6 B) are included.

    python benchmarks/localize_stitch_real.py [--zoo evomerge/zoo/real] [--densities 0.1 0.3 1.0] [--limit 200] [--out FILE]
Prints JSON (and writes it to --out, default benchmarks/results/localize_stitch_real.json).
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
COLS, ROWS = 4096, (4096, 8192)


def _write_tensors(root: Path) -> None:
    import torch
    from safetensors.torch import save_file

    for rows in ROWS:
        g = torch.Generator().manual_seed(0)
        base = torch.randn(rows, COLS, generator=g).bfloat16()
        for name in ("base", "a", "b"):
            x = base if name == "base" else base + 0.01 * torch.randn(rows, COLS, generator=g).bfloat16()
            d = root / str(rows) / name
            d.mkdir(parents=True)
            save_file({"model.embed_tokens.weight": x.contiguous()}, str(d / "model.safetensors"))
            (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 0,
                                                      "hidden_size": COLS, "vocab_size": rows, "tie_word_embeddings": True}))


def _peak(root: Path, method: str) -> int:
    """This process's peak resident bytes after merging root's tensor with `method` (run in a child of its own)."""
    import torch

    from evomerge.merge.materializer import Materializer
    from evomerge.recipe import Recipe

    torch.set_num_threads(1)
    params = {"weight": 0.5} if method == "linear" else {"weight": 0.5, "density": 0.3}
    cfg = {"merge_method": method, "dtype": "bfloat16", "models": [{"model": m, "parameters": params} for m in ("a", "b")],
           **({} if method == "linear" else {"base_model": "base"})}
    merger = Materializer({k: root / k for k in ("base", "a", "b")}, base=None if method == "linear" else "base", threads=1)
    for _, t in merger.tensors(Recipe.from_dict(cfg)):
        del t
    # VmHWM: this process's own high-water mark (ru_maxrss keeps a spawning parent's across exec)
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(hwm.split()[1]) * 1024


def memory(work: Path) -> dict[str, float]:
    _write_tensors(work / "tensors")
    out = {}
    for method in ("linear", "localize_stitch", "pcb"):
        peaks = [int(subprocess.run([sys.executable, __file__, "--peak", str(work / "tensors" / str(r)), method], check=True,
                                    capture_output=True, text=True).stdout.split()[-1]) for r in ROWS]
        out[method] = round((peaks[1] - peaks[0]) / ((ROWS[1] - ROWS[0]) * COLS), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=str(Path(__file__).resolve().parents[1] / "evomerge" / "zoo" / "real"))
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/localize_stitch_real.json")
    ap.add_argument("--peak", nargs=2, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = ap.parse_args()
    if args.peak:
        print(_peak(Path(args.peak[0]), args.peak[1]))
        return
    from evomerge.zoo.real import scores

    zoo, work = Path(args.zoo), Path(tempfile.mkdtemp(prefix="localize-stitch-"))
    report = {"scored_examples": args.limit, "weights": {"math": 1.0, "fr": 1.0}, "scores": {}, "merge_seconds": {}}
    for d in args.densities:
        cfg = {"merge_method": "localize_stitch", "base_model": str(zoo / "models" / "base"), "dtype": "bfloat16",
               "models": [{"model": str(zoo / "models" / m), "parameters": {"weight": 1.0, "density": d}} for m in ("math", "fr")]}
        name = f"density {d:g}"
        (work / f"{d:g}.yaml").write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(work / f"{d:g}.yaml"), "-o", str(work / f"{d:g}")], check=True)
        report["merge_seconds"][name] = round(time.perf_counter() - t0, 1)
        report["scores"][name] = scores(work / f"{d:g}", zoo / "data", TESTS, args.limit)
    report["memory_bytes_per_entry"] = memory(work)
    text = json.dumps(report, indent=1)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
