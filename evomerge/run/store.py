"""The run store: one SQLite file in the run directory, the single source of truth for a run.

It records the run config, every candidate the optimizer asked for (with its decoded recipe), every
evaluation, and an append-only log of the optimizer's ask/tell calls plus periodic pickled
optimizer snapshots. Resume = restore a snapshot, replay the log after it, re-send what was in flight. WAL + synchronous=FULL: a committed evaluation survives SIGKILL and power loss.

An evaluation and the 'tell' event announcing it are committed in ONE transaction before the
optimizer hears of it, so a crash between the commit and `tell` is replayed, never lost.

A genome x is stored as float64 little-endian bytes: exact (resume hands optimizers the very floats
they asked) and 8 bytes a coordinate, not ~20 as JSON text. Schema 1 stores (x as JSON text) are still
read, and resumed: opening one for writing marks it schema 2, since it then holds both forms.

Read-only openings (status, export, report, notebooks) use SQLite's read-only mode and check the file
first: a truncated or corrupted store is a one-line UserError and the file is never written.

One writer at a time: a writable store holds an flock on `run.lock` beside it (RunLock), which the OS drops
when its holder exits or is killed, so a second `run`/`resume` is refused in one line naming the holder and a
killed run never leaves a stale lock. A write the disk refuses (full, read-only) is a one-line UserError; the
transaction it was part of is rolled back, so the store stays resumable.

Below the engine floor: imports only the ground (records, recipe).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import socket
import sqlite3
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from evomerge.records import Candidate, Evaluation, Objective, UserError
from evomerge.recipe import Recipe

STORE_FILE = "run.sqlite"
LOCK_FILE = "run.lock"
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)  # 1: x as JSON text

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE candidates(
    id INTEGER PRIMARY KEY, x BLOB NOT NULL, meta TEXT NOT NULL, recipe TEXT, asked_at REAL NOT NULL);
CREATE TABLE evaluations(
    candidate_id INTEGER PRIMARY KEY REFERENCES candidates(id), seq INTEGER NOT NULL UNIQUE,
    status TEXT NOT NULL, objectives TEXT NOT NULL, per_example TEXT, error TEXT, timings TEXT NOT NULL,
    worker TEXT, cost TEXT NOT NULL, finished_at REAL NOT NULL);
CREATE TABLE events(seq INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK(kind IN ('ask', 'tell')),
    n INTEGER NOT NULL, ids TEXT NOT NULL);
CREATE TABLE snapshots(event_seq INTEGER PRIMARY KEY, state BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE sessions(id INTEGER PRIMARY KEY, started_at REAL NOT NULL, ended_at REAL, reason TEXT);
"""
# the newest snapshot taken before the last logged ask
_RESUMABLE = ("SELECT MAX(event_seq) FROM snapshots WHERE event_seq < "
              "(SELECT COALESCE(MAX(seq), 0) FROM events WHERE kind = 'ask')")
# a killed session ends at its last evaluation: one finished after it started and before the next session began
_ELAPSED = """SELECT COALESCE(SUM(COALESCE(s.ended_at, (
    SELECT MAX(e.finished_at) FROM evaluations e WHERE e.finished_at >= s.started_at
        AND e.finished_at < COALESCE((SELECT MIN(n.started_at) FROM sessions n WHERE n.id > s.id), 1e300)),
    s.started_at) - s.started_at), 0)
FROM sessions s"""
# How a session ends, as its stop reason (the journal's sessions.reason) begins: the engine writes them, the CLI,
# the status and the comparison rows read them.
BUDGET = "budget"  # "budget: evaluations", "budget: wall time", ... (the search is over)
WALL_TIME = "budget: wall time"
OPTIMIZER_DONE = "optimizer done"  # the optimizer has nothing more to ask (the search is over)
INTERRUPTED = "interrupted"  # Ctrl-C or a signal
FAILING = "failing"  # the first evaluations all failed
LOST_CLUSTER = "cluster lost"  # the Ray head vanished under it


def search_over(reason: str | None) -> bool:
    """The search reached its budget or its optimizer's end (not killed, interrupted or lost)."""
    return reason is not None and (reason.startswith(BUDGET) or reason == OPTIMIZER_DONE)


def cut_by_wall_time(reason: str | None, done: int, evaluations: int | None) -> bool:
    """The wall-time cap stopped the search before its evaluation budget: its result depends on the machine's speed."""
    return reason == WALL_TIME and evaluations is not None and done < evaluations
_TABLES = ("meta", "candidates", "evaluations", "events", "snapshots", "sessions")


