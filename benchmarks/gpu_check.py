"""The checks of benchmarks/gpu_check.sh that run in Python, one per subcommand, each printing one JSON line
(and writing it to OUT/NAME.json). Models: benchmarks/scale_models.py's bf16 Llamas, base + 3 experts.

    python benchmarks/gpu_check.py models|parity|memory|vllm [--size 0.2b] [--cache DIR] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's evomerge

import torch  # noqa: E402

from benchmarks import memstat, scale_models  # noqa: E402

PARITY_MAX_RELATIVE = 1e-6  # the mergekit oracle tests' tolerance


def recipes(method: str, n: int):
    from evomerge.recipe import Recipe

    return [Recipe.from_dict(scale_models.candidate(method, i)) for i in range(n)]


def models(args) -> dict:
    t = time.perf_counter()
    sources = scale_models.checkpoints(args.size, args.cache)
    return {"size": args.size, "parameters": scale_models.parameters(args.size), "build_s": time.perf_counter() - t,
            "sources": sources}


def parity(args) -> dict:
    """Every merged tensor on CUDA against the CPU merge of the same recipe: max |cuda - cpu| / max |cpu|."""
    from evomerge.merge import Materializer

    sources = scale_models.checkpoints(args.size, args.cache)
    cpu = Materializer(sources, base="base")
    gpu = Materializer(sources, base="base", device="cuda")
    out: dict = {"size": args.size, "tolerance": PARITY_MAX_RELATIVE}
    for method in ("ties", "dare_ties"):
        (recipe,) = recipes(method, 1)
        worst, where, exact, count = 0.0, None, 0, 0
        for (name, a), (name_b, b) in zip(cpu.tensors(recipe), gpu.tensors(recipe), strict=True):
            assert name == name_b, (name, name_b)
            b = b.cpu()
            count += 1
            exact += bool(torch.equal(a, b))
            err = ((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30)).item()
            if err > worst:
                worst, where = err, name
        out[method] = {"tensors": count, "bitwise_equal_tensors": exact, "max_relative_difference": worst,
                       "worst_tensor": where, "ok": worst <= PARITY_MAX_RELATIVE}
    out["ok"] = all(out[m]["ok"] for m in ("ties", "dare_ties"))
    return out


def memory(args) -> dict:
    """Device bytes per parameter: a bf16 scoring model on the GPU, then the materializer on the GPU and its
    peak while merging TIES candidates into the model (first and warm swap times, synchronized)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from evomerge.merge import Materializer

    sources = scale_models.checkpoints(args.size, args.cache)
    params = scale_models.parameters(args.size)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sources["base"]), dtype=torch.bfloat16)
    model = model.to("cuda").eval().requires_grad_(False)
    torch.cuda.synchronize()
    model_bytes = torch.cuda.memory_allocated()
    host = {"after_model": memstat.status()}
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    mat = Materializer(sources, base="base", device="cuda")
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    after_load = torch.cuda.memory_allocated()
    host["after_load"] = memstat.status()
    times = []
    for r in recipes("ties", 1 + args.warm):
        t = time.perf_counter()
        mat.load_into(r, model)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    host["after_warm"] = memstat.status()
    peak = torch.cuda.max_memory_allocated()
    per = lambda b: round(b / params, 3)  # noqa: E731
    source_bytes = (1 + len(scale_models.EXPERTS)) * 2 * params
    return {
        "size": args.size, "parameters": params, "device": torch.cuda.get_device_name(),
        "scoring_model": "bfloat16 on cuda", "device_bytes_per_parameter": {
            "scoring_model": per(model_bytes), "materializer_after_load": per(after_load - model_bytes),
            "materializer_peak_while_merging": per(peak - model_bytes), "total_peak": per(peak)},
        "host_bytes_per_parameter": {k: {"private": per(v["RssAnon"] - host["after_model"]["RssAnon"]),
                                         "shared": per(v["RssFile"] - host["after_model"]["RssFile"])} for k, v in host.items()},
        "load_s": load_s, "first_candidate_s": times[0], "warm_candidate_s": statistics.median(times[1:]),
        "first_over_warm": times[0] / statistics.median(times[1:]),
        "sources_gb_s_warm": source_bytes / statistics.median(times[1:]) / 1e9,
    }


def vllm(args) -> dict:
    """Recipe push into a running vLLM engine (when the handle has it): swap times, and greedy output against
    an HF model holding the same merge."""
    import inspect

    from evomerge.fitness.vllm_handle import VLLMHandle

    if "sources" not in inspect.signature(VLLMHandle).parameters:
        return {"skipped": "this checkout's VLLMHandle pushes merged weights, not recipes (no `sources` argument)"}
    from evomerge.merge import Materializer
    from evomerge.fitness.handle import Sampling
    from evomerge.fitness.hf import HFHandle

    sources = scale_models.checkpoints(args.size, args.cache)
    t = time.perf_counter()
    handle = VLLMHandle(sources["base"], sources=sources, base="base", gpu_memory_utilization=0.4, max_model_len=256)
    start_s = time.perf_counter() - t
    swaps = []
    cands = recipes("ties", 1 + args.warm)
    for r in cands:
        t = time.perf_counter()
        handle.set_recipe(r)
        swaps.append(time.perf_counter() - t)
    prompts = ["12+7=", "hello ", "abc", "3*4="]
    greedy = Sampling(max_new_tokens=8)
    ours = handle.generate(prompts, greedy)
    handle.close()
    hf = HFHandle(sources["base"], Materializer(sources, base="base", device="cuda"), device="cuda", dtype="bfloat16")
    hf.set_recipe(cands[-1])
    ref = hf.generate(prompts, greedy)
    return {"size": args.size, "engine_start_s": start_s, "first_swap_s": swaps[0],
            "warm_swap_s": statistics.median(swaps[1:]), "greedy_vllm": ours, "greedy_hf_bf16": ref,
            "greedy_equal_prompts": f"{sum(a == b for a, b in zip(ours, ref))}/{len(prompts)}"}


CHECKS = {"models": models, "parity": parity, "memory": memory, "vllm": vllm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("check", choices=CHECKS)
    ap.add_argument("--size", default="0.2b", choices=scale_models.SIZES)
    ap.add_argument("--cache", default="/tmp/evomerge-scale")
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--out", default="gpu_check_out")
    args = ap.parse_args()
    result = CHECKS[args.check](args)
    text = json.dumps(result)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"{args.check}.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
