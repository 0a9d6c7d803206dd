"""A task vector (one tensor's delta from its base) with the statistics trims need, computed once.

Trims keep the entries of largest magnitude. Sorting per candidate would cost O(n log n) per tensor per
candidate; instead the magnitudes are sorted once, and a trim to any density reads one threshold from
the sorted array and compares. When equal magnitudes straddle the threshold (common in small or
low-precision deltas), the trim needs the sort's own order among them: mergekit breaks such ties by
torch's argsort, so the same argsort, run once and kept, reproduces its choice exactly.
"""
from __future__ import annotations

import torch


class TaskVector:
    """A flat delta plus lazily computed, cached magnitude statistics."""

    def __init__(self, delta: torch.Tensor):
        self.delta = delta
        self._sorted: torch.Tensor | None = None
        self._l1: float | None = None
        self._row_rank: torch.Tensor | None = None
        self._order: dict[bool, torch.Tensor] = {}

    @property
    def numel(self) -> int:
        return self.delta.numel()

    def sorted_magnitudes(self) -> torch.Tensor:
        """|delta| sorted in descending order (flat), computed once."""
        if self._sorted is None:
            self._sorted = self.delta.reshape(-1).abs().sort(descending=True).values
        return self._sorted

    def magnitude_at_rank(self, rank: int) -> float:
        """The magnitude of the entry at position `rank` (0 = largest)."""
        return float(self.sorted_magnitudes()[rank])

    def tie_at(self, rank: int) -> bool:
        """Whether the entries at descending positions `rank - 1` and `rank` have equal magnitude."""
        s = self.sorted_magnitudes()
        return 0 < rank < s.numel() and bool(s[rank - 1] == s[rank])

    def count_at_least(self, value: float) -> int:
        """How many entries have magnitude >= value (binary search in the sorted magnitudes)."""
        return self._count(value, strict=False)

    def count_above(self, value: float) -> int:
        return self._count(value, strict=True)

    def _count(self, value: float, strict: bool) -> int:
        s = self.sorted_magnitudes()
        lo, hi = 0, s.numel()  # descending: find the first position failing the test
        while lo < hi:
            mid = (lo + hi) // 2
            v = float(s[mid])
            if (v > value) if strict else (v >= value):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def order(self, descending: bool) -> torch.Tensor:
        """torch's sort order of |delta| (mergekit's tie order among equal magnitudes), computed once."""
        if descending not in self._order:
            w = self.delta.reshape(-1).abs()
            idx = torch.argsort(w, descending=True) if descending else torch.sort(w, descending=False).indices
            self._order[descending] = idx.to(torch.int32) if idx.numel() < 2**31 else idx
        return self._order[descending]

    def cached(self) -> list[torch.Tensor]:
        """The statistics computed so far (for memory accounting)."""
        return [t for t in (self._sorted, self._row_rank, *self._order.values()) if t is not None]

    def l1(self) -> float:
        if self._l1 is None:
            self._l1 = float(self.delta.abs().sum(dtype=torch.float64))
        return self._l1

    def row_rank(self) -> torch.Tensor:
        """Each entry's magnitude rank within its row, normalised to [0, 1] (DELLA's keep probabilities).

        One-dimensional tensors are one row; the result has the delta's shape as (rows, cols).
        """
        if self._row_rank is None:
            d = self.delta if self.delta.dim() >= 2 else self.delta.reshape(1, -1)
            d = d.reshape(d.shape[0], -1)
            ranks = d.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
            cols = d.shape[1]
            self._row_rank = ranks / (cols - 1) if cols > 1 else ranks
        return self._row_rank

