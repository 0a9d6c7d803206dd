"""Racing and subset + estimate (evomerge/run/frugal.py, fitness/partial.py) on real runs: a per-example fitness
with a known answer (tests/runs_fixtures.py:skill_examples: example j is right iff u_j < the genome's mean),
so every candidate's full-dev score is known without scoring it."""
from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.run.assemble import open_engine
from evomerge.config import parse_config
from evomerge.run.frugal import fit_anchors
from evomerge.records import UserError
from evomerge.results.journal import run_status
from evomerge.run.store import RunStore
from evomerge.fitness.partial import race_bound, race_checks
from runs_fixtures import _thresholds

N = 400


def full_score(x) -> float:
    return float(np.mean(_thresholds(N) < np.mean(x)))


def _run(tmp_path, name, optimizer, fitness_extra, evaluations=60, seed=3):
    cfg = parse_config({
        "space": {"bounds": [[0, 1]] * 3}, "optimizer": optimizer, "seed": seed,
        "fitness": {"function": "runs_fixtures:skill_examples", "objectives": [{"name": "acc"}], **fitness_extra},
        "budget": {"evaluations": evaluations}})
    engine = open_engine(cfg, tmp_path / name, resume=False)
    assert engine.run() == "budget: evaluations"
    store = engine.store
    cands, evals = store.candidates(), store.evaluations()
    return store, cands, evals


def test_hoeffding_serfling_bound_holds_and_closes():
    rng = np.random.default_rng(0)
    pop = (rng.random(200) < 0.6).astype(float)
    mu, delta, misses, checks = pop.mean(), 0.05, 0, 0
    for _ in range(2000):
        order = rng.permutation(200)
        for n in (10, 40, 120, 199):
            checks += 1
            misses += race_bound(pop[order[:n]].mean(), n, 200, delta, 0, 1) < mu
    assert misses / checks <= delta
    assert race_bound(0.3, 200, 200, delta, 0, 1) == 0.3  # all scored: the bound is the mean
    assert race_bound(0.0, 190, 200, 1e-9, 0, 1) <= 10 / 200  # never above what the rest could add
    assert race_checks(200, 20) == 9


@pytest.mark.parametrize("optimizer", [{"name": "random"}, {"name": "cmaes", "options": {"popsize": 8}}],
                         ids=["steady-state", "generational"])
def test_racing_never_stops_a_candidate_that_would_have_won(tmp_path, optimizer):
    full_store, full_cands, full_evals = _run(tmp_path, "full", optimizer, {})
    store, cands, evals = _run(tmp_path, "race", optimizer, {"racing": {"chunk": 40, "confidence": 0.95}})
    stopped = 0
    for e in evals:
        plan = cands[e.candidate_id].meta.get("scoring")
        truth = full_score(cands[e.candidate_id].x)
        if e.cost["examples"] < N:  # stopped: its full-dev score could not reach what it had to beat
            stopped += 1
            assert plan["kind"] == "race" and truth < plan["threshold"]
            assert len(e.per_example) == N and all(math.isfinite(v) for v in e.per_example)
            assert e.objectives["acc"] == pytest.approx(np.mean(e.per_example))  # told its partial mean
        else:
            assert e.objectives["acc"] == pytest.approx(truth)
    assert stopped >= 5
    examples = sum(e.cost["examples"] for e in evals)
    assert examples < sum(e.cost["examples"] for e in full_evals) == N * len(full_evals)
    if optimizer["name"] == "random":  # the same candidates either way: the winner is the same, fully scored
        assert [c.x for c in cands.values()] == [c.x for c in full_cands.values()]
        best = max(full_evals, key=lambda e: e.objectives["acc"])
        race_best = max(evals, key=lambda e: e.objectives["acc"])
        assert race_best.candidate_id == best.candidate_id and race_best.cost["examples"] == N
        assert examples < 0.5 * N * len(evals)
    full_store.close()
    store.close()


