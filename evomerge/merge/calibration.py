"""Calibration statistics for the data-aware merges (fisher, regmean), computed once per (source, calibration set).

A calibration set is a JSONL file, one {"text": ...} a line. For a source checkpoint it yields, over those
examples, each parameter's diagonal Fisher (the squared gradient of the example's LM loss, averaged over the
examples) and, for every nn.Linear, the Gram matrix of its inputs X^T X / tokens (RegMean's, averaged over
tokens as fusion-bench 0.2.33 does). They are written as one safetensors file under
EVOMERGE_CACHE/calibration, named by the source's identity (the sha256 of its files, evomerge.merge.identity)
and the calibration file's sha256, so another checkpoint at the same path or an edited set is computed anew;
merges read it memory-mapped, one tensor at a time.

Cost (float32): Fisher is 4 bytes per parameter per model (7B: 28 GB, 70B: 280 GB per model). A Gram matrix
is in^2 floats per linear layer; Llama-2-7B's 32 layers (hidden 4096, MLP 11008; q,k,v,gate,up read the
hidden state, o the hidden, down the MLP's) hold 32 x (6 x 4096^2 + 11008^2) = 7.1e9 floats, 28 GB per
model; Llama-2-70B's 80 layers (hidden 8192, MLP 28672) 80 x (6 x 8192^2 + 28672^2) = 9.8e10, 393 GB, plus
the head's hidden^2. Computing them holds the model, its gradients and both accumulators (the model x 3 plus
the Grams) in memory at once.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.machine import cache_dir
from evomerge.merge.identity import fingerprint
from evomerge.records import UserError

FISHER, GRAM = "fisher:", "gram:"  # key prefixes: fisher:<parameter>, gram:<linear module>


def read_examples(path: str | Path) -> list[str]:
    """The calibration texts of a JSONL file, or one line naming the file and the line at fault."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"calibration set {p}: no such file")
    texts = []
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"calibration set {p} line {n}: not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
            raise UserError(f"calibration set {p} line {n}: expected {{\"text\": \"...\"}}, a non-empty string")
        texts.append(row["text"])
    if not texts:
        raise UserError(f"calibration set {p}: no examples")
    return texts


def statistics_path(source: str | Path, calibration: str | Path) -> Path:
    ident = hashlib.sha256(json.dumps(fingerprint(source), sort_keys=True).encode()).hexdigest()[:24]
    calib = hashlib.sha256(Path(calibration).read_bytes()).hexdigest()[:24]
    return cache_dir("calibration", f"{ident}-{calib}.safetensors")


def compute(source: str | Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """Fisher and Gram statistics of the checkpoint at `source` over `texts`, in float32."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(source)
    grams: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def hook(name: str):
        def record(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            grams[name] = grams[name] + x.T @ x if name in grams else x.T @ x
            tokens[name] = tokens.get(name, 0) + x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for text in texts:
            ids = tok(text, return_tensors="pt").input_ids
            if ids.shape[1] < 2:
                raise UserError(f"calibration example {text[:40]!r} is under 2 tokens: it has no LM loss")
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n].addcmul_(p.grad, p.grad)
    finally:
        for h in handles:
            h.remove()
    out = {FISHER + n: f / len(texts) for n, f in fisher.items()}
    out.update({GRAM + n: g / tokens[n] for n, g in grams.items()})
    return out


@lru_cache(maxsize=64)
def statistics(source: str, calibration: str):
    """The statistics file of (source, calibration), computed and written on first use; an open safe_open handle
    (one per process: every tensor of a merge reads it)."""
    texts = read_examples(calibration)
    path = statistics_path(source, calibration)
    if not path.is_file():
        stats = compute(source, texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp), metadata={"source": str(source)})
        tmp.replace(path)  # whole or absent: concurrent workers never read half a file
    return safe_open(str(path), framework="pt")
