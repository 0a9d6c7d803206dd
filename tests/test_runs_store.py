"""The run store: round trips, atomic writes, read-only opening, corrupted and truncated files."""
from __future__ import annotations

import hashlib
import json
import math
import sqlite3

import pytest

from evomerge import open_run
from evomerge.recipe import ModelRef, Recipe
from evomerge.records import Candidate, Evaluation, Objective, UserError
from evomerge.run.store import LOCK_FILE, STORE_FILE, RunStore

OBJS = [Objective("acc", "max"), Objective("size", "min")]


def _filled(tmp_path):
    store = RunStore.create(tmp_path / "run", {"seed": 1, "space": {"bounds": [[0, 1], [0, 1]]}},
                            objectives=OBJS, space_names=["w.a", "w.b"], seed=1)
    cands = [Candidate(i, [0.1 * i, 0.5], {"generation": 0}) for i in range(4)]
    recipe = Recipe("linear", models=[ModelRef("a", {"weight": 0.3}), ModelRef("b", {"weight": 0.7})])
    store.record_ask(4, cands, [recipe, None, recipe, recipe])
    store.record_evaluations([
        Evaluation(0, objectives={"acc": 0.5, "size": 3.0}, per_example=[1.0, 0.0], timings={"score": 0.2},
                   worker="w1", cost={"usd": 0.01}),
        Evaluation(2, objectives={"acc": 0.7, "size": 4.0}, worker="w2", cost={"usd": 0.02}),
    ])
    store.record_evaluations([Evaluation.failure(1, "boom", worker="w1"),
                              Evaluation(3, objectives={"acc": 0.4, "size": 1.0})])
    store.record_snapshot({"next_id": 4, "blob": list(range(5))})
    return store, cands, recipe


def test_round_trip_and_log(tmp_path):
    store, cands, recipe = _filled(tmp_path)
    assert store.config["seed"] == 1
    assert store.objectives == OBJS and store.space_names == ["w.a", "w.b"]
    assert store.candidates() == {c.id: c for c in cands}
    evs = store.evaluations()
    assert [e.candidate_id for e in evs] == [0, 2, 1, 3]  # commit order
    assert evs[0].per_example == [1.0, 0.0] and evs[0].cost == {"usd": 0.01} and evs[0].worker == "w1"
    assert evs[2].status == "failed" and evs[2].error == "boom"
    assert [(e.kind, e.n, e.ids) for e in store.events()] == [("ask", 4, [0, 1, 2, 3]), ("tell", 2, [0, 2]),
                                                              ("tell", 2, [1, 3])]
    # a snapshot serves resume only once an ask follows it (replaying that ask checks it)
    assert store.resume_snapshot() is None
    store.record_ask(1, [Candidate(4, [0.0, 0.0])])
    assert store.resume_snapshot() == (3, {"next_id": 4, "blob": [0, 1, 2, 3, 4]})
    store.record_snapshot({"next_id": 5})  # at seq 4, with no ask after it yet: seq 3 stays the one to use
    assert store.resume_snapshot()[0] == 3
    store.record_ask(1, [Candidate(5, [0.0, 0.0])])
    store.record_snapshot({"next_id": 6})
    assert store.resume_snapshot() == (4, {"next_id": 5})
    assert [r[0] for r in store._con.execute("SELECT event_seq FROM snapshots")] == [4, 5]  # 3 was pruned
    assert store.recipe(2).to_dict() == recipe.to_dict()
    assert store.counts() == {"evaluations": 4, "failed": 1, "in_flight": 2}
    assert store.total_cost() == pytest.approx({"usd": 0.03})
    with pytest.raises(UserError, match="no recorded recipe"):
        store.recipe(1)
    store.close()
    # the pragmas the durability promise rests on
    con = sqlite3.connect(tmp_path / "run" / STORE_FILE)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_in_flight_and_nan_objectives(tmp_path):
    import numpy as np

    store = RunStore.create(tmp_path / "r", {}, objectives=OBJS[:1], space_names=["x"])
    store.record_ask(3, [Candidate(i, [float(i)], {"parents": np.array([i, i + 1]), "gen": np.int64(2)}) for i in range(3)])
    assert store.candidates()[1].meta == {"parents": [1, 2], "gen": 2}
    store.record_evaluations([Evaluation(1, objectives={"acc": math.nan})])
    assert [c.id for c in store.in_flight()] == [0, 2]
    ev = store.evaluations()[0]
    assert math.isnan(ev.objectives["acc"]) and not ev.ok
    # an evaluation recorded twice is refused, and the refused transaction leaves nothing behind
    with pytest.raises(sqlite3.IntegrityError):
        store.record_evaluations([Evaluation(2, objectives={"acc": 1.0}), Evaluation(1, objectives={"acc": 1.0})])
    assert [c.id for c in store.in_flight()] == [0, 2] and len(store.events()) == 2


