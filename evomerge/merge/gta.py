"""The generalized task-arithmetic kernel behind task_arithmetic, TIES, DARE, breadcrumbs and DELLA.

    theta = base + lambda * merge_i(w_i * trim_i(tau_i)),   tau_i = model_i - base

where merge is a sum (optionally divided by the sum of weights) or TIES' sign election: keep the
entries whose sign agrees with the sign of the weighted sum (an exact 0 sum counts as +) and divide by
the weights of the agreeing entries. This follows mergekit 0.1.5's `GeneralizedTaskArithmeticMerge`.

Inputs are the sources' stored tensors; deltas are formed inside the kernel. On CPU (float32 or bfloat16
sources and destinations) the fused numba kernel (kernels.py) does it in one pass. Elsewhere (GPU, other
dtypes) the same rules run as torch ops over chunks, which on a GPU are bandwidth-bound anyway.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from evomerge.merge.passes import CHUNK, Keep, as_numpy, fused_ok, kernel_params, traffic, tensor_bytes
def merge_task_vectors(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    keeps: Sequence[Keep],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    out: torch.Tensor,
    offset: int = 0,
    spans: Sequence[tuple[int, int]] | None = None,
) -> None:
    """out <- base + lam * merged task vectors (models - base); flat views of equal length, `offset` the
    flat index of their first entry in the whole tensor (for a tensor merged in pieces). `spans`: only these
    ascending [start, end) ranges of them (a tensor-parallel shard), in one pass."""
    live = [(m.reshape(-1), k, w) for m, k, w in zip(models, keeps, weights) if k.kind != "none"]
    base, out = base.reshape(-1), out.reshape(-1)
    spans = [(0, base.numel())] if spans is None else list(spans)
    if not live:  # nothing survives: a plain sum adds zero, an election finds no agreeing entry
        for s, e in spans:
            out[s:e].copy_(base[s:e])
        return
    scale = lam
    if not consensus and normalize:
        divisor = sum(weights)  # mergekit: entries trimmed to nothing still count in a plain sum's divisor
        scale = lam / (divisor if abs(divisor) >= 1e-8 else 1.0)
    share = sum(e - s for s, e in spans) / max(1, base.numel())
    traffic.add(int(tensor_bytes(base, *(m for m, _, _ in live)) * share), int(tensor_bytes(out) * share))
    dtypes = {m.dtype for m, _, _ in live}
    if len(dtypes) == 1 and fused_ok(base, out, *(m for m, _, _ in live)):
        _fused(base, out, live, consensus, normalize, scale, offset, spans)
    else:
        for s, e in spans:
            _chunked(base[s:e], out[s:e], [(m[s:e], k, w) for m, k, w in live], consensus, normalize, scale, offset + s)


def _arrays(keeps: Sequence[Keep], offset: int) -> tuple:
    """The kernel's per-vector trim parameters: numpy arrays of scalars and bounds, tuples of rank and drop."""
    params = [kernel_params(k, offset) for k in keeps]

    def col(i: int, dtype) -> np.ndarray:
        return np.array([p[i] for p in params], dtype)

    return (col(0, np.int64), col(1, np.float32), col(2, np.float32), col(3, np.int64), col(4, np.int64),
            col(5, np.int64), col(6, np.float64), col(7, np.float64), tuple(p[8] for p in params),
            tuple(p[9] for p in params))


def _fused(base, out, live, consensus, normalize, scale, offset, spans) -> None:
    from evomerge.merge import kernels

    keeps = [k for _, k, _ in live]
    coeff = np.array([w * k.factor for _, k, w in live], np.float32)
    weights = np.array([w for _, _, w in live], np.float32)
    kernels.merge(as_numpy(base), tuple(as_numpy(m) for m, _, _ in live), as_numpy(out), offset, np.array(spans, np.int64).reshape(-1, 2),
                  *_arrays(keeps, offset), coeff, weights, consensus, normalize, np.float32(scale))


def _chunked(base, out, live, consensus, normalize, scale, offset) -> None:
    for s in range(0, out.numel(), CHUNK):
        e = min(out.numel(), s + CHUNK)
        b = base[s:e].float()
        vals = []
        for m, k, w in live:
            d = m[s:e].float() - b
            vals.append(torch.where(k.mask(d, offset + s), d * torch.tensor(w * k.factor, dtype=d.dtype), 0))
        total = torch.stack(vals).sum(0)
        if consensus:
            positive = total >= 0
            agree = [torch.where(positive, v > 0, v < 0) for v in vals]
            acc = torch.stack([torch.where(a, v, 0) for v, a in zip(vals, agree)]).sum(0)
            if normalize:
                div = torch.stack([a * torch.tensor(w, dtype=torch.float32) for a, (_, _, w) in zip(agree, live)]).sum(0)
                acc = acc / torch.where(div == 0, torch.ones_like(div), div)
        else:
            acc = total
        out[s:e].copy_(b + acc * scale)
