"""The generalized task-arithmetic kernel behind task_arithmetic, TIES, DARE, breadcrumbs and DELLA.

    theta = base + lambda * merge_i(w_i * trim_i(tau_i))

where merge is a sum (optionally divided by the sum of weights) or TIES' sign election: keep the
entries whose sign agrees with the sign of the weighted sum (an exact 0 sum counts as +) and divide by
the weights of the agreeing entries. This follows mergekit 0.1.5's `GeneralizedTaskArithmeticMerge`.

On CPU float32 the fused numba kernel (kernels.py) does it in one pass. Elsewhere (GPU, other dtypes)
the same rules run as torch ops over chunks, which on a GPU are bandwidth-bound anyway.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from evomerge.merge.sparsify import Keep

CHUNK = 1 << 22  # torch path: elements per chunk, bounds its scratch memory
_MODES = {"all": 0, "band": 1, "random": 2, "della": 3}
use_fused = True  # tests switch it off to check the torch path against the fused one


def _fused_ok(*tensors: torch.Tensor) -> bool:
    return use_fused and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)


def merge_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    keeps: Sequence[Keep],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
    out: torch.Tensor,
) -> None:
    """out <- base + lam * merged task vectors (flat views of equal length; out preallocated)."""
    live = [(d.reshape(-1), k, w) for d, k, w in zip(deltas, keeps, weights) if k.kind != "none"]
    base, out = base.reshape(-1), out.reshape(-1)
    if not live:  # nothing survives: a plain sum adds zero, an election finds no agreeing entry
        out.copy_(base)
        return
    scale = lam
    if not consensus and normalize:
        divisor = sum(weights)  # mergekit: entries trimmed to nothing still count in a plain sum's divisor
        scale = lam / (divisor if abs(divisor) >= 1e-8 else 1.0)
    if _fused_ok(base, out, *(d for d, _, _ in live)):
        _fused(base, out, live, consensus, normalize, scale)
    else:
        _chunked(base, out, live, consensus, normalize, scale)


def kept_l1(delta: torch.Tensor, keep: Keep) -> float:
    """Sum of |x| over the entries `keep` keeps."""
    if _fused_ok(delta):
        from evomerge.merge import kernels

        return float(kernels.kept_l1(delta.numpy(), *_params(keep)))
    total = 0.0
    for s in range(0, delta.numel(), CHUNK):
        x = delta[s : s + CHUNK]
        total += float(torch.where(keep.mask(x, s), x.abs(), 0).sum(dtype=torch.float64))
    return total


_NO_RANK = np.zeros(0, np.float32)
_DTYPES = (np.int64, np.float32, np.float32, np.int64, np.int64, np.float64, np.float64)


def _params(k: Keep) -> tuple:
    """One trim's kernel parameters: mode, lo, hi, key, thr, p_lo, p_span, rank, drop."""
    from evomerge.merge.rng import threshold

    rank = _NO_RANK if k.rank is None else k.rank.numpy()
    return _MODES[k.kind], k.lo, k.hi, k.key, threshold(k.p), k.p_lo, k.p_span, rank, k.drop.numpy()


def _arrays(keeps: Sequence[Keep]) -> tuple:
    """The kernel's per-vector trim parameters as numpy arrays (scalars) and tuples (rank, drop)."""
    cols = list(zip(*map(_params, keeps)))
    return (*(np.array(c, t) for c, t in zip(cols, _DTYPES)), cols[7], cols[8])


def _fused(base, out, live, consensus, normalize, scale) -> None:
    from evomerge.merge import kernels

    keeps = [k for _, k, _ in live]
    coeff = np.array([w * k.factor for _, k, w in live], np.float32)
    weights = np.array([w for _, _, w in live], np.float32)
    kernels.merge(base.numpy(), out.numpy(), tuple(d.numpy() for d, _, _ in live), *_arrays(keeps), coeff, weights,
                  consensus, normalize, np.float32(scale))


def _chunked(base, out, live, consensus, normalize, scale) -> None:
    for s in range(0, out.numel(), CHUNK):
        e = min(out.numel(), s + CHUNK)
        vals = [torch.where(k.mask(d[s:e], s), d[s:e] * torch.tensor(w * k.factor, dtype=d.dtype), 0) for d, k, w in live]
        total = torch.stack(vals).sum(0)
        if consensus:
            positive = total >= 0
            agree = [torch.where(positive, v > 0, v < 0) for v in vals]
            acc = torch.stack([torch.where(a, v, 0) for v, a in zip(vals, agree)]).sum(0)
            if normalize:
                div = torch.stack([a * torch.tensor(w, dtype=out.dtype) for a, (_, _, w) in zip(agree, live)]).sum(0)
                acc = acc / torch.where(div == 0, torch.ones_like(div), div)
        else:
            acc = total
        torch.add(base[s:e], acc * scale, out=out[s:e])