def test_genomes_are_exact_float64_bytes(tmp_path):
    import numpy as np

    x = [math.nextafter(0.1, 1.0), -0.0, 1e-310, math.inf, 2.0 ** 60 + 1.0, float(np.float32(0.3))]
    store = RunStore.create(tmp_path / "r", {}, objectives=OBJS[:1], space_names=list("abcdef"))
    store.record_ask(1, [Candidate(0, np.array(x))])
    got = store.candidates()[0].x
    assert [v.hex() for v in got] == [v.hex() for v in x] and math.copysign(1, got[1]) == -1
    assert store._con.execute("SELECT length(x) FROM candidates").fetchone()[0] == 8 * len(x)


def test_schema_1_store_with_json_genomes_is_read_and_resumed(tmp_path):
    store, cands, _ = _filled(tmp_path)
    # rewrite it as schema 1 wrote it: x as JSON text
    store._con.executemany("UPDATE candidates SET x=? WHERE id=?", [(json.dumps(c.x), c.id) for c in cands])
    store._con.execute("UPDATE meta SET value='1' WHERE key='schema'")
    store._con.commit()
    store.close()
    old = RunStore.open(tmp_path / "run", readonly=True)
    assert old.candidates() == {c.id: c for c in cands} and old._meta("schema") == 1
    old.close()
    resumed = RunStore.open(tmp_path / "run")
    resumed.record_ask(1, [Candidate(4, [0.25, 0.75])])
    assert resumed.candidates() == {**{c.id: c for c in cands}, 4: Candidate(4, [0.25, 0.75])}
    assert resumed._meta("schema") == 2  # it now holds bytes too
    resumed._con.execute("UPDATE meta SET value='3' WHERE key='schema'")
    resumed._con.commit()
    resumed.close()
    with pytest.raises(UserError, match="has schema 3; this evomerge reads schemas 1, 2"):
        RunStore.open(tmp_path / "run", readonly=True)


def test_reader_frame_pareto_best(tmp_path):
    store, _, _ = _filled(tmp_path)
    store.close()
    run = open_run(tmp_path / "run")
    df = run.frame()
    assert list(df.columns[:3]) == ["id", "status", "acc"] and "x.w.a" in df.columns
    assert len(df) == 4 and df.loc[df.id == 1, "status"].item() == "failed"
    assert int(run.best()["id"]) == 2  # acc, max
    assert int(run.best("size")["id"]) == 3  # size, min
    # 0: (0.5, 3) is dominated by nobody? 2 has more acc, more size; 3 less acc, less size -> all on the front
    assert sorted(run.pareto().id) == [0, 2, 3]
    # best and pareto read genomes for their own rows only; the values are those rows' genomes
    genomes = run.store.candidates()
    assert run.best()[["x.w.a", "x.w.b"]].tolist() == list(genomes[2].x)
    front = run.pareto()
    assert all(r[["x.w.a", "x.w.b"]].tolist() == list(genomes[int(r.id)].x) for _, r in front.iterrows())
    assert "x.w.a" not in run.frame(genomes=False).columns
    assert run.best_so_far() == [0.5, 0.7, 0.7, 0.7]
    with pytest.raises(UserError, match="no objective 'speed'"):
        run.best("speed")
    run.close()


