"""The search loop: steady state, durable, resumable.

As soon as a worker is free the optimizer is asked for the next candidate (generational optimizers are
asked ahead within their generation and may answer with fewer, even none). Every ask and every
evaluation is committed to the run store before the optimizer is told, so the store alone can rebuild
the run: resume = restore an optimizer snapshot (taken every `snapshot_every` tells), replay the logged
ask/tell calls after it, and re-send the candidates that were in flight. With a deterministic optimizer and fitness and the local
executor, a run killed any number of times ends with the same history as one never interrupted. Snapshots only
shorten that replay: one that cannot be written or read back (a library release that changed its objects) costs a
warning and a replay of the whole log, never the run.

Ctrl-C: stop asking; workers that run elsewhere (Ray) finish their candidates, a second Ctrl-C abandons
them; an in-process evaluation is abandoned at once. Abandoned candidates stay 'in flight' in the store
and are evaluated on resume.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from evomerge.fitness.partial import to_json
from evomerge.run.executors import Executor, LocalExecutor
from evomerge.run.frugal import Planner
from evomerge.records import Evaluation, Objective, UserError
from evomerge.recipe import Recipe
from evomerge.run.store import BUDGET, FAILING, INTERRUPTED, LOST_CLUSTER, OPTIMIZER_DONE, WALL_TIME, RunStore

log = logging.getLogger("evomerge")


@dataclass
class Budget:
    """When to stop asking: whichever limit is reached first. None means unlimited."""

    evaluations: int | None = None
    wall_time: float | None = None  # seconds of running, summed over resumed sessions
    cost: float | None = None  # summed over evaluations' cost[cost_key]
    cost_key: str = "usd"
    examples: int | None = None  # examples scored (cost["examples"]), summed over evaluations
    tokens: int | None = None  # API prompt + completion tokens


def spent(cost: dict[str, float]) -> tuple[float, float]:
    """(examples scored, API tokens) of a cost record or total."""
    return cost.get("examples", 0.0), cost.get("prompt_tokens", 0.0) + cost.get("completion_tokens", 0.0)


@dataclass
class Progress:
    """What the progress bar shows, handed to `on_progress` after every recorded evaluation."""

    done: int
    failed: int
    in_flight: int
    total: int | None
    elapsed: float
    evals_per_min: float
    best: dict[str, float] = field(default_factory=dict)
    examples: float = 0.0  # examples scored so far


FAIL_FAST = 10  # evaluations failing in a row with none ever succeeding: a broken set-up, not a bad region


class ReplayMismatch(RuntimeError):
    """The optimizer, replayed from the store, asked for other candidates than it did originally."""


class Engine:
    def __init__(
        self, store: RunStore, make_optimizer: Callable[[], Any], executor: Executor, *, budget: Budget,
        decode: Callable[[np.ndarray], Recipe] | None = None, snapshot_every: int = 20,
        on_progress: Callable[[Progress], None] | None = None, planner: Planner | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.store, self.make_optimizer, self.executor = store, make_optimizer, executor
        self.optimizer: Any = None
        self.budget = budget
        self.decode = decode
        self.snapshot_every = snapshot_every
        self.on_progress = on_progress
        self.objectives: list[Objective] = store.objectives
        self.stop_reason: str | None = None
        self._tells_since_snapshot = 0
        self._ask_starved = False  # the last ask returned nothing and nothing was told since
        self._best: dict[str, float] = {}
        self.planner = planner  # racing / subset + estimate (evomerge/run/frugal.py), or None: score everything
        self._meta: dict[int, dict[str, Any]] = {}  # candidates in flight -> their meta (scoring plans)
        self.config = config  # a resumed run's config with a raised budget: stored once its log replayed
        self._lost_lock = threading.Lock()

    # ---- resume ----------------------------------------------------------------------------------
    def restore(self) -> int:
        """Bring a fresh optimizer to where the store says it was: from a snapshot plus the events after it
        (at least one ask, which checks the snapshot); should that replay diverge (an optimizer whose
        state_dict is not exact), from the start of the log, which is the truth. Returns the number of
        events replayed."""
        try:
            snap = self.store.resume_snapshot()
            if snap is not None:
                return self._replay(*snap)
        except ReplayMismatch as e:
            log.warning("evomerge: %s; replaying the whole log instead", e)
        except UserError:  # the store itself cannot be read (a record that does not parse): replaying would not help
            raise
        except Exception as e:  # a snapshot another library release wrote (unpickling fails, or StateMismatch)
            log.warning("evomerge: the optimizer snapshot could not be restored (%s: %s); replaying the whole log "
                        "instead", type(e).__name__, e)
        return self._replay(0, None)

    def _replay(self, after: int, state: Any) -> int:
        self.optimizer = self.make_optimizer()
        if state is not None:
            self.optimizer.load_state_dict(state)
        evals = {e.candidate_id: e for e in self.store.evaluations()}
        events = self.store.events(after)
        stored = self.store.candidates({i for ev in events if ev.kind == "ask" for i in ev.ids})
        for ev in events:
            if ev.kind == "ask":
                got = self.optimizer.ask(ev.n)
                if [c.id for c in got] != ev.ids or any(
                        not np.allclose(c.x, stored[c.id].x, rtol=0, atol=1e-12) for c in got):
                    raise ReplayMismatch(
                        f"replaying ask #{ev.seq}{' from a snapshot' if state is not None else ''}: the optimizer "
                        f"returned other candidates than the recorded {ev.ids}; it is not deterministic under its seed")
            else:
                self.optimizer.tell([evals[i] for i in ev.ids])
        for e in evals.values():
            self._update_best(e)
        if self.planner is not None:  # its state is a function of the journal: observe it again, in commit order
            self.planner.reset()
            meta = self.store.candidate_meta()
            for e in evals.values():  # commit order
                self.planner.observe(meta[e.candidate_id], e)
        last = events[-1] if events else None
        self._ask_starved = last is not None and last.kind == "ask" and len(last.ids) < last.n
        return len(events)

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> str:
        """Run until the budget is spent, the optimizer is done, or Ctrl-C. Returns why it stopped."""
        self.restore()  # before anything is written: a store that cannot be replayed stays untouched
        if self.config is not None:
            self.store.set_config(self.config)
        session = self.store.begin_session()
        if hasattr(self.executor, "on_lost"):  # a cluster executor: its head may vanish under the run
            self.executor.on_lost = lambda gcs, address: self._cluster_lost(session, gcs, address)
        self._t0 = time.monotonic()
        self._elapsed_before = self.store.elapsed()
        counts = self.store.counts()
        self._done, self._failed = counts["evaluations"], counts["failed"]
        # failures in a row while nothing ever succeeded, and the first one's error
        self._succeeded, self._failing, self._first_error = self._done > self._failed, 0, ""
        self._examples, self._tokens = spent(self.store.total_cost())
        self._done_at_start = self._done
        interrupts = 0
        try:
            try:
                self.executor.start()
                for cand in self.store.in_flight():
                    self._meta[cand.id] = cand.meta
                    self.executor.submit(cand)
            except KeyboardInterrupt:  # before anything ran: nothing to finish
                self.stop_reason = INTERRUPTED
                return self.stop_reason
            while True:
                try:
                    if self.stop_reason is None:
                        self.stop_reason = self._budget_reason()
                    if self.stop_reason is None:
                        self._fill()
                    if not self.executor.pending() and self.stop_reason is None and self.executor.idle() <= 0:
                        self._record(self.executor.wait(timeout=1.0))  # every worker is being replaced: not done
                        continue
                    if not self.executor.pending():
                        if self.stop_reason is None and self._ask_starved:
                            raise RuntimeError("the optimizer returned no candidate while none is being evaluated")
                        self.stop_reason = self.stop_reason or OPTIMIZER_DONE
                        break
                    self._record(self.executor.wait(timeout=1.0))
                except KeyboardInterrupt:
                    interrupts += 1
                    self.stop_reason = INTERRUPTED
                    if interrupts > 1 or isinstance(self.executor, LocalExecutor):
                        break  # abandon: what is in flight stays so in the store
        finally:
            if self.stop_reason is None:
                self.stop_reason = "error"
            try:
                self.store.end_session(session, self.stop_reason)
            finally:
                self.executor.shutdown()
        return self.stop_reason

    def _cluster_lost(self, session: int, gcs: str, address: str | None) -> None:
        """The cluster's head stopped answering: Ray's driver would freeze for a minute, then abort in C++. The
        session is marked as ended by a lost cluster (on a connection of its own: this is the executor's watchdog
        thread), one line says how to resume, and the process ends; what was in flight is re-run by the resume."""
        with self._lost_lock:  # a second caller waits here for the exit
            self.store.end_session_apart(session, f"{LOST_CLUSTER}: the Ray head at {gcs} stopped answering")
            resume = f"evomerge resume {self.store.path.parent}" + (f" --address {address}" if address else "")
            where = address if address and address != "auto" else gcs
            print(f"evomerge: lost the Ray cluster at {where} (its head stopped answering); the session is marked as "
                  f"ended by a lost cluster; start the cluster again, then: {resume}", file=sys.stderr, flush=True)
            os._exit(3)

    def _budget_reason(self) -> str | None:
        b = self.budget
        if b.evaluations is not None and self._done >= b.evaluations:
            return f"{BUDGET}: evaluations"
        if b.wall_time is not None and self._elapsed() >= b.wall_time:
            return WALL_TIME
        if b.cost is not None and self.store.total_cost().get(b.cost_key, 0.0) >= b.cost:
            return f"{BUDGET}: cost"
        if b.examples is not None and self._examples >= b.examples:
            return f"{BUDGET}: examples"
        if b.tokens is not None and self._tokens >= b.tokens:
            return f"{BUDGET}: tokens"
        if getattr(self.optimizer, "done", False):
            return OPTIMIZER_DONE
        if self._failing >= FAIL_FAST:
            return (f"{FAILING}: the first {self._failing} evaluations all failed, the first with: "
                    + " ".join(self._first_error.split())[:300])
        return None

    def _fill(self) -> None:
        """Give every idle worker a candidate, asking the optimizer for as many as are free."""
        if self._ask_starved:
            return
        n = self.executor.idle()
        if self.budget.evaluations is not None:
            n = min(n, self.budget.evaluations - self._done - len(self.executor.pending()))
        if n <= 0:
            return
        cands = self.optimizer.ask(n)
        if self.planner is not None:
            for c in cands:
                plan = self.planner.plan(c)
                if plan is not None:
                    c.meta["scoring"] = to_json(plan)  # journalled with the ask: a resumed run re-sends the same plan
        recipes = [self._decode(c.x) for c in cands] if self.decode else None
        self.store.record_ask(n, cands, recipes)
        self._ask_starved = len(cands) < n
        for c in cands:
            self._meta[c.id] = c.meta
            self.executor.submit(c)

    def _decode(self, x: list[float]) -> Recipe | None:
        try:
            return self.decode(np.asarray(x))
        except Exception:  # the worker decodes too and records the error as this candidate's failure
            return None

    def _record(self, evals: list[Evaluation]) -> None:
        if not evals:
            return
        metas = [self._meta.pop(e.candidate_id, {}) for e in evals]
        if self.planner is not None:
            evals = [self.planner.complete(m, e) for m, e in zip(metas, evals)]
        self.store.record_evaluations(evals)  # durable before the optimizer hears of them
        self.optimizer.tell(evals)
        self._ask_starved = False
        self._done += len(evals)
        self._failed += sum(not e.ok for e in evals)
        for m, e in zip(metas, evals):
            self._succeeded = self._succeeded or e.ok
            if not self._succeeded:
                self._first_error = self._first_error or e.error or "a non-finite objective"
                self._failing += 1
            self._update_best(e)
            examples, tokens = spent(e.cost)
            self._examples += examples
            self._tokens += tokens
            if self.planner is not None:
                self.planner.observe(m, e)
        self._tells_since_snapshot += 1
        if self._tells_since_snapshot >= self.snapshot_every:
            self._snapshot()
            self._tells_since_snapshot = 0
        if self.on_progress:
            self.on_progress(self.progress())

    def _snapshot(self) -> None:
        """Snapshots only shorten a resume (the log alone restores the optimizer): one whose library state will not
        serialize (a new release of it) stops the snapshots with a warning, never the run."""
        try:
            self.store.record_snapshot(self.optimizer.state_dict())
        except Exception as e:
            log.warning("evomerge: the optimizer's state cannot be snapshotted (%s: %s); resumes will be slower, "
                        "replaying the whole log", type(e).__name__, e)
            self.snapshot_every = math.inf

    def _update_best(self, e: Evaluation) -> None:
        if not e.ok:
            return
        for o in self.objectives:
            v = e.objectives.get(o.name)
            if v is not None and math.isfinite(v):
                cur = self._best.get(o.name)
                if cur is None or v * o.sign() > cur * o.sign():
                    self._best[o.name] = v

    def _elapsed(self) -> float:
        return self._elapsed_before + time.monotonic() - self._t0

    def progress(self) -> Progress:
        session_s = time.monotonic() - self._t0
        rate = (self._done - self._done_at_start) / session_s * 60 if session_s > 0 else 0.0
        return Progress(done=self._done, failed=self._failed, in_flight=len(self.executor.pending()),
                        total=self.budget.evaluations, elapsed=self._elapsed(), evals_per_min=rate,
                        best=dict(self._best), examples=self._examples)
