"""A task vector: one tensor's delta from its base, formed where it is used, never stored.

A task vector is a pair of source tensors in their stored dtype (memory-mapped, shared through the page
cache); kernels form `model - base` block by block in float32 registers. What a trim needs to know about
the whole delta is kept in a compact `Summary`, computed once per (model, tensor, base) and reused by
every candidate: a histogram of the magnitudes over 2**15 bins (the top 16 bits of the float32 magnitude,
which order like the magnitudes themselves) and the delta's L1 norm. A trim to any density reads the bin
holding its threshold from the summary, then finds the exact threshold in one streaming pass that
collects only that bin's entries (a fraction of a percent of the tensor).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Summary:
    """The populated magnitude bins in descending order, how many entries each holds and how many lie in
    higher bins, and the delta's L1 norm."""

    bins: np.ndarray  # int32
    counts: np.ndarray  # int64
    above: np.ndarray  # int64: entries in higher bins
    l1: float

    @property
    def nbytes(self) -> int:
        return self.bins.nbytes + self.counts.nbytes + self.above.nbytes


@dataclass(frozen=True)
class Cut:
    """The magnitude at one descending rank: its value, how many entries are larger, and the flat
    indices (ascending) of the entries equal to it."""

    value: float
    larger: int
    equal: np.ndarray  # int64


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

    def l1(self) -> float:
        return self.summary().l1

    def cut(self, rank: int) -> Cut:
        """The magnitude at descending position `rank` (0 = largest)."""
        return self.cuts([rank])[0]

    def cuts(self, ranks: list[int]) -> list[Cut]:
        """Cuts at up to two descending ranks, from one pass over the tensor."""
        s = self.summary()
        slots = [int(np.searchsorted(s.above, r, side="right")) - 1 for r in ranks]
        bins = [int(s.bins[i]) for i in slots]
        values, index = _select(self, bins[0], bins[-1], int(sum(s.counts[i] for i in set(slots))))
        out = []
        for r, i, b in zip(ranks, slots, bins):
            mine = _bin_of(values) == b
            v, idx = values[mine], index[mine]
            ordered = np.sort(v)[::-1]
            value = float(ordered[r - int(s.above[i])])
            out.append(Cut(value, int(s.above[i]) + int((v > value).sum()), idx[v == value]))
        return out


def _bin_of(values: np.ndarray) -> np.ndarray:
    return values.view(np.uint32) >> 16


def summarize(vec: TaskVector) -> Summary:
    """One pass over the pair: the magnitude histogram and the L1 norm."""
    from evomerge.merge import gta

    counts, l1 = gta.histogram(*vec.flat())
    bins = np.flatnonzero(counts)[::-1].astype(np.int32)
    c = counts[bins].astype(np.int64)
    above = np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64)
    return Summary(bins, c, above, l1)


def _select(vec: TaskVector, bin0: int, bin1: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    from evomerge.merge import gta

    return gta.select(*vec.flat(), bin0, bin1, size)
