"""Merge speed: evomerge's resident materializer vs mergekit 0.1.5's in-process API, same machine, same run.

A ~100M-parameter Llama-shaped state dict (fp32) and two experts (base + random deltas) are built here.
One candidate of TIES and of DARE-TIES with per-layer weights and densities is merged by
- evomerge: `Materializer(...).materialize(recipe)` (full state dict out) and `.load_into` (into an
  existing module's storage), after a warm-up candidate that pays the one-time magnitude sort;
- mergekit: `mergekit.merge_methods.api.merge_state_dicts` with the same per-tensor values.
Prints JSON: times, ratios, the bytes the materializer keeps resident and the peak memory above them
while merging (in models: peak RSS during `materialize` minus the RSS just before), and the fraction of this
machine's copy bandwidth (a torch copy measured here, right after) that the merge reaches, counting the
bytes it must move: the base and both task vectors read, the output written.

    python benchmarks/merge_speed.py [--layers 12] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # large blocks straight from mmap: freed memory leaves the RSS,
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "1048576"  # so the peak RSS measures what a merge really holds
    os.execv(sys.executable, [sys.executable, *sys.argv])
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from evomerge.merge import Materializer  # noqa: E402
from evomerge.merge.layout import layer_of, layer_position, num_layers  # noqa: E402
from evomerge.merge.params import ParamSpec, evaluate  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402


def llama_state_dict(layers: int, hidden: int, inter: int, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen) * 0.02}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = torch.randn(hidden, hidden, generator=gen) * 0.02
        sd[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden, generator=gen) * 0.02
        sd[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=gen) * 0.02
        sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=gen) * 0.02
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    sd["model.norm.weight"] = torch.ones(hidden)
    sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=gen) * 0.02
    return sd


def expert(base: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: v + torch.randn(v.shape, generator=gen) * 0.002 for k, v in base.items()}


def recipe(method: str, wa: list[float], da: list[float], wb: list[float], db: list[float], seed: int = 0) -> Recipe:
    return Recipe.from_dict({"merge_method": method, "base_model": "base", "seed": seed, "models": [
        {"model": "a", "parameters": {"weight": wa, "density": da}},
        {"model": "b", "parameters": {"weight": wb, "density": db}}]})


def mergekit_parameters(r: Recipe, names: list[str]):
    """The recipe's per-tensor weights and densities as mergekit PerGroupValues (same gradient arithmetic)."""
    from mergekit.merge_methods.base import PerGroupValues

    count = num_layers(names)
    out = {}
    for key in ("weight", "density"):
        spec = ParamSpec(key, float)
        values = []
        for n in names:
            ln = layer_of(n)
            t = layer_position(ln.index, count) if ln else 0.0
            values.append({m.model: evaluate(m.parameters[key], n, t, spec, n) for m in r.models})
        out[key] = PerGroupValues(values)
    return out


def rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident set
        f.write("5")


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        result = None
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-mergekit", action="store_true")
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(0)
    base = llama_state_dict(args.layers, args.hidden, args.intermediate, args.vocab, gen)
    sources = {"base": base, "a": expert(base, gen), "b": expert(base, gen)}
    names = list(base)
    params = sum(t.numel() for t in base.values())
    model_bytes = params * 4

    src, dst = torch.randn(params), torch.empty(params)
    dst.copy_(src)

    def copy_bandwidth() -> float:
        """This machine's copy bandwidth now (read + write bytes per second of a torch copy of one model)."""
        return 2 * model_bytes / timed(lambda: dst.copy_(src), 5)[0]

    start = time.perf_counter()
    mat = Materializer(sources, base="base")
    load_s = time.perf_counter() - start
    candidates = {
        "ties": [recipe("ties", [0.5, 0.9], [0.3, 0.6], [1.0, 0.4], [0.7, 0.2]),
                 recipe("ties", [0.6, 0.8, 0.4], [0.5, 0.4], [0.9, 0.5], [0.6, 0.3, 0.5])],
        "dare_ties": [recipe("dare_ties", [0.5, 0.9], [0.3, 0.6], [1.0, 0.4], [0.3, 0.7, 0.5], seed=1),
                      recipe("dare_ties", [0.6, 0.8, 0.4], [0.5, 0.4], [0.9, 0.5], [0.6, 0.3, 0.5], seed=2)],
    }
    report: dict = {"params": params, "model_bytes": model_bytes, "threads": torch.get_num_threads(),
                    "evomerge_load_sources_s": load_s}
    module_like = {n: torch.zeros_like(t) for n, t in base.items()}

    class Holder(torch.nn.Module):
        """Stands in for a live model: load_into writes into these preallocated tensors."""

        def named_buffers(self, *a, **k):
            return iter(module_like.items())

        def named_parameters(self, *a, **k):
            return iter(())

    holder = Holder()
    for method, (warm, cand) in candidates.items():
        start = time.perf_counter()
        mat.materialize(warm)  # first candidate: compiles the kernel, pays the one-time magnitude sort (TIES)
        first_s = time.perf_counter() - start
        resident = mat.summary_bytes()  # the sources are the caller's; the materializer keeps only summaries
        before = rss("VmRSS")
        rss_reset()
        mat_s, out = timed(lambda: mat.materialize(cand), args.repeats)
        peak_above = rss("VmHWM") - before
        del out
        into_s, _ = timed(lambda: mat.load_into(cand, holder), args.repeats)
        bw = copy_bandwidth()
        moved = (2 + 2) * model_bytes  # read the base and two task vectors, write the output
        entry = {
            "copy_bandwidth_gb_s": bw / 1e9,
            "evomerge_first_candidate_s": first_s,
            "evomerge_materialize_s": mat_s,
            "evomerge_load_into_s": into_s,
            "resident_models": resident / model_bytes,
            "peak_above_resident_models": peak_above / model_bytes,
            "fraction_of_copy_bandwidth_materialize": moved / mat_s / bw,
            "fraction_of_copy_bandwidth_load_into": moved / into_s / bw,
        }
        if not args.skip_mergekit:
            from mergekit.merge_methods.api import merge_state_dicts

            mk_params = mergekit_parameters(cand, names)
            torch.manual_seed(0)
            mk_s, ref = timed(lambda: merge_state_dicts(sources, method, parameters=mk_params, base="base"), 1)
            entry["mergekit_merge_state_dicts_s"] = mk_s
            entry["speedup_materialize"] = mk_s / mat_s
            entry["speedup_load_into"] = mk_s / into_s
            if method == "ties":  # deterministic: the two must agree
                ours = mat.materialize(cand)
                entry["max_relative_difference_vs_mergekit"] = max(
                    ((ours[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in names)
                del ours
            del ref
        report[method] = entry
    report["resident_rss_gb"] = rss("VmRSS") / 1e9
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
