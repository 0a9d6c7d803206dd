"""The engine loop in process: budgets, replay from the log when a snapshot is not exact, refusal to
resume a run whose optimizer cannot replay it."""
from __future__ import annotations

import sys
import threading
import time
import types

import numpy as np
import pytest

from evomerge.run.engine import Budget, Engine, ReplayMismatch
from evomerge.run.executors import LocalExecutor
from evomerge.optimizers.random import RandomSearch
from evomerge.records import Candidate, Evaluation, Objective
from evomerge.run.store import RunStore

OBJ = [Objective("score", "max")]
BOUNDS = np.array([[0.0, 1.0]] * 2)


class Scorer:
    """Deterministic fitness with an optional latency and cost per evaluation."""

    def __init__(self, sleep: float = 0.0, usd: float = 0.0):
        self.sleep, self.usd = sleep, usd

    def evaluate(self, c: Candidate) -> Evaluation:
        time.sleep(self.sleep)
        return Evaluation(c.id, objectives={"score": -sum((v - 0.3) ** 2 for v in c.x)}, cost={"usd": self.usd})


class ForgetfulRandom(RandomSearch):
    """A real optimizer whose snapshot forgets its generator state (as a buggy back end might)."""

    def _state(self):
        return {"best": self._best}

    def _load(self, state):
        self._best = state["best"]


def _engine(path, budget: Budget, scorer=None, make=None, snapshot_every: int = 3) -> Engine:
    store = RunStore.open(path) if (path / "run.sqlite").exists() else RunStore.create(
        path, {"test": True}, objectives=OBJ, space_names=["x0", "x1"], seed=0)
    make = make or (lambda: RandomSearch(bounds=BOUNDS, objectives=OBJ, seed=0))
    return Engine(store, make, LocalExecutor(lambda: scorer or Scorer()), budget=budget,
                  snapshot_every=snapshot_every)


def _history(path):
    with RunStore.open(path, readonly=True) as s:
        c = s.candidates()
        return [(e.candidate_id, c[e.candidate_id].x, e.objectives) for e in s.evaluations()]


def test_wall_time_budget_spans_sessions(tmp_path):
    e = _engine(tmp_path / "r", Budget(wall_time=0.6), Scorer(sleep=0.1))
    assert e.run() == "budget: wall time"
    n = e.store.counts()["evaluations"]
    assert 3 <= n <= 8
    e.store.close()
    # a resumed run has already spent its time: it stops at once
    e = _engine(tmp_path / "r", Budget(wall_time=0.6), Scorer(sleep=0.1))
    assert e.run() == "budget: wall time" and e.store.counts()["evaluations"] == n


def test_cost_budget(tmp_path):
    e = _engine(tmp_path / "r", Budget(cost=1.0), Scorer(usd=0.4))
    assert e.run() == "budget: cost"
    assert e.store.counts()["evaluations"] == 3 and e.store.total_cost()["usd"] == pytest.approx(1.2)


def test_inexact_snapshot_falls_back_to_replaying_the_log(tmp_path, caplog):
    make = lambda: ForgetfulRandom(bounds=BOUNDS, objectives=OBJ, seed=0)  # noqa: E731
    ref = _engine(tmp_path / "ref", Budget(evaluations=12), make=make)
    ref.run()
    e = _engine(tmp_path / "r", Budget(evaluations=5), make=make)
    e.run()
    e.store.close()
    e = _engine(tmp_path / "r", Budget(evaluations=12), make=make)
    e.run()
    assert "replaying the whole log" in caplog.text
    assert _history(tmp_path / "r") == _history(tmp_path / "ref")


class UnpicklableRandom(RandomSearch):
    """A real optimizer whose state does not serialize (as a live optuna 5.1 study does not)."""

    def _state(self):
        return {"lock": threading.Lock()}


def test_a_state_that_cannot_be_snapshotted_stops_snapshots_not_the_run(tmp_path, caplog):
    ref = _engine(tmp_path / "ref", Budget(evaluations=12))
    ref.run()
    make = lambda: UnpicklableRandom(bounds=BOUNDS, objectives=OBJ, seed=0)  # noqa: E731
    e = _engine(tmp_path / "r", Budget(evaluations=5), make=make)
    assert e.run() == "budget: evaluations"
    e.store.close()
    assert caplog.text.count("cannot be snapshotted") == 1
    e = _engine(tmp_path / "r", Budget(evaluations=12), make=make)  # resumed from the log alone
    e.run()
    assert _history(tmp_path / "r") == _history(tmp_path / "ref")


def test_a_snapshot_another_release_wrote_is_skipped_for_the_log(tmp_path, caplog, monkeypatch):
    """A snapshot that no longer unpickles (its class moved in a library upgrade): resume replays the log."""
    gone = types.ModuleType("evomerge_gone_release")

    class Old:
        pass

    Old.__module__, Old.__qualname__ = gone.__name__, "Old"
    gone.Old = Old
    monkeypatch.setitem(sys.modules, gone.__name__, gone)

    class OldStateRandom(RandomSearch):
        def _state(self):
            return {**super()._state(), "old": Old()}

        def _load(self, state):
            super()._load(state)

    make = lambda: OldStateRandom(bounds=BOUNDS, objectives=OBJ, seed=0)  # noqa: E731
    _engine(tmp_path / "ref", Budget(evaluations=12), make=make).run()
    e = _engine(tmp_path / "r", Budget(evaluations=7), make=make)
    e.run()
    e.store.close()
    monkeypatch.delitem(sys.modules, gone.__name__)
    e = _engine(tmp_path / "r", Budget(evaluations=12), make=make)
    e.run()
    assert "could not be restored (ModuleNotFoundError" in caplog.text
    assert _history(tmp_path / "r") == _history(tmp_path / "ref")


