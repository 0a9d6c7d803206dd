"""A task vector: one tensor's delta from its base, formed where it is used, never stored.

A task vector is a pair of source tensors in their stored dtype (memory-mapped, shared through the page
cache); kernels form `model - base` block by block in float32 registers. What a trim needs to know about
the whole delta is kept in a compact `Summary`, computed once per (model, tensor, base) and reused by
every candidate: a histogram of the magnitudes over 2**15 bins (the top 16 bits of the float32 magnitude,
which order like the magnitudes themselves). A trim to any density reads the bin
holding its threshold from the summary. Deltas of bf16 weights mostly have their low 16 bits zero: a bin's
smallest magnitude then holds most of its entries, and the summary counts the others, so a threshold
there needs no pass. Elsewhere the exact threshold comes from that bin's distinct magnitudes, counted by
their low 16 bits in one streaming pass the first time a trim cuts inside the bin; where equal
magnitudes straddle the threshold, a pass that stops early finds the flat index at which the tied entries
stop being kept.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from evomerge.merge.sparsify import Keep


REFINED_ENTRIES = 1 << 14  # per summary: distinct magnitudes kept from refined bins (12 bytes each)


@dataclass(frozen=True)
class Summary:
    """The populated magnitude bins in descending order, how many entries each holds and how many lie in
    higher bins; and, for bins that trims have cut inside, their distinct magnitudes (low 16 bits,
    descending) with cumulative counts, so a later trim in the same bin needs no pass. Search densities
    settle in a few bins; the oldest refined bins are dropped beyond `limit` entries (REFINED_ENTRIES per
    tensor summarized)."""

    bins: np.ndarray  # int32
    counts: np.ndarray  # int64
    above: np.ndarray  # int64: entries in higher bins
    mixed: np.ndarray  # int64: entries whose low 16 bits are not all zero (all above the bin's round value)
    refined: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    limit: int = REFINED_ENTRIES

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.bins, self.counts, self.above, self.mixed, *(x for r in self.refined.values() for x in r)))

    def remember(self, b: int, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        present = np.flatnonzero(low)[::-1].astype(np.int32)  # largest first
        entry = (present, np.cumsum(low[present]))
        self.refined[b] = entry
        while sum(r[0].size for r in self.refined.values()) > self.limit and len(self.refined) > 1:
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
        self.unit: TaskVector = self  # what a trim of this tensor reads: itself, or its stack (StackVector)

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
            self._summary = self._summary_of(self) if self._summary_of is not None else self.summarize()
        return self._summary

    def cut(self, rank: int) -> Cut:
        """The magnitude at descending position `rank` (0 = largest)."""
        return self.cuts([rank])[0]

    def cuts(self, ranks: list[int]) -> list[Cut]:
        """Cuts at up to two descending ranks, from one pass over the tensor."""
        s = self.summary()
        slots = [int(np.searchsorted(s.above, r, side="right")) - 1 for r in ranks]
        if all(r - s.above[i] >= s.mixed[i] for r, i in zip(ranks, slots)):  # each at its bin's round value
            return [_round_cut(s, i) for i in slots]
        bins = [int(s.bins[i]) for i in slots]
        missing = [b for b in dict.fromkeys(bins) if b not in s.refined]
        if missing:
            lows = self.refine(missing[0], missing[-1])
            found = {b: s.remember(b, low) for b, low in zip(missing, lows)}
        out = []
        for r, i, b in zip(ranks, slots, bins):
            present, within = s.refined[b] if b in s.refined else found[b]
            j = int(np.searchsorted(within, r - int(s.above[i]), side="right"))
            bits = np.array([(b << 16) | int(present[j])], np.uint32)
            larger = int(s.above[i]) + (int(within[j - 1]) if j else 0)
            out.append(Cut(float(bits.view(np.float32)[0]), larger, int(within[j] - (within[j - 1] if j else 0))))
        return out

    offset = 0  # the flat position of the tensor being merged in this unit (see StackVector)

    def once(self, what: Hashable, fn: Callable[[], Any]) -> Any:
        """A value its trim reads: computed here (a stack shares it among its members' merges)."""
        return fn()

    def summarize(self) -> Summary:
        """One pass over the pair: the magnitude histogram."""
        from evomerge.merge import gta

        return _summary(*gta.histogram(*self.flat()))

    def refine(self, bin0: int, bin1: int) -> tuple[np.ndarray, np.ndarray]:
        """The magnitudes' counts by low 16 bits within two bins (gta.refine)."""
        from evomerge.merge import gta

        return gta.refine(*self.flat(), bin0, bin1)

    def nth_equal(self, value: float, nth: int) -> int:
        """The flat index of the nth (from 1) entry whose magnitude is `value`, in index order (if there
        are fewer: -1 - their count)."""
        from evomerge.merge import gta

        return gta.nth_equal(*self.flat(), value, nth)

    def kept_l1(self, keep: Keep) -> tuple[float, float]:
        """Sums of the magnitudes `keep` keeps, and of all (for rescaling)."""
        from evomerge.merge import gta

        return gta.kept_l1(*self.flat(), keep)


class Shared:
    """Values computed once per key during one merge, by the first thread that asks; a thread asking
    meanwhile waits for that one (which computes a member's statistic: it never waits itself)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[Hashable, Any] = {}
        self._busy: dict[Hashable, threading.Event] = {}

    def get(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._done:
                return _value(self._done[key])
            busy = self._busy.get(key)
            if busy is None:
                self._busy[key] = threading.Event()
        if busy is not None:
            busy.wait()
            return _value(self._done[key])
        try:
            value: Any = fn()
        except BaseException as e:  # noqa: BLE001  handed to every waiter, then raised here too
            value = _Failed(e)
        with self._lock:
            self._done[key] = value
            self._busy.pop(key).set()
        return _value(value)


@dataclass(frozen=True)
class _Failed:
    error: BaseException


def _value(v: Any) -> Any:
    if isinstance(v, _Failed):
        raise v.error
    return v


class StackVector(TaskVector):
    """The task vectors of tensors a trim reads as one (experts that transformers stacks into one tensor in
    memory, which mergekit 0.1.5 trims whole; evomerge.arch.stacks): their concatenation, in the stacked
    tensor's flat order, as the `unit` of member `index` (whose merge it serves). Its statistics are sums
    of its members' (histograms, refinements and L1 norms add). A stack's trim is found once per merge
    (`shared`; cuts and tied positions by one thread); the histograms and a rescale's L1 norms, one pass
    per member, by whichever thread asks first, each starting with its own member, so the threads merging
    a stack's members share those passes."""

    def __init__(self, name: str, members: list[TaskVector], parts: int, index: int, shared: Shared, key: Hashable,
                 summary_of: Callable[[TaskVector], Summary] | None = None):
        super().__init__(members[index].base, members[index].model, summary_of)
        self.name, self.members, self.parts, self.index = name, members, parts, index
        self.shared, self.key = shared, key
        self.starts = np.concatenate([[0], np.cumsum([m.numel for m in members])]).astype(np.int64)

    @property
    def numel(self) -> int:
        return int(self.starts[-1])

    @property
    def offset(self) -> int:
        return int(self.starts[self.index])

    @property
    def delta(self) -> torch.Tensor:
        return torch.cat([m.delta.reshape(-1) for m in self.members])

    def each(self, what: Hashable, fn: Callable[[int, TaskVector], Any]) -> list[Any]:
        """fn(i, member) for every member, each computed once per merge, this thread's own member first."""
        n = len(self.members)
        order = [(self.index + k) % n for k in range(n)]
        got = {i: self.shared.get((self.key, what, i), lambda i=i: fn(i, self.members[i])) for i in order}
        return [got[i] for i in range(n)]

    def once(self, what: Hashable, fn: Callable[[], Any]) -> Any:
        return self.shared.get((self.key, what), fn)

    def summarize(self) -> Summary:
        return combine(self.each("summary", lambda _, m: m.summary()))

    def cuts(self, ranks: list[int]) -> list[Cut]:
        return self.once(("cuts", *ranks), lambda: super(StackVector, self).cuts(ranks))  # one thread updates the summary

    def refine(self, bin0: int, bin1: int) -> tuple[np.ndarray, np.ndarray]:
        """Summed member by member (by the one thread finding the cuts: see `cuts`), holding two count
        arrays, not two per member."""
        low0, low1 = self.members[0].refine(bin0, bin1)
        for m in self.members[1:]:
            a, b = m.refine(bin0, bin1)
            low0 += a
            low1 += b
        return low0, low1

    def nth_equal(self, value: float, nth: int) -> int:
        def find() -> int:
            seen = 0
            for start, m in zip(self.starts, self.members):
                found = m.nth_equal(value, nth - seen)
                if found >= 0:
                    return int(start) + found
                seen += -1 - found
            return -1 - seen

        return self.once(("nth_equal", value, nth), find)

    def kept_l1(self, keep: Keep) -> tuple[float, float]:
        from evomerge.merge import gta

        def member(i: int, m: TaskVector) -> tuple[float, float]:
            k = replace(keep, rank=self.rank(i), rank_start=int(self.starts[i])) if keep.kind == "della" else keep
            return gta.kept_l1(*m.flat(), k, int(self.starts[i]))

        sums = self.each(("kept_l1", keep), member)  # a Keep hashes by identity
        return sum(k for k, _ in sums), sum(w for _, w in sums)

    def rank(self, i: int) -> torch.Tensor:
        """DELLA's ranks of member i (see sparsify.stacked_rank)."""
        from evomerge.merge import sparsify

        e = i // self.parts
        siblings = self.members[e * self.parts : (e + 1) * self.parts]
        return sparsify.stacked_rank([m.flat() for m in siblings], self.members[i].shape, i % self.parts)


def combine(summaries: list[Summary]) -> Summary:
    """The summary of a concatenation: bin counts add."""
    from evomerge.merge import kernels

    counts, mixed = np.zeros(kernels.BINS, np.int64), np.zeros(kernels.BINS, np.int64)
    for s in summaries:
        counts[s.bins] += s.counts
        mixed[s.bins] += s.mixed
    return replace(_summary(counts, mixed), limit=REFINED_ENTRIES * len(summaries))


def _round_cut(s: Summary, i: int) -> Cut:
    """The cut at the smallest magnitude of bin slot i, its low 16 bits zero: below every mixed entry."""
    value = float(np.array([int(s.bins[i]) << 16], np.uint32).view(np.float32)[0])
    return Cut(value, int(s.above[i] + s.mixed[i]), int(s.counts[i] - s.mixed[i]))


def _summary(counts: np.ndarray, mixed: np.ndarray) -> Summary:
    bins = np.flatnonzero(counts)[::-1].astype(np.int32)
    c = counts[bins].astype(np.int64)
    above = np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64)
    return Summary(bins, c, above, mixed[bins].astype(np.int64))
