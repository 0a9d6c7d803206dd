"""What trimming a mixture-of-experts layer as one stacked tensor (as mergekit 0.1.5 does, evomerge.arch.stacks)
costs against trimming each expert tensor alone: the same tensors merged under Mixtral names (stacked) and
under names no family stacks (the baseline, measured in the same run). Per method and thread count: the
best time of a few candidates (each a new density, so trims re-cut), the bytes the kernels streamed per
parameter (evomerge.merge.passes.traffic: extra trim passes included), and the ratios stacked / per tensor.
Prints JSON.

    python benchmarks/moe_trims.py [--experts 8 --intermediate 1024 --hidden 512] [--threads 1,2] [--out FILE]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time

import torch

from benchmarks.memstat import emit
from evomerge.merge import Materializer, passes
from evomerge.recipe import Recipe

METHODS = {"ties": {}, "dare_ties": {}, "breadcrumbs": {"gamma": 0.01}, "della": {"epsilon": 0.1}}
CANDIDATES = 4


def layer(experts: int, inter: int, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """Layer 0 of a Mixtral (checkpoint names): experts, router, one attention writer, the embedding."""
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(64, hidden, generator=g),
          "model.layers.0.self_attn.o_proj.weight": torch.randn(hidden, hidden, generator=g),
          "model.layers.0.block_sparse_moe.gate.weight": torch.randn(experts, hidden, generator=g)}
    for e in range(experts):
        for w, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
            sd[f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"] = torch.randn(shape, generator=g)
    return sd


def measure(sources: dict, method: str, threads: int) -> dict:
    mat = Materializer(sources, base="base", threads=threads)
    params = sum(t.numel() for t in sources["base"].values())
    extra = METHODS[method]
    recipe = {"merge_method": method, "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.6, "density": 0.4, **extra}},
        {"model": "b", "parameters": {"weight": 0.4, "density": 0.6, **extra}}]}
    mat.materialize(Recipe.from_dict({**recipe, "seed": 0}))  # summaries and compiled kernels, as in a search
    times, read = [], []
    for i in range(CANDIDATES):
        recipe["models"][0]["parameters"]["density"] = 0.4 + 0.013 * (i + 1)
        before = passes.traffic.read
        start = time.perf_counter()
        mat.materialize(Recipe.from_dict({**recipe, "seed": i + 1}))
        times.append(time.perf_counter() - start)
        read.append((passes.traffic.read - before) / params)
    return {"seconds": round(min(times), 4), "bytes_read_per_param": round(sum(read) / len(read), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out")
    args = ap.parse_args()
    base = layer(args.experts, args.intermediate, args.hidden, 0)
    models = {"base": base}
    for i, name in enumerate(("a", "b"), start=1):
        g = torch.Generator().manual_seed(i)
        models[name] = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    unstacked = lambda n: n.replace("block_sparse_moe.experts", "mlp.moe_experts")  # noqa: E731  no family stacks these
    layouts = {"stacked": models, "per_tensor": {m: {unstacked(k): v for k, v in sd.items()} for m, sd in models.items()}}
    report = {"shape": {"experts": args.experts, "intermediate": args.intermediate, "hidden": args.hidden,
                        "params_per_model": sum(t.numel() for t in base.values())}, "rows": {}}
    for threads in map(int, args.threads.split(",")):
        for method in METHODS:
            rows = {name: measure(sources, method, threads) for name, sources in layouts.items()}
            rows["ratio_stacked_to_per_tensor"] = {
                k: round(rows["stacked"][k] / rows["per_tensor"][k], 3) for k in ("seconds", "bytes_read_per_param")}
            report["rows"][f"{method}/threads={threads}"] = rows
    emit(report, args.out)


if __name__ == "__main__":
    main()
