"""A task vector: one tensor's delta from its base, formed where it is used, never stored.

A task vector is a pair of source tensors in their stored dtype (memory-mapped, shared through the page
cache); kernels form `model - base` block by block in float32 registers. What a trim needs to know about
the whole delta is kept in a compact `Summary`, computed once per (model, tensor, base) and reused by
every candidate: a histogram of the magnitudes over 2**15 bins (the top 16 bits of the float32 magnitude,
which order like the magnitudes themselves). A trim to any density reads the bin
holding its threshold from the summary and finds the exact threshold from that bin's distinct magnitudes,
counted by their low 16 bits in one streaming pass the first time a trim cuts inside the bin; where equal
magnitudes straddle the threshold, a pass that stops early finds the flat index at which the tied entries
stop being kept.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


REFINED_ENTRIES = 1 << 14  # per summary: distinct magnitudes kept from refined bins (12 bytes each)


@dataclass(frozen=True)
class Summary:
    """The populated magnitude bins in descending order, how many entries each holds and how many lie in
    higher bins; and, for bins that trims have cut inside, their distinct magnitudes (low 16 bits,
    descending) with cumulative counts, so a later trim in the same bin needs no pass. Search densities
    settle in a few bins; the oldest refined bins are dropped beyond REFINED_ENTRIES."""

    bins: np.ndarray  # int32
    counts: np.ndarray  # int64
    above: np.ndarray  # int64: entries in higher bins
    refined: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.bins, self.counts, self.above, *(x for r in self.refined.values() for x in r)))

    def remember(self, b: int, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        present = np.flatnonzero(low)[::-1].astype(np.int32)  # largest first
        entry = (present, np.cumsum(low[present]))
        self.refined[b] = entry
        while sum(r[0].size for r in self.refined.values()) > REFINED_ENTRIES and len(self.refined) > 1:
            del self.refined[next(iter(self.refined))]
        return entry


@dataclass(frozen=True)
class Cut:
    """The magnitude at one descending rank: its value, and how many entries are larger and equal."""

    value: float
    larger: int
    equal: int


class TaskVector:
    """`model - base` for one tensor. `base` and `model` are the stored tensors (never modified); the
    summary comes from `summary_of`, which may cache it across candidates."""

    def __init__(self, base: torch.Tensor, model: torch.Tensor, summary_of: Callable[[TaskVector], Summary] | None = None):
        self.base, self.model = base, model
        self._summary_of = summary_of
        self._summary: Summary | None = None

    @property
    def numel(self) -> int:
        return self.base.numel()

    @property
    def shape(self) -> torch.Size:
        return self.base.shape

    @property
    def delta(self) -> torch.Tensor:
        """The delta as a new float32 tensor (for methods outside the fused kernels)."""
        return self.model.float() - self.base.float()

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.reshape(-1), self.model.reshape(-1)

    def summary(self) -> Summary:
        if self._summary is None:
            self._summary = self._summary_of(self) if self._summary_of is not None else summarize(self)
        return self._summary

    def cut(self, rank: int) -> Cut:
        """The magnitude at descending position `rank` (0 = largest)."""
        return self.cuts([rank])[0]

    def cuts(self, ranks: list[int]) -> list[Cut]:
        """Cuts at up to two descending ranks, from one pass over the tensor."""
        from evomerge.merge import gta

        s = self.summary()
        slots = [int(np.searchsorted(s.above, r, side="right")) - 1 for r in ranks]
        bins = [int(s.bins[i]) for i in slots]
        missing = [b for b in dict.fromkeys(bins) if b not in s.refined]
        if missing:
            lows = gta.refine(*self.flat(), missing[0], missing[-1])
            found = {b: s.remember(b, low) for b, low in zip(missing, lows)}
        out = []
        for r, i, b in zip(ranks, slots, bins):
            present, within = s.refined[b] if b in s.refined else found[b]
            j = int(np.searchsorted(within, r - int(s.above[i]), side="right"))
            bits = np.array([(b << 16) | int(present[j])], np.uint32)
            larger = int(s.above[i]) + (int(within[j - 1]) if j else 0)
            out.append(Cut(float(bits.view(np.float32)[0]), larger, int(within[j] - (within[j - 1] if j else 0))))
        return out

    def nth_equal(self, value: float, nth: int) -> int:
        """The flat index of the nth (from 1) entry whose magnitude is `value`, in index order."""
        from evomerge.merge import gta

        return gta.nth_equal(*self.flat(), value, nth)


def summarize(vec: TaskVector) -> Summary:
    """One pass over the pair: the magnitude histogram."""
    from evomerge.merge import gta

    counts = gta.histogram(*vec.flat())
    bins = np.flatnonzero(counts)[::-1].astype(np.int32)
    c = counts[bins].astype(np.int64)
    above = np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64)
    return Summary(bins, c, above)
