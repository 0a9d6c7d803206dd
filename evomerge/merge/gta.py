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

import threading

import numpy as np
import torch

from evomerge.merge.sparsify import Keep

CHUNK = 1 << 22  # torch path: elements per chunk, bounds its scratch memory
_MODES = {"all": 0, "band": 1, "random": 2, "della": 3}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
use_fused = True  # tests switch it off to check the torch path against the fused one


class Traffic:
    """Bytes the kernels streamed from and to memory in this process, pass by pass (read by benchmarks to
    relate a merge's time to the bytes it really moved, extra trim passes included)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.read = self.written = 0

    def add(self, read: int, written: int = 0) -> None:
        with self._lock:
            self.read += read
            self.written += written


traffic = Traffic()


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _fused_ok(*tensors: torch.Tensor) -> bool:
    return use_fused and all(t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES and t.is_contiguous() for t in tensors)


def _np(t: torch.Tensor) -> np.ndarray:
    """The kernel's view of a tensor: float32 as is, bfloat16 as its int16 bit patterns."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).reshape(-1).numpy()


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
    traffic.add(int(_bytes(base, *(m for m, _, _ in live)) * share), int(_bytes(out) * share))
    dtypes = {m.dtype for m, _, _ in live}
    if len(dtypes) == 1 and _fused_ok(base, out, *(m for m, _, _ in live)):
        _fused(base, out, live, consensus, normalize, scale, offset, spans)
    else:
        for s, e in spans:
            _chunked(base[s:e], out[s:e], [(m[s:e], k, w) for m, k, w in live], consensus, normalize, scale, offset + s)


def kept_l1(base: torch.Tensor, model: torch.Tensor, keep: Keep, offset: int = 0) -> tuple[float, float]:
    """Sums of |model - base| over the entries `keep` keeps and over all entries, in one pass (flat views;
    `offset` as for merge_task_vectors)."""
    traffic.add(_bytes(base, model))
    if _fused_ok(base, model):
        from evomerge.merge import kernels

        kept, whole = kernels.kept_l1(_np(base), _np(model), offset, *_params(keep, offset))
        return float(kept), float(whole)
    kept = whole = 0.0
    for s in range(0, base.numel(), CHUNK):
        x = model[s : s + CHUNK].float() - base[s : s + CHUNK].float()
        kept += float(torch.where(keep.mask(x, offset + s), x.abs(), 0).sum(dtype=torch.float64))
        whole += float(x.abs().sum(dtype=torch.float64))
    return kept, whole


