"""One-pass reads of a task vector's entries (base and model as stored, the delta formed on the fly): the trims'
counting, histogram and norm passes, DELLA's rank passes, and `Keep`, the per-entry rule a trim becomes. On CPU
(float32 or bfloat16, contiguous) the fused numba kernels (kernels.py) run them; elsewhere torch ops over chunks.
`traffic` counts the bytes every pass streams. gta.py's merge kernel and vectors.py's summaries are built on these.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from evomerge.merge import rng

_NO_DROP = np.zeros(0, np.int64)
ANY_INDEX = (0, 1 << 62)  # flat-index range of the tied entries kept at a bound
_NONE = (1, 0)


@dataclass(eq=False)  # hashed by identity: a merge's shared statistics are keyed by the Keep they are for
class Keep:
    kind: str  # "all" | "none" | "band" | "random" | "della"
    lo: float = 0.0  # band: lo < |x| < hi, plus the tied entries at lo / hi whose index is in its range,
    hi: float = math.inf  # minus the flat indices in drop (sorted)
    lo_range: tuple[int, int] = ANY_INDEX
    hi_range: tuple[int, int] = _NONE
    drop: np.ndarray = field(default_factory=lambda: _NO_DROP)
    key: int = 0  # random, della: the entry's random stream
    p: float = 1.0  # random: keep probability
    p_lo: float = 0.0  # della: keep probability p_lo + p_span * rank
    p_span: float = 0.0
    rank: torch.Tensor | None = None  # della: row ranks in [0, 1] of the entries from flat index rank_start on
    rank_start: int = 0
    factor: float = 1.0

    def mask(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The keep mask of the flat delta chunk `x` that starts at flat position `start` (torch path)."""
        if self.kind == "all":
            return torch.ones_like(x, dtype=torch.bool)
        if self.kind == "none":
            return torch.zeros_like(x, dtype=torch.bool)
        if self.kind == "band":
            a = x.abs()
            i = torch.arange(start, start + x.numel(), device=x.device)
            m = (a > self.lo) & (a < self.hi)
            for value, (first, last) in ((self.lo, self.lo_range), (self.hi, self.hi_range)):
                m |= (a == value) & (i >= first) & (i <= last)
            if self.drop.size:
                d = torch.from_numpy(self.drop).to(x.device)
                d = d[(d >= start) & (d < start + x.numel())]
                m[d - start] = False
            return m
        u = rng.draws(self.key, start, x.numel(), x.device)
        if self.kind == "random":
            return u < rng.threshold(self.p)
        rank = self.rank[start - self.rank_start : start - self.rank_start + x.numel()].to(x.device).double()
        return u.double() * 2.0**-32 < self.p_lo + self.p_span * rank