@dataclass(frozen=True)
class Event:
    """One optimizer call as logged: `ask` of `n` that returned `ids`, or `tell` of the evaluations of `ids`."""

    seq: int
    kind: str
    n: int
    ids: list[int]


def store_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STORE_FILE


def is_run_dir(run_dir: str | Path) -> bool:
    return store_path(run_dir).is_file()


def _plain(v: Any) -> Any:
    """numpy scalars and arrays (optimizers' meta often holds them) as plain JSON values."""
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON-serialisable")


def _dumps(v: Any) -> str:
    return json.dumps(v, allow_nan=True, separators=(",", ":"), default=_plain)


def _pack_x(x: Sequence[float]) -> bytes:
    return struct.pack(f"<{len(x)}d", *map(float, x))


def _unpack_x(v: bytes | str, record: tuple[str, int, str]) -> list[float]:
    if isinstance(v, str):  # schema 1
        return _loads(v, record)
    return list(struct.unpack(f"<{len(v) // 8}d", v))


def _loads(text: str, record: tuple[str, Any, str]) -> Any:
    """A stored JSON value; one that does not parse is a UserError naming its record (table, key, column)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        table, key, column = record
        raise UserError(f"run store record {table} {key} ({column}) is not valid JSON ({e}); the store was "
                        "edited or damaged outside evomerge") from None


class RunLock:
    """An exclusive flock on `run.lock` in a run directory, released when closed or when its process ends in
    any way (the OS drops it). The file is never deleted (unlinking a lock file lets two holders in); it names
    the current holder for whoever is refused."""

    def __init__(self, fd: int):
        self._fd = fd

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        try:
            fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise UserError(f"cannot write to run directory {run_dir}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process still starting"
            os.close(fd)
            raise UserError(f"{run_dir} is in use by another evomerge run ({holder}); wait for it to stop, "
                            "or stop it, before running or resuming it") from None
        return cls(fd)

    @staticmethod
    def holder(run_dir: Path) -> str | None:
        """Who holds the run directory's lock now ("pid ... on HOST, started ..."), or None when no live process
        does. A shared flock probe, taken and dropped at once: read-only, and it never blocks the holder."""
        try:
            fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # no lock file: no run ever held it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process still starting"
        finally:
            os.close(fd)  # drops the probe's shared lock, if taken

    def announce(self) -> None:
        """Name this process as the holder: once the store proved usable, so a refused opening changes nothing."""
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        with contextlib.suppress(OSError):  # the holder's name is a courtesy: a full disk must not fail the run
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)

    def release(self) -> None:
        os.close(self._fd)


def _check_readable(path: Path) -> None:
    """Open `path` read-only and verify it is an intact evomerge store; UserError otherwise. Writes nothing."""
    # without a WAL to recover, check the file as immutable: SQLite then creates no -wal/-shm beside it
    immutable = "&immutable=1" if not path.with_name(path.name + "-wal").exists() else ""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro{immutable}", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            missing = [t for t in _TABLES if t not in tables]
            if missing:
                raise UserError(f"{path} is not an evomerge run store (no table {missing[0]!r})")
            check = con.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise UserError(f"run store {path} is corrupted ({check}); it was left untouched")
            row = con.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None or int(row[0]) not in READABLE_SCHEMAS:
                raise UserError(f"run store {path} has schema {row and row[0]}; this evomerge reads schemas "
                                f"{', '.join(map(str, READABLE_SCHEMAS))}: use the evomerge that wrote it")
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise UserError(f"run store {path} is corrupted or truncated ({e}); it was left untouched") from None


def _candidate(i: int, x: bytes | str, meta: str) -> Candidate:
    return Candidate(id=i, x=_unpack_x(x, ("candidates", i, "x")), meta=_loads(meta, ("candidates", i, "meta")))


class RunStore:
    """Durable record of one run. Create with `RunStore.create`, reopen with `RunStore.open`."""

    def __init__(self, con: sqlite3.Connection, path: Path, readonly: bool, lock: RunLock | None = None):
        self._con = con
        self.path = path
        self.readonly = readonly
        self._lock = lock

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, run_dir: str | Path, config: dict[str, Any], *, objectives: Sequence[Objective],
        space_names: Sequence[str], seed: int | None = None, sources: dict[str, dict[str, str]] | None = None,
    ) -> RunStore:
        """A new store in `run_dir` (created if needed); refuses a directory that already holds a run. A store
        that cannot be written (full disk, read-only or unwritable place) is a UserError that leaves nothing:
        no half-created store, and no run directory where there was none."""
        run_dir = Path(run_dir)
        path = store_path(run_dir)
        if path.exists():
            raise UserError(f"{run_dir} already holds a run; resume it with `evomerge resume {run_dir}`")
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"run directory {run_dir} exists and is not a directory")
        made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        tmp = path.with_name(STORE_FILE + ".creating")
        lock, created = None, False
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock.acquire(run_dir)
            if path.exists():  # another process created it meanwhile
                raise UserError(f"{run_dir} already holds a run; resume it with `evomerge resume {run_dir}`")
            tmp.unlink(missing_ok=True)
            con = sqlite3.connect(tmp)
            try:
                with con:
                    con.executescript(_SCHEMA)
                    meta = {
                        "schema": str(SCHEMA_VERSION),
                        "config": _dumps(config),
                        "objectives": _dumps([[o.name, o.direction] for o in objectives]),
                        "space_names": _dumps(list(space_names)),
                        "seed": _dumps(seed),
                        "created_at": _dumps(time.time()),
                        "sources": _dumps(sources),  # each source's files and their sha256 (evomerge/merge/identity.py)
                    }
                    con.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
            finally:
                con.close()
            tmp.rename(path)  # a half-created store never carries the real name
            created = True
            return cls._writable(run_dir, lock)
        except (OSError, sqlite3.Error, UserError) as e:
            # what this call wrote: the store being created, or the new store that then could not be opened
            for f in [tmp] + ([path.with_name(STORE_FILE + x) for x in ("", "-wal", "-shm")] if created else []):
                with contextlib.suppress(OSError):  # absent, or never creatable (run_dir under a file)
                    f.unlink()
            if lock is not None:
                if made:  # nobody else knows this directory yet: leave no trace of it
                    (run_dir / LOCK_FILE).unlink(missing_ok=True)
                lock.release()
            for p in made:
                with contextlib.suppress(OSError):
                    p.rmdir()
            if isinstance(e, UserError):
                raise
            raise UserError(f"cannot create the run store in {run_dir}: {getattr(e, 'strerror', None) or e}") from None

    @classmethod
    def open(cls, run_dir: str | Path, *, readonly: bool = False) -> RunStore:
        path = store_path(run_dir)
        if not path.is_file():
            raise UserError(f"{run_dir} is not an evomerge run directory (no {STORE_FILE})")
        if readonly:
            _check_readable(path)
            return cls(sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False), path, True)
        lock = RunLock.acquire(Path(run_dir))  # before reading: the holder may be mid-write
        try:
            _check_readable(path)
            return cls._writable(Path(run_dir), lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _writable(cls, run_dir: Path, lock: RunLock) -> RunStore:
        path = store_path(run_dir)
        con = sqlite3.connect(path, check_same_thread=False)
        store = cls(con, path, False, lock)
        try:
            with store._writing():
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=FULL")
                # a schema 1 store gets x as bytes from now on, which an evomerge reading only 1 would misread
                con.execute("UPDATE meta SET value=?1 WHERE key='schema' AND value != ?1", (str(SCHEMA_VERSION),))
        except UserError:
            con.close()  # the caller releases the lock
            raise
        lock.announce()
        return store

    @contextlib.contextmanager
    def _writing(self):
        """One transaction; a write the disk refuses is a UserError naming the store, the transaction rolled back."""
        try:
            with self._con:
                yield
        except sqlite3.OperationalError as e:
            raise UserError(f"cannot write run store {self.path}: {e}") from None

    def close(self) -> None:
        self._con.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- run facts -----------------------------------------------------------------------------
    def _meta(self, key: str) -> Any:
        row = self._con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else _loads(row[0], ("meta", key, "value"))

    @property
    def config(self) -> dict[str, Any]:
        return self._meta("config")

    @property
    def objectives(self) -> list[Objective]:
        return [Objective(n, d) for n, d in self._meta("objectives")]

    @property
    def space_names(self) -> list[str]:
        return self._meta("space_names")

    @property
    def sources(self) -> dict[str, dict[str, str]] | None:
        """The sources' identity recorded when the run started (None: a run without models, or an older store)."""
        return self._meta("sources")

    # ---- writes: each is one transaction ---------------------------------------------------------
    def record_ask(self, n: int, candidates: Sequence[Candidate], recipes: Sequence[Recipe | None] | None = None) -> None:
        """Log `ask(n)` and the candidates it returned (possibly none)."""
        recipes = list(recipes) if recipes is not None else [None] * len(candidates)
        now = time.time()
        # no fsync for an ask: it survives a killed process (WAL), and the next evaluation's fsync makes it
        # durable against power loss too; a lost ask is simply asked again on resume
        self._con.execute("PRAGMA synchronous=NORMAL")
        with self._writing():
            self._con.executemany(
                "INSERT INTO candidates VALUES (?, ?, ?, ?, ?)",
                [(c.id, _pack_x(c.x), _dumps(c.meta), None if r is None else _dumps(r.to_dict()), now)
                 for c, r in zip(candidates, recipes)],
            )
            self._con.execute("INSERT INTO events(kind, n, ids) VALUES ('ask', ?, ?)", (n, _dumps([c.id for c in candidates])))
        self._con.execute("PRAGMA synchronous=FULL")

    def record_evaluations(self, evaluations: Sequence[Evaluation]) -> None:
        """Commit evaluations and the 'tell' event that hands them to the optimizer, atomically."""
        if not evaluations:
            return
        now = time.time()
        with self._writing():
            seq = self._con.execute("SELECT COALESCE(MAX(seq), 0) FROM evaluations").fetchone()[0]
            rows = []
            for i, e in enumerate(evaluations, start=1):
                rows.append((e.candidate_id, seq + i, e.status, _dumps(e.objectives), None if e.per_example is None
                             else _dumps(e.per_example), e.error, _dumps(e.timings), e.worker, _dumps(e.cost), now))
            self._con.executemany("INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._con.execute("INSERT INTO events(kind, n, ids) VALUES ('tell', ?, ?)",
                              (len(evaluations), _dumps([e.candidate_id for e in evaluations])))

    def set_config(self, config: dict[str, Any]) -> None:
        """Replace the stored config (resume with a larger budget)."""
        with self._writing():
            self._con.execute("UPDATE meta SET value=? WHERE key='config'", (_dumps(config),))

    def record_snapshot(self, state: Any) -> None:
        """Pickle the optimizer state as it stands after the last logged event."""
        blob = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        with self._writing():
            seq = self._con.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
            self._con.execute("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?)", (seq, blob, time.time()))
            # keep only what `resume_snapshot` may pick: the file stays small on runs of days
            self._con.execute(f"DELETE FROM snapshots WHERE event_seq < COALESCE(({_RESUMABLE}), 0)")

    def begin_session(self) -> int:
        with self._writing():
            cur = self._con.execute("INSERT INTO sessions(started_at) VALUES (?)", (time.time(),))
        return int(cur.lastrowid)

    def end_session(self, session: int, reason: str) -> None:
        with self._writing():
            self._con.execute("UPDATE sessions SET ended_at=?, reason=? WHERE id=?", (time.time(), reason, session))

    def end_session_apart(self, session: int, reason: str) -> None:
        """`end_session` from another thread, on a connection of its own: the store's may be inside a transaction
        of the main thread, which this commit must not take along half-done."""
        con = sqlite3.connect(self.path, timeout=30)
        try:
            with con:
                con.execute("UPDATE sessions SET ended_at=?, reason=? WHERE id=?", (time.time(), reason, session))
        finally:
            con.close()

    # ---- reads ---------------------------------------------------------------------------------
    def resume_snapshot(self) -> tuple[int, Any] | None:
        """The newest snapshot that some logged ask follows: replaying that ask checks that the snapshot
        restores the optimizer exactly (a snapshot at the very end of the log could not be checked)."""
        row = self._con.execute(f"SELECT event_seq, state FROM snapshots WHERE event_seq = ({_RESUMABLE})").fetchone()
        return None if row is None else (int(row[0]), pickle.loads(row[1]))

    def events(self, after: int = 0) -> list[Event]:
        return [Event(s, k, n, _loads(ids, ("events", s, "ids"))) for s, k, n, ids in
                self._con.execute("SELECT seq, kind, n, ids FROM events WHERE seq > ? ORDER BY seq", (after,))]

    def candidates(self, ids: Iterable[int] | None = None) -> dict[int, Candidate]:
        if ids is None:
            rows = self._con.execute("SELECT id, x, meta FROM candidates ORDER BY id")
        else:  # select in SQL: reading every genome to keep one costs seconds on a large run
            rows = self._con.execute("SELECT id, x, meta FROM candidates WHERE id IN (SELECT value FROM json_each(?)) "
                                     "ORDER BY id", (_dumps(sorted(set(ids))),))
        return {i: _candidate(i, x, m) for i, x, m in rows}

    def candidate_meta(self) -> dict[int, dict[str, Any]]:
        """Every candidate's meta (optimizer bookkeeping, scoring plans), without reading the genomes."""
        return {i: _loads(m, ("candidates", i, "meta")) for i, m in self._con.execute("SELECT id, meta FROM candidates ORDER BY id")}

    def recipe(self, candidate_id: int) -> Recipe:
        row = self._con.execute("SELECT recipe FROM candidates WHERE id=?", (candidate_id,)).fetchone()
        if row is None:
            raise UserError(f"no candidate {candidate_id} in this run")
        if row[0] is None:
            raise UserError(f"candidate {candidate_id} has no recorded recipe")
        return Recipe.from_dict(_loads(row[0], ("candidates", candidate_id, "recipe")))

    def recipes(self, ids: Iterable[int]) -> dict[int, Recipe]:
        """The recorded recipes of `ids` (candidates without one are left out), read in one query."""
        rows = self._con.execute("SELECT id, recipe FROM candidates WHERE recipe IS NOT NULL AND id IN "
                                 "(SELECT value FROM json_each(?))", (_dumps(sorted(set(ids))),))
        return {i: Recipe.from_dict(_loads(r, ("candidates", i, "recipe"))) for i, r in rows}

    def genomes(self, ids: Sequence[int], columns: Sequence[int] | None = None):
        """The genomes of `ids`, in that order, as rows of a float64 numpy matrix keeping only `columns`:
        no Python float per coordinate, so 1,000 genomes of 19,210 dimensions cost 150 MB, not 1.2 GB."""
        import numpy as np

        cols = slice(None) if columns is None else list(columns)
        kept = {}  # one blob at a time: only the kept columns of each stay in memory
        for i, b in self._con.execute("SELECT id, x FROM candidates WHERE id IN (SELECT value FROM json_each(?))",
                                      (_dumps(sorted(set(ids))),)):
            kept[i] = (np.frombuffer(b, dtype="<f8") if isinstance(b, bytes) else np.asarray(_loads(b, ("candidates", i, "x"))))[cols].copy()
        rows = [kept[i] for i in ids]
        return np.stack(rows) if rows else np.zeros((0, 0 if columns is None else len(cols)))

    def evaluations(self, after: int = 0, per_example: bool = True) -> list[Evaluation]:
        """Every evaluation, in commit order; with `after=n`, those numbered n+1, n+2, ... (numbers run 1, 2, ...
        without gaps, so the k-th one returned is evaluation n+k). `per_example=False` leaves the per-example
        scores unread (None): tables and trackers do not need them, and they are most of a large run's reading."""
        out = []
        pe_col = "per_example" if per_example else "NULL"
        for cid, _seq, status, obj, pe, err, tim, worker, cost, _t in self._con.execute(
                "SELECT candidate_id, seq, status, objectives, " + pe_col + ", error, timings, worker, cost, finished_at "
                "FROM evaluations WHERE seq > ? ORDER BY seq", (after,)):
            out.append(Evaluation(candidate_id=cid, status=status, objectives=_loads(obj, ("evaluations", cid, "objectives")),
                                  per_example=None if pe is None else _loads(pe, ("evaluations", cid, "per_example")),
                                  error=err, timings=_loads(tim, ("evaluations", cid, "timings")), worker=worker,
                                  cost=_loads(cost, ("evaluations", cid, "cost"))))
        return out

    def in_flight(self) -> list[Candidate]:
        """Candidates asked but never evaluated (running or queued when the run stopped), in id order."""
        rows = self._con.execute(
            "SELECT id, x, meta FROM candidates WHERE id NOT IN (SELECT candidate_id FROM evaluations) ORDER BY id")
        return [_candidate(i, x, m) for i, x, m in rows]

    def counts(self) -> dict[str, int]:
        done, failed = self._con.execute(
            "SELECT COUNT(*), COALESCE(SUM(status != 'ok'), 0) FROM evaluations").fetchone()
        asked = self._con.execute("SELECT COUNT(*) FROM candidates").fetchone()[0]
        return {"evaluations": int(done), "failed": int(failed), "in_flight": int(asked - done)}

    def total_cost(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for cid, cost in self._con.execute("SELECT candidate_id, cost FROM evaluations"):
            for k, v in _loads(cost, ("evaluations", cid, "cost")).items():
                total[k] = total.get(k, 0.0) + float(v)
        return total

    def elapsed(self) -> float:
        """Seconds spent running over all sessions (wall-time budgets span resumes). A session that never ended
        (its driver was killed) counts up to its last recorded evaluation: a run that keeps crashing still
        reaches its wall-time budget."""
        row = self._con.execute(_ELAPSED).fetchone()
        return float(row[0])

    def sessions(self) -> list[dict[str, Any]]:
        return [dict(id=i, started_at=s, ended_at=e, reason=r)
                for i, s, e, r in self._con.execute("SELECT * FROM sessions ORDER BY id")]

