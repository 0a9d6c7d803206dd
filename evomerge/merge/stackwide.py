"""Whole-tensor statistics of a stack (experts stored apart that transformers stacks into one tensor in
memory, and mergekit 0.1.5 merges whole: evomerge.arch.stacks), read by the merge of each member.

A statistic is a sum of its members' partial sums (norms², dots, counts, histograms), each member's
computed once per merge by whichever of the stack's merge threads asks first (vectors.Shared), so the
stack is never concatenated: an 8x7B Mixtral gate_up stack is 939M entries. What the methods derive from
the sums (slerp's angle, karcher's iteration, sce's variance cut) is scalar work, done alike by every
member's merge, or once where it must agree exactly (`once`).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.merge.vectors import Shared

CHUNK = 1 << 20  # entries per float64 block of a Gram pass


@dataclass
class Stack:
    """The stack a merged tensor is member `index` of, during one merge: `read(j)` is member j's inputs
    as stored (views of the sources: never modified), members in the stacked tensor's order (expert by
    expert, `parts` members each, `size` in all); `dtype` the compute dtype."""

    name: str
    parts: int
    index: int
    size: int
    read: Callable[[int], list[torch.Tensor]]
    dtype: torch.dtype
    shared: Shared

    def tensors(self, j: int) -> list[torch.Tensor]:
        """Member j's inputs in the compute dtype."""
        return [x.to(self.dtype) for x in self.read(j)]

    def each(self, what: Hashable, fn: Callable[[int], Any], readers: int | None = None) -> list[Any]:
        """fn(j) for every member j, each once per merge, this thread's own member first; each value
        dropped once `readers` merges have read it (default: every member's)."""
        order = [(self.index + k) % self.size for k in range(self.size)]
        got = {j: self.shared.get((self.name, what, j), lambda j=j: fn(j), readers or self.size) for j in order}
        return [got[j] for j in range(self.size)]

    def once(self, what: Hashable, fn: Callable[[], Any]) -> Any:
        return self.shared.get((self.name, what), fn)

    def gram(self, with_base: int | None = None) -> torch.Tensor:
        """The float64 Gram matrix of the inputs over the whole stack (of their deltas from input
        `with_base` when given, which is then left out): one pass over each member as stored."""

        def member(j: int) -> torch.Tensor:
            xs = self.read(j)
            base = xs.pop(with_base) if with_base is not None else None
            return gram(xs, base)

        return sum(self.each(("gram", with_base), member))


def gram(points: list[torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """dot(p_i - base, p_j - base) for all pairs, accumulated in float64 block by block (no float64 copy
    of a whole tensor)."""
    flat = [p.reshape(-1) for p in points]
    b = base.reshape(-1) if base is not None else None
    out = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for s in range(0, flat[0].numel(), CHUNK):
        block = torch.stack([p[s : s + CHUNK].double() for p in flat])
        if b is not None:
            block -= b[s : s + CHUNK].double()
        out += (block @ block.T).cpu()
    return out


Values = Callable[[int], torch.Tensor]  # a statistic of member j's inputs


def histogram(stack: Stack, what: Hashable, values: Values) -> tuple[torch.Tensor, int]:
    """Counts of a non-negative float32 statistic over the stack by the top 16 bits of its values (bins
    order like the values), and how many are zero."""

    def member(j: int) -> tuple[torch.Tensor, int]:
        w = values(j).reshape(-1).view(torch.int32)
        return torch.bincount(w >> 16, minlength=1 << 16), int((w == 0).sum())

    parts = stack.each((what, "high"), member, readers=1)  # read by the one thread finding the cut
    return sum(h for h, _ in parts), sum(z for _, z in parts)


def kth_largest(stack: Stack, what: Hashable, values: Values, high: torch.Tensor, k: int) -> tuple[float, int, list[int]]:
    """The k-th largest (k >= 1) of the statistic `histogram` counted as `high`, without sorting it: the
    bin holding rank k, then a histogram of the low 16 bits within that bin (one more pass). Returns the
    value, how many are larger, and each member's count of entries equal to it."""
    above = high.flip(0).cumsum(0).flip(0)  # entries in this bin or higher
    b = int((above >= k).nonzero().max())
    larger = int(above[b + 1]) if b + 1 < above.numel() else 0

    def low(j: int) -> torch.Tensor:
        w = values(j).reshape(-1).view(torch.int32)
        return torch.bincount(w[(w >> 16) == b] & 0xFFFF, minlength=1 << 16)

    lows = stack.each((what, "low", b), low, readers=1)
    at = sum(lows).flip(0).cumsum(0).flip(0) + larger
    lo = int((at >= k).nonzero().max())
    larger = int(at[lo + 1]) if lo + 1 < at.numel() else larger
    value = torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32).item()
    return value, larger, [int(x[lo]) for x in lows]
