"""A task vector: one tensor's delta from its base, formed where it is used, never stored.

A task vector is a pair of source tensors in their stored dtype (memory-mapped, shared through the page
cache); kernels form `model - base` block by block in float32 registers. What a trim needs to know about
the whole delta is kept in a compact `Summary`, kept per (model, tensor, base) and reused by every
candidate. Magnitudes are binned by the top 16 bits of their float32 (bins order like the magnitudes).
Deltas of bf16 weights mostly have their low 16 bits zero: a bin's smallest magnitude ("round value")
then holds most of its entries, and the summary counts the others ("mixed"), so a threshold at a round
value needs nothing more; elsewhere the exact threshold comes from that bin's distinct magnitudes, counted
by their low 16 bits in one streaming pass the first time a trim cuts inside the bin; where equal
magnitudes straddle the threshold, a pass that stops early finds the flat index at which the tied entries
stop being kept.

A summary learns bins as trims need them. A full histogram costs a scatter per entry, several times a
warm merge's pass, so a large tensor's first trim instead brackets its threshold with a histogram of a
1/64 sample, then counts exactly, in one vectorised pass, the entries at or above the round value, one
past it and the next bin's round value for the one or few bins the sample admits. Later trims that fall in
a known bin need no pass; after MAX_COUNTS such passes on one tensor the full histogram is built.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from evomerge.merge import passes
from evomerge.merge.passes import Keep

if TYPE_CHECKING:
    from evomerge.merge.peers import Peers


REFINED_ENTRIES = 1 << 14  # per summary: distinct magnitudes kept from refined bins (12 bytes each)
# the bracketing sample: 1,024 consecutive entries of every 65,536, taken from tensors of at least 16 windows.
# Runs of whole kilobytes: a fresh process's first touch of a mapped page costs far more when every page is
# touched sparsely (64 entries in 8 KB cost 12x more than the same sample in 2 KB runs).
SAMPLE_WINDOW, SAMPLE_WIDTH, SAMPLE_MIN = 1 << 16, 1 << 10, 16
SMALL = 1 << 14  # entries up to which a summary sorts the magnitudes' bins instead
MAX_BRACKET = 3  # bins one counting pass may resolve (2-3 compares per entry each); more cost a full histogram
MAX_COUNTS = 4  # counting passes on one tensor before its full histogram (4 cost about one histogram)


@dataclass
class Summary:
    """Magnitude bins known exactly, in descending order: how many entries each holds, how many lie in
    higher bins and how many are mixed (low 16 bits not all zero: all above the bin's round value). All
    populated bins once `complete`; until then the bins counting passes have resolved, and `sample`, a
    histogram of a sample that brackets the rest. For bins that trims have cut inside, their distinct
    magnitudes (low 16 bits, descending) with cumulative counts, so a later trim in the same bin needs no
    pass; search densities settle in a few bins, and the oldest refined bins are dropped beyond `limit`
    entries (REFINED_ENTRIES per tensor summarized)."""

    numel: int
    bins: np.ndarray  # int32
    counts: np.ndarray  # int64
    above: np.ndarray  # int64: entries in higher bins
    mixed: np.ndarray  # int64
    complete: bool
    sample: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # bins, counts, above of the sample
    passes: int = 0  # counting passes so far
    refined: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    limit: int = REFINED_ENTRIES
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        arrays = (self.bins, self.counts, self.above, self.mixed, *(self.sample or ()), *(x for r in self.refined.values() for x in r))
        return sum(a.nbytes for a in arrays)

    def slot(self, rank: int) -> int | None:
        """The index of the known bin holding descending position `rank`, or None."""
        i = int(np.searchsorted(self.above, rank, side="right")) - 1
        return i if i >= 0 and rank < self.above[i] + self.counts[i] else None

    def learn(self, bins: np.ndarray, counts: np.ndarray, above: np.ndarray, mixed: np.ndarray) -> None:
        """Add exactly counted bins (empty ones are dropped)."""
        keep = counts > 0
        merged = {int(b): (c, a, m) for b, c, a, m in zip(self.bins, self.counts, self.above, self.mixed)}
        merged |= {int(b): (c, a, m) for b, c, a, m in zip(bins[keep], counts[keep], above[keep], mixed[keep])}
        order = sorted(merged, reverse=True)
        self.bins = np.array(order, np.int32)
        self.counts, self.above, self.mixed = (np.array([merged[b][k] for b in order], np.int64) for k in range(3))

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
        """Cuts at up to two descending ranks, from at most one pass over the tensor beyond what the summary
        already knows (with peers: by this tensor's owner, read by the other ranks)."""
        if self.peers is None:
            return self._cuts(ranks)
        found = self.peers.owned(f"cuts {self.key} {ranks}", lambda: tuple(x for c in self._cuts(ranks) for x in (c.value, c.larger, c.equal)),
                                 3 * len(ranks), by=self.key)
        return [Cut(found[i], int(found[i + 1]), int(found[i + 2])) for i in range(0, len(found), 3)]

    def _cuts(self, ranks: list[int]) -> list[Cut]:
        s = self.summary()
        with s.lock:  # a source tensor may be trimmed by two merge threads at once (a repeated layer)
            slots = _slots(s, ranks, self)
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
    # the tensor-parallel ranks merging shards of this candidate (a cut needing a pass is found by one of them)
    # and this vector's name, the same on every rank; a stack's trims read the whole stack on every rank
    peers: Peers | None = None
    key = ""

    def once(self, what: Hashable, fn: Callable[[], Any]) -> Any:
        """A value its trim reads: computed here (a stack shares it among its members' merges)."""
        return fn()

    limit = REFINED_ENTRIES  # refined magnitudes its summary keeps

    def summarize(self) -> Summary:
        """The summary before any trim: every bin of a small or mid-size tensor (sorted, or one histogram pass),
        a large one's bracketing sample."""
        if self.numel <= SMALL:  # norms, biases: a 2**16-slot histogram would cost more than sorting them
            w = self.delta.reshape(-1).abs().view(torch.int32).cpu().numpy()
            bins, inverse, counts = np.unique(w >> 16, return_inverse=True, return_counts=True)
            mixed = np.bincount(inverse, weights=(w & 0xFFFF) != 0, minlength=bins.size)
            return Summary(self.numel, *_descending(bins[::-1], counts[::-1], mixed[::-1]), complete=True, limit=self.limit)
        if self.numel < SAMPLE_WINDOW * SAMPLE_MIN:
            return Summary(self.numel, *_compact(*self.histogram()), complete=True, limit=self.limit)
        none = np.zeros(0, np.int64)
        bins, counts, above, _ = _compact(*self.sample_histogram())
        return Summary(self.numel, none.astype(np.int32), none, none, none, complete=False, sample=(bins, counts, above),
                       limit=self.limit)

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """Counts and mixed counts per magnitude bin (passes.histogram)."""
        return passes.histogram(*self.flat())

    def sample_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """As histogram, of the bracketing sample."""
        return passes.sample_histogram(*self.flat(), SAMPLE_WINDOW, SAMPLE_WIDTH)

    def count_at_least(self, marks: np.ndarray) -> np.ndarray:
        """Exact counts of the magnitudes at or above each float32 bit pattern (passes.count_at_least)."""
        return passes.count_at_least(*self.flat(), marks)

    def refine(self, bin0: int, bin1: int) -> tuple[np.ndarray, np.ndarray]:
        """The magnitudes' counts by low 16 bits within two bins (passes.refine)."""
        return passes.refine(*self.flat(), bin0, bin1)

    def nth_equal(self, value: float, nth: int) -> int:
        """The flat index of the nth (from 1) entry whose magnitude is `value`, in index order (if there
        are fewer: -1 - their count)."""
        if self.peers is None:
            return passes.nth_equal(*self.flat(), value, nth)
        return int(self.peers.owned(f"nth {self.key} {value!r} {nth}", lambda: (float(passes.nth_equal(*self.flat(), value, nth)),), 1,
                                    by=self.key)[0])

    def kept_l1(self, keep: Keep) -> tuple[float, float]:
        """Sums of the magnitudes `keep` keeps, and of all (for rescaling)."""
        return passes.kept_l1(*self.flat(), keep)


class Shared:
    """Values computed once per key during one merge, by the first thread that asks; a thread asking
    meanwhile waits for that one (which computes a member's statistic: it never waits itself). A value
    given `readers` is dropped once that many have asked for it (a large one, read by known members)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[Hashable, Any] = {}
        self._busy: dict[Hashable, threading.Event] = {}
        self._left: dict[Hashable, int] = {}

    def get(self, key: Hashable, fn: Callable[[], Any], readers: int | None = None) -> Any:
        with self._lock:
            if key in self._done:
                return _value(self._take(key))
            busy = self._busy.get(key)
            if busy is None:
                self._busy[key] = threading.Event()
                if readers is not None:
                    self._left[key] = readers
        if busy is not None:
            busy.wait()
            with self._lock:
                return _value(self._take(key))
        try:
            value: Any = fn()
            if torch.cuda.is_initialized():  # finished on this thread's stream before others read it on theirs
                torch.cuda.current_stream().synchronize()
        except BaseException as e:  # noqa: BLE001  handed to every waiter, then raised here too
            value = _Failed(e)
        with self._lock:
            self._done[key] = value
            self._busy.pop(key).set()
            return _value(self._take(key))

    def _take(self, key: Hashable) -> Any:
        value = self._done[key]
        if key in self._left:
            self._left[key] -= 1
            if self._left[key] == 0:
                del self._done[key], self._left[key]
        return value


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

    @property
    def limit(self) -> int:
        return REFINED_ENTRIES * len(self.members)

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        return _add(self.each("histogram", lambda _, m: m.histogram()))

    def sample_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        return _add(self.each("sample", lambda _, m: m.sample_histogram()))

    def count_at_least(self, marks: np.ndarray) -> np.ndarray:
        return sum(self.each(("count", tuple(marks.tolist())), lambda _, m: m.count_at_least(marks)))

    def cuts(self, ranks: list[int]) -> list[Cut]:
        return self.once(("cuts", *ranks), lambda: self._cuts(ranks))  # one thread updates the summary

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
        def member(i: int, m: TaskVector) -> tuple[float, float]:
            k = replace(keep, rank=self.rank(i), rank_start=int(self.starts[i])) if keep.kind == "della" else keep
            return passes.kept_l1(*m.flat(), k, int(self.starts[i]))

        sums = self.each(("kept_l1", keep), member)  # a Keep hashes by identity
        return sum(k for k, _ in sums), sum(w for _, w in sums)

    def rank(self, i: int) -> torch.Tensor:
        """DELLA's ranks of member i (see passes.stacked_rank)."""
        e = i // self.parts
        siblings = self.members[e * self.parts : (e + 1) * self.parts]
        return passes.stacked_rank([m.flat() for m in siblings], self.members[i].shape, i % self.parts)


def _add(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The histogram of a concatenation: counts add."""
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _round_cut(s: Summary, i: int) -> Cut:
    """The cut at the smallest magnitude of bin slot i, its low 16 bits zero: below every mixed entry."""
    value = float(np.array([int(s.bins[i]) << 16], np.uint32).view(np.float32)[0])
    return Cut(value, int(s.above[i] + s.mixed[i]), int(s.counts[i] - s.mixed[i]))


def _slots(s: Summary, ranks: list[int], vec: TaskVector) -> list[int]:
    """The known bins holding `ranks`, learning them first where needed: a counting pass over the bins the
    sample brackets, else (sample unlucky, too many bins, or MAX_COUNTS passes spent) the full histogram."""
    if any(s.slot(r) is None for r in ranks) and s.passes < MAX_COUNTS:
        bins = _bracket(s, ranks)
        if bins is not None:
            _count(s, vec, bins)
    if any(s.slot(r) is None for r in ranks):
        s.bins, s.counts, s.above, s.mixed = _full(vec)  # every bin: what was learned is among them
        s.complete, s.sample = True, None
    return [s.slot(r) for r in ranks]


def _bracket(s: Summary, ranks: list[int]) -> np.ndarray | None:
    """The bins the sample cannot rule out for `ranks` (four standard deviations of a sampled rank, and a
    few entries more); None when more than MAX_BRACKET, which a full histogram resolves as cheaply."""
    bins, counts, above = s.sample
    size = int(counts.sum())
    found = []
    for r in ranks:
        p = min(max(r / s.numel, 0.0), 1.0)
        q, margin = p * size, 4 * math.sqrt(size * p * (1 - p)) + 8
        hit = (above + counts > q - margin) & (above <= q + margin)
        found.extend(int(b) for b in bins[hit])
    found = sorted(set(found))
    return np.array(found, np.int64) if 0 < len(found) <= MAX_BRACKET else None


def _count(s: Summary, vec: TaskVector, bins: np.ndarray) -> None:
    """One vectorised pass: entries at or above each bin's round value, one past it, and the next bin's."""
    marks = np.unique(np.concatenate([bins << 16, (bins << 16) | 1, (bins + 1) << 16]))
    at_least = dict(zip(marks.tolist(), vec.count_at_least(marks).tolist()))
    above = np.array([at_least[(b + 1) << 16] for b in bins], np.int64)
    s.learn(bins.astype(np.int32), np.array([at_least[b << 16] for b in bins], np.int64) - above, above,
            np.array([at_least[(b << 16) | 1] for b in bins], np.int64) - above)
    s.passes += 1


def _full(vec: TaskVector) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every populated bin, from one histogram pass."""
    return _compact(*vec.histogram())


def _compact(counts: np.ndarray, mixed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A histogram's populated bins (descending), their counts, entries above and mixed counts."""
    bins = np.flatnonzero(counts)[::-1]
    return _descending(bins, counts[bins], mixed[bins])


def _descending(bins: np.ndarray, counts: np.ndarray, mixed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    c = counts.astype(np.int64)
    return bins.astype(np.int32), c, np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64), mixed.astype(np.int64)