CHUNK = 1 << 22  # torch path: elements per chunk, bounds its scratch memory
_MODES = {"all": 0, "band": 1, "random": 2, "della": 3}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
KERNELS = "EVOMERGE_KERNELS"  # "torch" runs the torch path on CPU too (checks it against the fused one)


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


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fused_ok(*tensors: torch.Tensor) -> bool:
    """Whether the fused numba kernels run on these tensors: on CPU, float32 or bfloat16, contiguous."""
    return os.environ.get(KERNELS) != "torch" and all(t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES and t.is_contiguous() for t in tensors)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """The kernel's view of a tensor: float32 as is, bfloat16 as its int16 bit patterns."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).reshape(-1).numpy()


def kept_l1(base: torch.Tensor, model: torch.Tensor, keep: Keep, offset: int = 0) -> tuple[float, float]:
    """Sums of |model - base| over the entries `keep` keeps and over all entries, in one pass (flat views;
    `offset` as for merge_task_vectors)."""
    traffic.add(tensor_bytes(base, model))
    if fused_ok(base, model):
        from evomerge.merge import kernels

        kept, whole = kernels.kept_l1(as_numpy(base), as_numpy(model), offset, *kernel_params(keep, offset))
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
    traffic.add(tensor_bytes(base, model))
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
    traffic.add(tensor_bytes(base, model) * width // window)
    if fused_ok(base, model):
        hist = np.zeros(2 * kernels.BINS, np.int64)
        kernels.sample_histogram(as_numpy(base), as_numpy(model), starts, width, hist)
        return _split(hist)
    index = (torch.from_numpy(starts).to(base.device)[:, None] + torch.arange(width, device=base.device)).reshape(-1)
    return _split(_histogram(base[index], model[index]))


def count_at_least(base: torch.Tensor, model: torch.Tensor, bits: np.ndarray) -> np.ndarray:
    """Exact counts of the entries whose |model - base|, as float32 bits, is >= each of `bits` (int32)."""
    from evomerge.merge import kernels

    traffic.add(tensor_bytes(base, model))
    out = np.zeros(len(bits), np.int64)
    if fused_ok(base, model):
        kernels.count_at_least(as_numpy(base), as_numpy(model), bits.astype(np.int32), out)
        return out
    for s in range(0, base.numel(), CHUNK):
        w = (model[s : s + CHUNK].float() - base[s : s + CHUNK].float()).abs().view(torch.int32)
        out += np.array([int((w >= int(b)).sum()) for b in bits], np.int64)
    return out


def _histogram(base: torch.Tensor, model: torch.Tensor) -> np.ndarray:
    """kernels.histogram's 2 * BINS slots, on the fused kernel or torch ops."""
    from evomerge.merge import kernels

    if fused_ok(base, model):
        hist = np.zeros(2 * kernels.BINS, np.int64)
        kernels.histogram(as_numpy(base), as_numpy(model), hist)
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

    traffic.add(tensor_bytes(base, model))
    if fused_ok(base, model):
        low0, low1 = np.zeros(1 << 16, np.int64), np.zeros(1 << 16, np.int64)
        kernels.refine(as_numpy(base), as_numpy(model), bin0, bin1, low0, low1)
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

    if fused_ok(base, model):
        found = int(kernels.nth_equal(as_numpy(base), as_numpy(model), np.float32(value), nth))
        traffic.add(tensor_bytes(base, model) * (found + 1 if found >= 0 else base.numel()) // max(1, base.numel()))
        return found
    seen = 0
    for s in range(0, base.numel(), CHUNK):
        hits = torch.nonzero((model[s : s + CHUNK].float() - base[s : s + CHUNK].float()).abs() == value).reshape(-1)
        if seen + hits.numel() >= nth:
            return s + int(hits[nth - seen - 1])
        seen += hits.numel()
    return -1 - seen


_NO_RANK = np.zeros(0, np.float32)


def kernel_params(k: Keep, offset: int) -> tuple:
    """One trim's kernel parameters: mode, lo, hi, bounds, key, thr, p_lo, p_span, rank, drop (the kernels read
    the ranks from the piece's first entry, flat index `offset`)."""
    rank = _NO_RANK if k.rank is None else k.rank[offset - k.rank_start :].numpy()
    bounds = np.array([*k.lo_range, *k.hi_range], np.int64)
    return _MODES[k.kind], k.lo, k.hi, bounds, k.key, rng.threshold(k.p), k.p_lo, k.p_span, rank, k.drop




def row_rank(delta: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row, normalised to [0, 1]; a 1-d tensor is one row."""
    d = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    d = d.reshape(d.shape[0], -1)
    ranks = d.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
    cols = d.shape[1]
    return ranks / (cols - 1) if cols > 1 else ranks


def stacked_rank(siblings: list[tuple[torch.Tensor, torch.Tensor]], shape: torch.Size, part: int,
                 piece: int = 1 << 22) -> torch.Tensor:
    """DELLA's ranks of part `part` (flat, in [0, 1]) of one expert's slice of a stacked tensor, whose
    `siblings` (flat base, model pairs of `shape`) are stacked along rows: mergekit ranks a stacked
    [experts, rows, cols] tensor along dim 1, so each column of the slice is ranked over all its parts'
    rows. Computed in pieces of about `piece` entries of whole columns, each column made a contiguous row
    (sorting along contiguous memory is several times faster)."""
    rows = shape[0] if len(shape) else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    span = rows * len(siblings)
    out = torch.empty(rows, cols)
    step = max(1, piece // span)
    for c in range(0, cols, step):
        d = torch.cat([(m.reshape(rows, cols)[:, c : c + step].float() - b.reshape(rows, cols)[:, c : c + step].float()).T
                       for b, m in siblings], dim=1)
        r = d.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
        out[:, c : c + step] = (r / (span - 1) if span > 1 else r)[:, part * rows : (part + 1) * rows].T
    return out.reshape(-1)