def test_the_knee_is_the_most_balanced_member_of_the_front(tmp_path):
    import numpy as np

    from evomerge.results.journal import knee

    # a real MATH + FR merge search's shape: one expert's best, the other's, a balanced merge, a dominated one
    vals = np.array([[0.30, 0.11], [0.02, 0.22], [0.20, 0.18], [0.0, 0.0], [0.19, 0.17]])
    assert knee(vals) == 2
    # a concave front (seed 0 of headline_real's search): a sum of scaled objectives would pick an extreme
    assert knee(np.array([[0.46, 0.0], [0.06, 0.34], [0.18, 0.22], [0.38, 0.02], [0.0, 0.2]])) == 2
    assert knee(vals[:1]) == 0 and knee(np.array([[1.0, 5.0], [1.0, 5.0]])) == 0  # one point; a tie: the first
    # the run's best follows its config: the first objective by default, the knee with best: knee
    store = RunStore.create(tmp_path / "run", {"best": "knee"}, objectives=[Objective("math", "max"), Objective("fr", "max")],
                            space_names=["w"], seed=0)
    store.record_ask(5, [Candidate(i, [0.1 * i], {}) for i in range(5)], [None] * 5)
    store.record_evaluations([Evaluation(i, objectives={"math": m, "fr": f}) for i, (m, f) in enumerate(vals)])
    store.close()
    run = open_run(tmp_path / "run")
    assert int(run.best()["id"]) == 2 and int(run.best("math")["id"]) == 0 and int(run.best("fr")["id"]) == 1
    assert run.best_rule() == "the knee of the front over math, fr"
    assert run.best_history() == [0, 0, 2, 2, 2]  # (0.3, 0.11); two extremes tie: the first; then the knee
    run.close()


def test_create_refuses_existing_run(tmp_path):
    store, _, _ = _filled(tmp_path)
    store.close()
    with pytest.raises(UserError, match="already holds a run"):
        RunStore.create(tmp_path / "run", {}, objectives=OBJS, space_names=[])


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_store_is_one_line_error_and_untouched(tmp_path, damage):
    store, _, _ = _filled(tmp_path)
    store.close()
    path = tmp_path / "run" / STORE_FILE
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(data[:4096] + b"\x13" * 4096 + data[8192:])
    else:
        path.write_bytes(b"")
    before = _digest(path)
    for opener in (lambda: RunStore.open(tmp_path / "run"), lambda: RunStore.open(tmp_path / "run", readonly=True),
                   lambda: open_run(tmp_path / "run")):
        with pytest.raises(UserError) as err:
            opener()
        assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert _digest(path) == before
    assert sorted(p.name for p in path.parent.iterdir()) == [LOCK_FILE, STORE_FILE]  # the lock: since creation


def test_not_a_run_dir(tmp_path):
    with pytest.raises(UserError, match="not an evomerge run directory"):
        RunStore.open(tmp_path)
    (tmp_path / STORE_FILE).write_bytes(b"")
    sqlite3.connect(tmp_path / STORE_FILE).execute("CREATE TABLE t(x)").connection.commit()
    with pytest.raises(UserError, match="not an evomerge run store"):
        RunStore.open(tmp_path)


def test_hypervolume_matches_pymoo():
    import numpy as np
    from pymoo.indicators.hv import HV

    from evomerge.optimizers.pareto import hypervolume, nondominated

    rng = np.random.default_rng(0)
    for d in (2, 3):
        pts = rng.random((40, d))
        front = pts[nondominated(pts)]
        assert 0 < len(front) < 40
        # pymoo minimises: negate our larger-is-better values and the reference point
        assert hypervolume(front, np.zeros(d)) == pytest.approx(HV(ref_point=np.zeros(d))(-front), rel=1e-12)
