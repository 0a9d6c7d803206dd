"""Whole-tensor statistics of a stack (experts stored apart that transformers stacks into one tensor in
memory, and mergekit 0.1.5 merges whole: evomerge.arch.stacks), read by the merge of each member.

A statistic is a sum of its members' partial sums (norms², dots, counts, histograms), each member's
computed once per merge by whichever of the stack's merge threads asks first (vectors.Shared), so the
stack is never concatenated: an 8x7B Mixtral gate_up stack is 939M entries. What the methods derive from
the sums (slerp's angle, karcher's iteration) is scalar work, done alike by every member's merge, or
once where it must agree exactly (`once`: sce's variance cut). A k-th largest value is found as the
trims' summaries find theirs (vectors.py): counts by the top 16 bits of the float32 values, then by the
low 16 bits within the one bin holding it; both histograms add over the members.
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


Values = Callable[[int], torch.Tensor]  # a non-negative float32 statistic of member j's inputs


def histogram(stack: Stack, what: Hashable, values: Values) -> tuple[torch.Tensor, int]:
    """Counts of a statistic over the stack by the top 16 bits of its values (bins order like the values),
    and how many are zero."""

    def member(j: int) -> tuple[torch.Tensor, int]:
        w = values(j).reshape(-1).view(torch.int32)
        return torch.bincount(w >> 16, minlength=1 << 16), int((w == 0).sum())

    parts = stack.each((what, "high"), member, readers=1)  # read by the one thread finding the cut
    return sum(h for h, _ in parts), sum(z for _, z in parts)


@dataclass(frozen=True)
class Cut:
    """The k largest entries of a statistic over a stack: those above `value`, and of those equal to it the
    first `take[j]` of member j (the first in the stack's order); `sums`, the weights summed over them
    but for member `partial`'s equal ones (the one member whose equal entries are only partly taken)."""

    value: float
    take: list[int]
    sums: torch.Tensor
    partial: int | None


def kth_largest(stack: Stack, what: Hashable, values: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                high: torch.Tensor, k: int) -> Cut:
    """The k largest (k >= 1) entries of the statistic `histogram` counted as `high`, without sorting it:
    the bin holding rank k, then one pass counting the low 16 bits within that bin. `values(j)` gives
    member j's statistic and per-entry weights [m, ...] (float32) that the same pass sums over the selection."""
    above = high.flip(0).cumsum(0).flip(0)  # entries in this bin or higher
    b = int((above >= k).nonzero().max())
    larger = int(above[b + 1]) if b + 1 < above.numel() else 0

    def low(j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stat, weights = values(j)
        bits = stat.reshape(-1).view(torch.int32)
        weights = weights.reshape(weights.shape[0], -1)
        inside = (bits >> 16) == b
        lows = bits[inside] & 0xFFFF
        over = torch.where(bits >> 16 > b, weights, 0).sum(1, dtype=torch.float64)
        by_low = torch.stack([torch.bincount(lows, weights=w, minlength=1 << 16) for w in weights[:, inside].double()])
        return torch.bincount(lows, minlength=1 << 16), over, by_low

    parts = stack.each((what, "low", b), low, readers=1)
    at = sum(c for c, _, _ in parts).flip(0).cumsum(0).flip(0) + larger
    lo = int((at >= k).nonzero().max())
    left = k - (int(at[lo + 1]) if lo + 1 < at.numel() else larger)
    take, sums, partial = [], 0, None
    for j, (counts, over, by_low) in enumerate(parts):
        take.append(min(int(counts[lo]), left))
        left -= take[-1]
        whole = take[-1] == int(counts[lo])
        sums = sums + over + by_low[:, lo + 1 :].sum(1) + (by_low[:, lo] if whole else 0)
        partial = j if not whole and take[-1] else partial
    value = torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32).item()
    return Cut(value, take, sums, partial)
