"""benchmarks/scale.py keeps working: its checkpoints load in HF as built, and a tiny run produces every row."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import scale_models

ROOT = Path(__file__).resolve().parent.parent


def test_checkpoints_load_in_hf_and_experts_are_small_deltas(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = scale_models.checkpoints("tiny", tmp_path)
    base = AutoModelForCausalLM.from_pretrained(paths["base"])
    expert = AutoModelForCausalLM.from_pretrained(paths["a"])
    assert base.dtype == torch.bfloat16
    assert sum(p.numel() for p in base.parameters()) == scale_models.parameters("tiny")
    assert len(AutoTokenizer.from_pretrained(paths["base"])) <= base.config.vocab_size
    q = "model.layers.1.self_attn.q_proj.weight"
    b, e = base.state_dict()[q].float(), expert.state_dict()[q].float()
    assert 0.003 < ((e - b).std() / b.std()).item() < 0.03  # the 1% deltas survive bf16 rounding
    stamp = Path(paths["base"], "model.safetensors").stat().st_mtime_ns
    assert scale_models.checkpoints("tiny", tmp_path) == paths  # reused, not rebuilt
    assert Path(paths["base"], "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_tiny_scale_run_reports_every_row(tmp_path):
    pytest.importorskip("mergekit")
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--sizes", "tiny", "--methods", "ties", "--cache", str(tmp_path / "ckpt"),
         "--warm", "1", "--bandwidth-mib", "32", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    ties = report["sizes"]["tiny"]["ties"]
    for row in ("evomerge", "mergekit_in_memory", "mergekit_run_merge"):
        assert "error" not in ties[row], ties[row]
        assert ties[row]["warm_candidate_s"] > 0
    mem = ties["evomerge"]["bytes_per_parameter"]
    assert mem["after_model"]["private"] >= 4  # the float32 scoring model is resident
    assert set(ties["targets"]) == {"private_memory_within_scoring_model_plus_10pct", "first_within_2x_warm",
                                    "load_into_at_least_40pct_of_copy_bandwidth", "at_least_5x_mergekit_in_memory"}
    assert all(isinstance(v, bool) for v in ties["targets"].values())