def histogram(base: torch.Tensor, model: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Counts of |model - base| per magnitude bin (the top 16 bits of the float32), and per bin of those
    whose low 16 bits are not all zero."""
    traffic.add(_bytes(base, model))
    return _split(_histogram(base, model))


def sample_starts(numel: int, window: int, width: int) -> np.ndarray:
    """Where a sample's runs of `width` entries start: one run per whole window of `window` entries, at an offset
    that varies from window to window (so a matrix's rows or columns do not line up with the sample)."""
    w = np.arange(numel // window, dtype=np.int64)
    return w * window + (w * 40503) % (window - width + 1)


def sample_histogram(base: torch.Tensor, model: torch.Tensor, window: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """As histogram, over the runs of `width` entries that sample_starts places."""
    from evomerge.merge import kernels

    starts = sample_starts(base.numel(), window, width)
    traffic.add(_bytes(base, model) * width // window)
    if _fused_ok(base, model):
        hist = np.zeros(2 * kernels.BINS, np.int64)
        kernels.sample_histogram(_np(base), _np(model), starts, width, hist)
        return _split(hist)
    index = (torch.from_numpy(starts).to(base.device)[:, None] + torch.arange(width, device=base.device)).reshape(-1)
    return _split(_histogram(base[index], model[index]))


def count_at_least(base: torch.Tensor, model: torch.Tensor, bits: np.ndarray) -> np.ndarray:
    """Exact counts of the entries whose |model - base|, as float32 bits, is >= each of `bits` (int32)."""
    from evomerge.merge import kernels

    traffic.add(_bytes(base, model))
    out = np.zeros(len(bits), np.int64)
    if _fused_ok(base, model):
        kernels.count_at_least(_np(base), _np(model), bits.astype(np.int32), out)
        return out
    for s in range(0, base.numel(), CHUNK):
        w = (model[s : s + CHUNK].float() - base[s : s + CHUNK].float()).abs().view(torch.int32)
        out += np.array([int((w >= int(b)).sum()) for b in bits], np.int64)
    return out


def _histogram(base: torch.Tensor, model: torch.Tensor) -> np.ndarray:
    """kernels.histogram's 2 * BINS slots, on the fused kernel or torch ops."""
    from evomerge.merge import kernels

    if _fused_ok(base, model):
        hist = np.zeros(2 * kernels.BINS, np.int64)
        kernels.histogram(_np(base), _np(model), hist)
        return hist
    hist_t = torch.zeros(2 * kernels.BINS, dtype=torch.int64, device=base.device)
    for s in range(0, base.numel(), CHUNK):
        w = (model[s : s + CHUNK].float() - base[s : s + CHUNK].float()).abs().view(torch.int32).reshape(-1)
        hist_t += torch.bincount(((w >> 15) & ~1) | ((w & 0xFFFF) != 0).int(), minlength=2 * kernels.BINS)
    return hist_t.cpu().numpy()


def _split(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slots to (counts per bin, mixed per bin)."""
    return hist[0::2] + hist[1::2], hist[1::2].copy()


def refine(base: torch.Tensor, model: torch.Tensor, bin0: int, bin1: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of |model - base| by their low 16 bits, within magnitude bins bin0 and bin1."""
    from evomerge.merge import kernels

    traffic.add(_bytes(base, model))
    if _fused_ok(base, model):
        low0, low1 = np.zeros(1 << 16, np.int64), np.zeros(1 << 16, np.int64)
        kernels.refine(_np(base), _np(model), bin0, bin1, low0, low1)
        return low0, low1
    lows = [torch.zeros(1 << 16, dtype=torch.int64, device=base.device) for _ in range(2)]
    for s in range(0, base.numel(), CHUNK):
        bits = (model[s : s + CHUNK].float() - base[s : s + CHUNK].float()).abs().view(torch.int32)
        for low, b in zip(lows, (bin0, bin1) if bin1 != bin0 else (bin0,)):
            low += torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16)
    return lows[0].cpu().numpy(), lows[1].cpu().numpy()


def nth_equal(base: torch.Tensor, model: torch.Tensor, value: float, nth: int) -> int:
    """The flat index of the nth (from 1) entry with |model - base| == value, in index order; if there are
    fewer, -1 - their count."""
    from evomerge.merge import kernels

    if _fused_ok(base, model):
        found = int(kernels.nth_equal(_np(base), _np(model), np.float32(value), nth))
        traffic.add(_bytes(base, model) * (found + 1 if found >= 0 else base.numel()) // max(1, base.numel()))
        return found
    seen = 0
    for s in range(0, base.numel(), CHUNK):
        hits = torch.nonzero((model[s : s + CHUNK].float() - base[s : s + CHUNK].float()).abs() == value).reshape(-1)
        if seen + hits.numel() >= nth:
            return s + int(hits[nth - seen - 1])
        seen += hits.numel()
    return -1 - seen


_NO_RANK = np.zeros(0, np.float32)


def _params(k: Keep, offset: int) -> tuple:
    """One trim's kernel parameters: mode, lo, hi, bounds, key, thr, p_lo, p_span, rank, drop (the kernels read
    the ranks from the piece's first entry, flat index `offset`)."""
    from evomerge.merge.rng import threshold

    rank = _NO_RANK if k.rank is None else k.rank[offset - k.rank_start :].numpy()
    bounds = np.array([*k.lo_range, *k.hi_range], np.int64)
    return _MODES[k.kind], k.lo, k.hi, bounds, k.key, threshold(k.p), k.p_lo, k.p_span, rank, k.drop


def _arrays(keeps: Sequence[Keep], offset: int) -> tuple:
    """The kernel's per-vector trim parameters: numpy arrays of scalars and bounds, tuples of rank and drop."""
    params = [_params(k, offset) for k in keeps]

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
    kernels.merge(_np(base), tuple(_np(m) for m, _, _ in live), _np(out), offset, np.array(spans, np.int64).reshape(-1, 2),
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
