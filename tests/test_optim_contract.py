"""Every optimizer against the same contract: improves, survives failures, resumes exactly, is deterministic."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from evomerge.optimizers import make, names
from evomerge.records import Evaluation, UserError
from search_fixtures import SPHERE_OBJ, ZDT1_OBJ, best_loss, drive, hypervolume, sphere, zdt1

SPHERE_BOUNDS = np.array([[-5.0, 5.0]] * 5)

# name -> (optimizer, options); every registered optimizer appears at least once
CONFIGS = {
    "random": ("random", {}),
    "cmaes": ("cmaes", {}),
    "cmaes-diagonal": ("cmaes", {"diagonal": True, "restarts": 2}),
    "nsga2": ("nsga2", {"popsize": 12}),
    "m2n2": ("m2n2", {"mutation": 0.3, "archive_size": 10}),
    "optuna-gp": ("optuna", {"sampler": "gp"}),
    "optuna-tpe": ("optuna", {"sampler": "tpe"}),
    "optuna-cmaes": ("optuna", {"sampler": "cmaes"}),
    "optuna-nsga2": ("optuna", {"sampler": "nsga2"}),
    "nevergrad-de": ("nevergrad", {"optimizer": "TwoPointsDE", "num_workers": 4}),
    "nevergrad-1+1": ("nevergrad", {"optimizer": "OnePlusOne", "num_workers": 4}),
    "map": ("map", {}),
}
LEARNERS = [k for k in CONFIGS if k != "random"]
MULTI = ["nsga2", "optuna-tpe", "optuna-nsga2", "map"]  # optuna-gp: several objectives take it seconds an ask


def build(key, objectives=SPHERE_OBJ, bounds=SPHERE_BOUNDS, seed=0):
    name, options = CONFIGS[key]
    return make(name, bounds=bounds, objectives=objectives, seed=seed, **options)


def test_every_registered_optimizer_is_covered():
    assert {n for n, _ in CONFIGS.values()} == set(names())


@pytest.mark.parametrize("key", LEARNERS)
def test_improves_on_sphere_beyond_random_search(key):
    budget = 200
    random_best = best_loss(drive(build("random"), sphere, budget))
    seen = drive(build(key), sphere, budget)
    assert best_loss(seen) < 0.2 * random_best
    # and it got there by learning: the last quarter is better on average than the first
    first = np.mean([o["loss"] for _, o in seen[:50]])
    last = np.mean([o["loss"] for _, o in seen[-50:]])
    assert last < 0.5 * first


@pytest.mark.parametrize("key", MULTI)
def test_zdt1_front_beats_random_search(key):
    bounds = np.array([[0.0, 1.0]] * 5)
    hv_random = hypervolume(drive(build("random", ZDT1_OBJ, bounds), zdt1, 200))
    hv = hypervolume(drive(build(key, ZDT1_OBJ, bounds), zdt1, 200))
    assert hv > hv_random + 0.05, (hv, hv_random)


def test_nsga2_front_grows_generation_by_generation():
    from pymoo.indicators.hv import HV

    opt = make("nsga2", bounds=[[0.0, 1.0]] * 5, objectives=ZDT1_OBJ, seed=1, popsize=12)
    hv = []
    for _ in range(300 // 12):
        drive(opt, zdt1, 12)
        hv.append(float(HV(ref_point=np.array([1.1, 1.1]))(opt.pareto_front()[1])))
    assert hv[-1] > hv[0] and hv[-1] > 0.5  # the true front's hypervolume at (1.1, 1.1) is about 0.877
    assert all(b >= a - 1e-12 for a, b in zip(hv, hv[1:]))  # elitist: the front never gets worse
    X, F = opt.pareto_front()
    assert len(X) == len(F) > 0 and F.shape[1] == 2


def test_nsga2_respects_constraints():
    # feasible only where x0 >= 0.5: every front member must satisfy it
    def f(x):
        return {**zdt1(x), "g": float(0.5 - x[0])}

    opt = make("nsga2", bounds=[[0.0, 1.0]] * 4, objectives=ZDT1_OBJ, seed=0, popsize=12, constraints=["g"])
    drive(opt, f, 240)
    X, _ = opt.pareto_front()
    assert len(X) and np.all(X[:, 0] >= 0.5)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_survives_failures_and_nans(key):
    # one evaluation in three fails, one in five is NaN: no exception, still finds good points
    def fail(i):
        return "failed" if i % 3 == 1 else "nan" if i % 5 == 2 else None

    seen = drive(build(key), sphere, 200, fail=fail)
    assert len(seen) == 200 and sum(o is None for _, o in seen) > 60
    assert len({tuple(x) for x, _ in seen}) > 150  # failures do not make it repeat itself
    if key != "random":
        ok = [o["loss"] for _, o in seen if o is not None]
        assert min(ok) < 0.5 * float(np.median(ok[:20]))


@pytest.mark.parametrize("key", list(CONFIGS))
def test_all_failures_do_not_stall(key):
    opt = build(key)
    seen = drive(opt, sphere, 60, fail=lambda i: "failed")
    assert len(seen) == 60 and not opt.done


@pytest.mark.parametrize("key", list(CONFIGS))
def test_state_round_trip_gives_the_same_next_asks(key):
    a = build(key, seed=3)
    drive(a, sphere, 30, batch=5)
    pending = a.ask(3)  # mid-generation, with results outstanding
    b = build(key, seed=3)
    b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
    for opt in (a, b):
        opt.tell([Evaluation(c.id, objectives=sphere(np.asarray(c.x))) for c in pending])
    for _ in range(3):
        ca, cb = a.ask(4), b.ask(4)
        assert [c.id for c in ca] == [c.id for c in cb]
        assert [c.x for c in ca] == [c.x for c in cb]
        for opt, cs in ((a, ca), (b, cb)):
            opt.tell([Evaluation(c.id, objectives=sphere(np.asarray(c.x))) for c in cs])


@pytest.mark.parametrize("key", list(CONFIGS))
def test_deterministic_given_seed_and_different_across_seeds(key):
    runs = [drive(build(key, seed=s), sphere, 40) for s in (7, 7, 8)]
    xs = [np.array([x for x, _ in r]) for r in runs]
    assert np.array_equal(xs[0], xs[1])
    assert not np.array_equal(xs[0], xs[2])


@pytest.mark.parametrize("key", list(CONFIGS))
def test_candidates_are_in_bounds_with_unique_ids(key):
    opt = build(key)
    ids = []
    for _ in range(10):
        cs = opt.ask(6)
        ids += [c.id for c in cs]
        for c in cs:
            x = np.asarray(c.x)
            assert np.all(x >= SPHERE_BOUNDS[:, 0]) and np.all(x <= SPHERE_BOUNDS[:, 1])
        opt.tell([Evaluation(c.id, objectives=sphere(np.asarray(c.x))) for c in cs])
    assert ids == list(range(len(ids)))


@pytest.mark.parametrize("key", ["cmaes", "nsga2"])
def test_generational_optimizers_wait_for_the_generation(key):
    opt = build(key)
    first = opt.ask(1000)
    assert 2 <= len(first) < 1000
    assert opt.ask(5) == []  # the generation is out: wait for results
    opt.tell([Evaluation(c.id, objectives=sphere(np.asarray(c.x))) for c in first[:-1]])
    assert opt.ask(5) == []
    opt.tell([Evaluation(first[-1].id, objectives=sphere(np.asarray(first[-1].x)))])
    assert len(opt.ask(5)) == 5


@pytest.mark.parametrize("key", [k for k in CONFIGS if k != "cmaes-diagonal"])
def test_the_start_is_the_first_candidate(key):
    """x0 (a space's untuned recipe) is scored first by every optimizer: a search never skips the known merge."""
    x0 = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    name, options = CONFIGS[key]
    opt = make(name, bounds=SPHERE_BOUNDS, objectives=SPHERE_OBJ, seed=0, x0=x0, **options)
    xs = np.array([c.x for c in opt.ask(30)])
    assert np.allclose(xs[0], x0)
    if key == "cmaes":  # then the generation spreads around it
        assert np.linalg.norm(xs.mean(axis=0) - x0) < 2.5


def test_cmaes_restarts_grow_the_population():
    opt = make("cmaes", bounds=SPHERE_BOUNDS, objectives=SPHERE_OBJ, seed=0, restarts=1, cma_options={"tolfun": 1e-3, "tolx": 1e-3})
    sizes = set()
    while not opt.done:
        cs = opt.ask(100)
        sizes.add(len(cs))
        opt.tell([Evaluation(c.id, objectives=sphere(np.asarray(c.x))) for c in cs])
    assert sorted(sizes) == [8, 16]
    assert opt.ask(3) == []


@pytest.mark.parametrize("step_size, dim, want", [("csa", 400, "CMAAdaptSigmaCSA"), ("tpa", 5, "CMAAdaptSigmaTPA"),
                                                 (None, 5, None), (None, 400, None)])
def test_cmaes_step_size_adaptation_is_chosen_or_left_to_cma(step_size, dim, want):
    import cma

    bounds = np.array([[-1.0, 1.0]] * dim)
    opt = make("cmaes", bounds=bounds, objectives=SPHERE_OBJ, seed=0, step_size=step_size)
    if want is None:  # left to cma: its own choice for this dimension, which releases change
        want = type(cma.CMAEvolutionStrategy(np.zeros(dim), 0.5, {"verbose": -9}).adapt_sigma).__name__
    assert type(opt._es.adapt_sigma).__name__ == want
    cs = opt.ask(100)  # and it runs a generation with it
    opt.tell([Evaluation(c.id, objectives=sphere(np.asarray(c.x))) for c in cs])
    assert opt.ask(1)


def test_cmaes_step_size_unknown_is_a_one_line_error():
    with pytest.raises(UserError, match="step_size 'sa' is not valid; use one of csa, tpa"):
        make("cmaes", bounds=SPHERE_BOUNDS, objectives=SPHERE_OBJ, seed=0, step_size="sa")


@pytest.mark.parametrize("key", ["optuna-gp", "optuna-tpe", "optuna-cmaes", "optuna-nsga2"])
def test_optuna_state_is_plain_data_that_any_release_reads(key):
    """No live optuna object in a snapshot (optuna 5.1's study does not pickle): trials, attributes and random
    states only, restored through optuna's own add_trial."""
    a = build(key, seed=5)
    drive(a, sphere, 20, batch=4)
    a.ask(2)  # trials in flight are part of the state
    blob = pickle.dumps(a.state_dict())
    assert b"optuna" not in blob
    b = build(key, seed=5)
    b.load_state_dict(pickle.loads(blob))
    assert [(t.number, t.state, t.params, t.values) for t in b._study.trials] == \
        [(t.number, t.state, t.params, t.values) for t in a._study.trials]
