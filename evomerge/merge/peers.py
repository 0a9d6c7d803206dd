"""Sums shared by the processes that each merge a part of the same candidate: the tensor-parallel ranks of one
engine on one node (evomerge.fitness.vllm_handle).

A rescaled trim needs two L1 norms of a whole task vector for every candidate (mergekit's rescale: kept over
all), a pass over the whole tensor. Each rank instead sums a fixed share of it, the same cut on every rank
whatever shard its loaders keep (`block`), posts its two partial sums, and adds everyone's in rank order, so
every rank gets the same floats and reads 1/k of the tensor for the norms, as it reads 1/k for its merge.
A magnitude trim's cut may need a pass over the whole tensor too (vectors.TaskVector.cuts): one rank per
task vector, its owner, finds it and posts it, the others read it (`owned`). The owners are dealt out by size
(`deal`, the same on every rank; a tensor's experts to different ranks), so each rank makes about 1/k of
those passes' bytes.

The exchange is a folder the ranks share (in memory: /dev/shm where there is one), a file per (candidate,
tensor, model, rank), each written whole (a temporary name, then a rename) so a reader never sees half a
number. Candidates are numbered by each rank's own count of merges (`next`), which agree because every rank
merges every candidate the engine is sent.
"""
from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from evomerge.machine import write_whole

WAIT = 600.0  # seconds a rank waits for the others' partial sums before it gives up (a rank died)


@dataclass
class Peers:
    folder: Path
    rank: int
    ranks: int
    generation: int = 0
    owners: dict[str, int] = field(default_factory=dict)  # task vector -> the rank finding its cuts

    def block(self, n: int) -> tuple[int, int]:
        """This rank's share [start, end) of n entries: contiguous, together the whole, the same cut on every rank."""
        return n * self.rank // self.ranks, n * (self.rank + 1) // self.ranks

    def deal(self, sizes: dict[str, int]) -> None:
        """Owners for the task vectors of a merge: largest first, each to the rank with the fewest entries so far."""
        load = [0] * self.ranks
        self.owners = {}
        for name, n in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
            rank = min(range(self.ranks), key=lambda r: (load[r], r))
            self.owners[name] = rank
            load[rank] += n

    def next(self) -> None:
        """A new candidate; the files this rank posted two candidates ago are read by everyone (each rank that
        posted for the last candidate had finished the one before), so they go."""
        self.generation += 1
        for old in self.folder.glob(f"{self.generation - 2}.*.{self.rank}"):
            old.unlink(missing_ok=True)

    def total(self, key: str, values: tuple[float, ...]) -> tuple[float, ...]:
        """The sums over every rank of `values` (this rank's partial sums for `key`)."""
        stem = self._stem(key)
        self._post(stem, values)
        parts = [self._read(self.folder / f"{stem}.{r}", len(values), key, r) for r in range(self.ranks)]
        return tuple(sum(p[i] for p in parts) for i in range(len(values)))

    def owned(self, key: str, fn: Callable[[], tuple[float, ...]], n: int, by: str) -> tuple[float, ...]:
        """fn()'s n values for `key`, computed by the owner of task vector `by` only (the same rank for every key
        of one vector, so the statistics it keeps across candidates serve it again) and read by the others."""
        stem, owner = self._stem(key), self.owners[by]
        if owner != self.rank:
            return self._read(self.folder / f"{stem}.{owner}", n, key, owner)
        values = fn()
        self._post(stem, values)
        return values

    def _stem(self, key: str) -> str:
        return f"{self.generation}.{hashlib.sha1(key.encode()).hexdigest()[:20]}"

    def _post(self, stem: str, values: tuple[float, ...]) -> None:
        mine = self.folder / f"{stem}.{self.rank}"
        write_whole(mine, struct.pack(f"<{len(values)}d", *values))

    def _read(self, path: Path, n: int, key: str, rank: int) -> tuple[float, ...]:
        deadline, pause = time.monotonic() + WAIT, 1e-4
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel rank {rank} posted nothing for {key} in {WAIT:g} s "
                                   f"(did it stop?); folder {self.folder}")
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        return struct.unpack(f"<{n}d", path.read_bytes())
