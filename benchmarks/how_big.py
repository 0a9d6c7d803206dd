"""The README's "How big can I go": bytes per parameter measured on the largest model this machine holds, and
7B / 70B worked examples computed from them. Reads the committed artifacts of benchmarks/scale.py (one search
worker's memory), benchmarks/scale_run.py (a whole `evomerge run` against its --dry-run) and benchmarks/vllm_tp.py
(a vLLM engine's recipe push at tensor-parallel sizes 1 and 2, with the 70B / 8-rank arithmetic); prints the
README section's body. tests/test_readme_figures.py keeps the README equal to it.

    python benchmarks/how_big.py
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SCALE, RUN, TP = "scale.json", "scale_run_1b.json", "vllm_tp.json"
GB = 1e9


def markdown(results: Path = RESULTS) -> str:
    scale, run = (json.loads((results / f).read_text()) for f in (SCALE, RUN))
    size = max(scale["sizes"].values(), key=lambda s: s["parameters"])
    ties = size["ties"]
    model = ties["evomerge"]["scoring_model_bytes"] / size["parameters"]
    stored = size["source_bytes_each"] / size["parameters"]
    own = max(size[m]["ratios"]["materializer_private_peak_bytes_per_parameter"] for m in ("ties", "dare_ties"))
    whole = run["peak_tree_bytes_per_parameter"]
    n = size["parameters"] / GB
    lines = [
        f"Measured on a {n:.2f}B-parameter Llama stored in bf16, base + {size['experts']} experts, TIES and DARE-TIES, "
        f"CPU (`benchmarks/scale.py` → `benchmarks/results/{SCALE}`; the whole run: `benchmarks/scale_run.py` → "
        f"`benchmarks/results/{RUN}`):",
        "",
        "| per parameter | bytes | memory |",
        "|---|---|---|",
        f"| each source, memory-mapped as stored (bf16) | {stored:.2f} | page cache: shared by every worker of a node |",
        f"| the HF scoring model on CPU (float32) | {model:.2f} | private, per worker |",
        "| the HF scoring model on a GPU (bfloat16) | 2 (computed) | device, per worker |",
        f"| the materializer's own buffers and trim summaries (peak) | {own:.3f} | private, per worker |",
        f"| a whole `evomerge run` (HF scorer, CPU), peak | {whole['Pss']:.1f} | {whole['Pss_Anon']:.1f} private + "
        f"{whole['Pss_File']:.1f} shared |",
        "",
        f"`evomerge run --dry-run` predicted that run's peak at {run['dry_run']['predicted_peak_rss_bytes'] / GB:.1f} GB, "
        f"measured {run['peak_tree_bytes']['Pss'] / GB:.1f} GB (×{run['predicted_over_measured_peak_pss']:.2f}; Pss: "
        f"`ps` sums {run['peak_tree_bytes']['Rss'] / GB:.1f} GB of Rss while the scorer loads, counting twice the base "
        "checkpoint's pages that its loader and the materializer both map). Worked examples from these figures, "
        "base + 2 experts in bf16:",
        "",
        "| | 7B | 70B |",
        "|---|---|---|",
    ]
    for what, per in (("sources in the page cache, once per node", 3 * stored),
                      ("CPU worker, private (float32 scoring model + materializer)", model + own),
                      ("GPU worker, on the device (bfloat16 scoring model)", 2.0),
                      ("GPU worker, host private (materializer)", own)):
        lines.append(f"| {what} | {7 * per:.1f} GB | {70 * per:.0f} GB |")
    return "\n".join(lines + ["", *tensor_parallel(json.loads((results / TP).read_text()))])


def tensor_parallel(tp: dict) -> list[str]:
    """A vLLM engine's ranks each merging only their shard: the measured bytes and rates, and 70B on 8 ranks."""
    one, two = tp["sizes"][0], tp["sizes"][1]
    n = tp["model"]["parameters"]
    per_param = one["merged_bytes_per_rank_per_candidate"] / n  # bytes of the sources merged per parameter
    whole = 70e9 * per_param
    rate = one["merged_bytes_per_second_per_rank"]  # TP 2 on a shared 2-core CPU is its ranks' overheads, not the merge
    return [
        f"A vLLM engine of k tensor-parallel ranks: each rank merges only the shard its weight loaders keep. Measured on "
        f"a {n / 1e6:.0f}M-parameter Llama in bf16, base + 2 experts, CPU, a core per rank (`benchmarks/vllm_tp.py` → "
        f"`benchmarks/results/{TP}`): per candidate a rank merges {one['merged_bytes_per_rank_per_candidate'] / 1e6:.0f} MB "
        f"at TP 1 and {two['merged_bytes_per_rank_per_candidate'] / 1e6:.0f} MB at TP 2 (×{two['bytes_over_baseline']:.3f}); "
        f"counting the trims' own passes too (a TIES cut that needs one is found by one rank per task vector and read by the "
        f"others; DARE's rescale norms are summed by each rank over its share and added up), its kernels read {one['kernel_bytes_read_per_rank_per_candidate'] / 1e6:.0f} MB and "
        f"{two['kernel_bytes_read_per_rank_per_candidate'] / 1e6:.0f} MB (×{two['kernel_bytes_over_baseline']:.3f}); "
        f"a push takes {one['push_seconds_median']:.2f} s and {two['push_seconds_median']:.2f} s "
        f"({rate / GB:.2f} and {two['merged_bytes_per_second_per_rank'] / GB:.2f} GB/s merged per rank, the two ranks "
        "sharing this machine's 2 cores with each other and vLLM's own work). "
        f"At 70B on 8 ranks ({per_param:.1f} bytes of sources per parameter): a merge reads {whole / GB:.0f} GB, "
        f"{whole / 8 / GB:.1f} GB per rank where each rank read all {whole / GB:.0f} GB (8 × {whole / GB:.0f} GB from one "
        f"host's memory per candidate), about {whole / 8 / rate:.0f} s per candidate at the TP 1 rate.",
    ]


if __name__ == "__main__":
    print(markdown())