def test_subset_estimates_track_the_full_score_and_the_best_is_measured(tmp_path):
    store, cands, evals = _run(tmp_path, "subset", {"name": "random"},
                               {"subset": {"anchors": 40, "strata": 6, "warmup": 8, "full_every": 10}}, evaluations=80)
    est = [(e.objectives["acc"], full_score(cands[e.candidate_id].x)) for e in evals if e.cost["examples"] < N]
    assert len(est) >= 40
    got, want = np.array(est).T
    assert np.mean(np.abs(got - want)) < 0.06
    from scipy.stats import spearmanr

    assert spearmanr(got, want).statistic > 0.9
    best = max(evals, key=lambda e: e.objectives["acc"])
    assert best.cost["examples"] == N  # an estimate never holds the lead unmeasured
    assert best.objectives["acc"] == max(full_score(c.x) for c in cands.values())
    assert sum(e.cost["examples"] for e in evals) < 0.35 * N * len(evals)
    store.close()


def test_m2n2_competes_on_estimated_per_example_scores(tmp_path):
    store, cands, evals = _run(tmp_path, "m2n2", {"name": "m2n2", "options": {"archive_size": 6, "initial_size": 4}},
                               {"subset": {"anchors": 40, "warmup": 4, "refit_every": 4}}, evaluations=40)
    estimated = [e for e in evals if e.cost["examples"] < N]
    assert estimated and all(len(e.per_example) == N and all(math.isfinite(v) for v in e.per_example)
                             for e in estimated)
    for e in estimated:  # each unscored example takes its stratum's anchor mean: the vector's mean is the estimate
        assert np.mean(e.per_example) == pytest.approx(e.objectives["acc"])
    store.close()


def test_anchors_are_exact_where_strata_are_pure():
    # 3 groups of examples that every candidate gets all right or all wrong: any anchor of a group tells its score
    groups = np.repeat([0, 1, 2], [50, 30, 20])
    rows = np.array([[float(g < k) for g in groups] for k in (0, 1, 2, 3, 1, 2)])
    a = fit_anchors(rows, n_anchors=6, n_strata=3, seed=0)
    assert sum(a.weights) == pytest.approx(100)
    for k in range(4):
        s = np.array([float(g < k) for g in groups])
        assert np.dot(a.weights, s[a.examples]) / 100 == pytest.approx(s.mean())


def test_racing_needs_a_function_that_takes_examples(tmp_path):
    cfg = parse_config({"space": {"bounds": [[0, 1]]}, "budget": {"evaluations": 2},
                        "fitness": {"function": "runs_fixtures:sphere", "objectives": [{"name": "score"}],
                                    "racing": {}}})
    with pytest.raises(UserError, match="must take `examples`"):
        open_engine(cfg, tmp_path / "r", resume=False)
    with pytest.raises(UserError, match="racing or fitness.subset, not both"):
        parse_config({"space": {"bounds": [[0, 1]]}, "budget": {"examples": 2},
                      "fitness": {"function": "runs_fixtures:sphere", "objectives": [{"name": "s"}], "racing": {}, "subset": {}}})


def test_budget_in_examples_scored(tmp_path):
    cfg = parse_config({"space": {"bounds": [[0, 1]] * 3}, "seed": 1, "budget": {"examples": 4000}, "optimizer": {"name": "random"},
                        "fitness": {"function": "runs_fixtures:skill_examples", "objectives": [{"name": "acc"}],
                                    "racing": {"chunk": 50}}})
    engine = open_engine(cfg, tmp_path / "r", resume=False)
    assert engine.run() == "budget: examples"
    with RunStore.open(tmp_path / "r", readonly=True) as s:
        total = s.total_cost()["examples"]
        assert 4000 <= total < 4000 + N
        assert s.counts()["evaluations"] > 10  # more evaluations than 4000 / 400 thanks to racing
    engine.store.close()
    info = run_status(tmp_path / "r")
    assert info["scoring"]["examples"] == total and info["scoring"]["stopped"] > 0 and info["scoring"]["estimated"] == 0


def test_budget_in_api_tokens(tmp_path):
    cfg = parse_config({"space": {"bounds": [[0, 1]]}, "budget": {"tokens": 100}, "optimizer": {"name": "random"},
                        "fitness": {"function": "runs_fixtures:sphere_with_tokens", "objectives": [{"name": "score"}]}})
    engine = open_engine(cfg, tmp_path / "r", resume=False)
    assert engine.run() == "budget: tokens"
    assert engine.store.counts()["evaluations"] == 7  # 7 x 15 tokens is the first total >= 100
    engine.store.close()