def test_a_run_that_cannot_be_replayed_is_refused_untouched(tmp_path):
    e = _engine(tmp_path / "r", Budget(evaluations=4), snapshot_every=100)  # no snapshot: replay from the start
    e.run()
    e.store.close()
    before = (RunStore.open(tmp_path / "r", readonly=True).sessions(), _history(tmp_path / "r"))
    other_seed = lambda: RandomSearch(bounds=BOUNDS, objectives=OBJ, seed=99)  # noqa: E731
    e = _engine(tmp_path / "r", Budget(evaluations=8), make=other_seed, snapshot_every=100)
    with pytest.raises(ReplayMismatch, match="not deterministic"):
        e.run()
    assert (RunStore.open(tmp_path / "r", readonly=True).sessions(), _history(tmp_path / "r")) == before


class TwoScores:
    """Two objectives (both max) and per-example scores, so that every optimizer has what it needs."""

    def evaluate(self, c: Candidate) -> Evaluation:
        a, b = -sum((v - 0.2) ** 2 for v in c.x), -sum((v - 0.7) ** 2 for v in c.x)
        return Evaluation(c.id, objectives={"score": a, "other": b}, per_example=[max(0.0, 1 + a), max(0.0, 1 + b)])


@pytest.mark.parametrize("name", ["random", "cmaes", "nsga2", "m2n2", "optuna", "nevergrad"])
def test_every_optimizer_resumes_to_the_uninterrupted_history(tmp_path, name, caplog):
    from evomerge import optimizers

    objs = [Objective("score", "max"), Objective("other", "max")]
    make = lambda: optimizers.make(name, bounds=BOUNDS, objectives=objs, seed=1)  # noqa: E731

    def engine(path, n):
        store = RunStore.open(path) if (path / "run.sqlite").exists() else RunStore.create(
            path, {}, objectives=objs, space_names=["x0", "x1"], seed=1)
        return Engine(store, make, LocalExecutor(TwoScores), budget=Budget(evaluations=n), snapshot_every=4)

    engine(tmp_path / "ref", 20).run()
    for n in (3, 9, 14, 20):  # stopped three times, at arbitrary points of generations
        e = engine(tmp_path / "r", n)
        e.run()
        e.store.close()
    assert _history(tmp_path / "r") == _history(tmp_path / "ref")
    assert "replaying the whole log" not in caplog.text  # its snapshots restore it exactly


def test_the_end_of_a_run_closes_the_worker_handle(tmp_path):
    """A handle holding processes (a vLLM engine) is closed when the run ends, not left to the interpreter's
    teardown."""
    from evomerge.run.worker import FunctionFitness, Worker

    class Handle:
        closed, recipes = 0, 0

        def set_recipe(self, recipe):
            self.recipes += 1

        def close(self):
            self.closed += 1

    handle = Handle()
    store = RunStore.create(tmp_path, {"test": True}, objectives=OBJ, space_names=["x0", "x1"], seed=0)
    worker = Worker(FunctionFitness(lambda h: {"score": 1.0}, OBJ), handle=handle)
    engine = Engine(store, lambda: RandomSearch(bounds=BOUNDS, objectives=OBJ, seed=0), LocalExecutor(lambda: worker),
                    budget=Budget(evaluations=2))
    assert engine.run() == "budget: evaluations"
    assert (handle.recipes, handle.closed) == (2, 1)


class Broken:
    """A fitness broken from the start (a missing file, a wrong endpoint): every evaluation fails the same way."""

    def __init__(self, after: int | None = None):
        self.after, self.calls = after, 0

    def evaluate(self, c: Candidate) -> Evaluation:
        self.calls += 1
        if self.after is not None and self.calls <= self.after:
            return Scorer().evaluate(c)
        return Evaluation.failure(c.id, "FileNotFoundError: [Errno 2] No such file or directory: 'dev.jsonl'")


def test_a_run_whose_evaluations_all_fail_stops_after_ten_naming_the_error(tmp_path):
    from evomerge.run.engine import FAIL_FAST

    engine = _engine(tmp_path / "run", Budget(evaluations=100), scorer=Broken())
    reason = engine.run()
    assert reason == (f"failing: the first {FAIL_FAST} evaluations all failed, the first with: FileNotFoundError: "
                      "[Errno 2] No such file or directory: 'dev.jsonl'")
    assert engine.store.counts()["evaluations"] == FAIL_FAST
    engine.store.close()
    # once one evaluation has succeeded, failures are the search's business (a bad region), never a stop
    engine = _engine(tmp_path / "mixed", Budget(evaluations=30), scorer=Broken(after=1))
    assert engine.run() == "budget: evaluations" and engine.store.counts()["failed"] == 29
    engine.store.close()
