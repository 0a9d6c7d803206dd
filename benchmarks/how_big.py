"""The README's "How big can I go": bytes per parameter measured on the largest model this machine holds, and
7B / 70B worked examples computed from them. Reads the committed artifacts of benchmarks/scale.py (one search
worker's memory) and benchmarks/scale_run.py (a whole `evomerge run` against its --dry-run); prints the
README section's body. tests/test_readme_figures.py keeps the README equal to it.

    python benchmarks/how_big.py
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SCALE, RUN = "scale.json", "scale_run_1b.json"
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
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
