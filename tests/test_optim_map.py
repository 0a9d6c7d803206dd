"""MAP (evomerge/optimizers/map.py): the quadratic fit it rests on, its option checks, and a real run on the zoo
that finishes with a front and resumes after SIGKILL to the history of a run never interrupted.
The contract every optimizer meets (improves, survives failures, resumes, deterministic) is test_optim_contract."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from evomerge.optimizers import make
from evomerge.optimizers.map import MAP, features, fit_quadratic, n_coefficients, quadratic_parts
from evomerge.records import Evaluation, UserError
from search_fixtures import ZDT1_OBJ, drive, zdt1
from test_demos_runs import ROOT, evomerge, finished, needs_zoo, reduced
from test_runs_resume import _committed, _history


def _known_quadratic(d: int, rng: np.random.Generator):
    w = rng.normal(size=n_coefficients(d))
    return w, lambda u: features(u) @ w


@pytest.mark.parametrize("d", [1, 3, 6])
def test_fit_recovers_a_known_quadratic_exactly(d):
    rng = np.random.default_rng(d)
    w, q = _known_quadratic(d, rng)
    u = rng.random((n_coefficients(d) + 5, d))
    assert np.allclose(fit_quadratic(u, q(u), ridge=0.0), w, atol=1e-9)
    # the default ridge barely moves it; a large one shrinks the non-constant terms
    assert np.allclose(fit_quadratic(u, q(u), ridge=MAP.__init__.__kwdefaults__["ridge"]), w, atol=1e-4)
    shrunk = fit_quadratic(u, q(u), ridge=100.0)
    assert np.linalg.norm(shrunk[1:]) < np.linalg.norm(w[1:])


def test_fit_needs_as_many_points_as_coefficients():
    u = np.random.default_rng(0).random((14, 4))  # a quadratic in 4 dimensions has 15
    assert n_coefficients(4) == 15
    with pytest.raises(ValueError, match="14 points cannot fit a quadratic of 15 coefficients"):
        fit_quadratic(u, u.sum(1), ridge=0.0)


def test_parts_give_the_quadratic_and_its_gradient():
    rng = np.random.default_rng(1)
    w, q = _known_quadratic(4, rng)
    c, b, H = quadratic_parts(w, 4)
    for u in rng.random((5, 4)):
        assert np.isclose(c + b @ u + 0.5 * u @ H @ u, q(u)[0])
        grad = np.array([(q(u + e)[0] - q(u - e)[0]) / 2e-6 for e in np.eye(4) * 1e-6])
        assert np.allclose(b + H @ u, grad, atol=1e-5)


def test_first_round_is_a_latin_hypercube_and_the_next_proposes_spread_front_points():
    opt = make("map", bounds=[[0.0, 1.0]] * 2, objectives=ZDT1_OBJ, seed=0, initial=12, batch=5)
    cs = opt.ask(100)
    first = np.array([c.x for c in cs])
    assert len(first) == 12 and opt.ask(1) == []  # a round at a time
    opt.tell([Evaluation(c.id, objectives=zdt1(np.asarray(c.x))) for c in cs])
    for k in range(2):  # one point in each of the 12 strata of every dimension
        assert sorted(np.floor(first[:, k] * 12).astype(int)) == list(range(12))
    drive(opt, zdt1, 5 * 6)
    assert opt.state_dict()["rounds"] == 7
    _, F = opt.pareto_front()
    assert len(F) >= 3 and np.ptp(F[:, 0]) > 0.3  # weighted sums spread along the front, not one point


@pytest.mark.parametrize("options, needle", [
    ({"initial": 14}, "initial must be an integer >= 15, the coefficients of a quadratic in 4 dimensions, got 14"),
    ({"batch": 0}, "batch must be an integer >= 1, got 0"),
    ({"ridge": -1.0}, "ridge must be in [0, 1), got -1.0"),
    ({"spacing": 0.0}, "spacing is a fraction of each range"),
    ({"popsize": 4}, "optimizer 'map' has no option 'popsize'; valid: initial, batch, ridge, spacing"),
])
def test_bad_options_are_one_line_errors_naming_them(options, needle):
    with pytest.raises(UserError) as e:
        make("map", bounds=[[0.0, 1.0]] * 4, objectives=ZDT1_OBJ, seed=0, **options)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_failed_round_leaves_the_fit_to_later_rounds():
    opt = make("map", bounds=[[0.0, 1.0]] * 2, objectives=ZDT1_OBJ, seed=0, initial=6, batch=4)
    cs = opt.ask(6)
    opt.tell([Evaluation(c.id, status="failed") for c in cs])
    assert len(opt.ask(10)) == 4  # too few successes to fit: another Latin hypercube round


@needs_zoo
def test_map_on_the_zoo_finishes_with_a_front_and_resumes_after_sigkill_to_the_same_history(tmp_path):
    space = {"name": "layer_weights", "options": {"method": "ties", "granularity": 0, "normalize": False, "weight_max": 1.5}}
    cfg = reduced("demo_pareto", tmp_path, evaluations=21, limit=8, holdout=None, space=space, snapshot_every=4,
                  optimizer={"name": "map", "options": {"initial": 15, "batch": 3}})  # 4 dimensions: 15 coefficients
    ref = evomerge("run", str(cfg), "--run-dir", str(tmp_path / "ref"), "-q")
    assert ref.returncode == 0, ref.stderr[-2000:]
    info = finished(tmp_path / "ref", 21)
    assert info["pareto_size"] >= 1
    ref_evals, ref_events = _history(tmp_path / "ref")
    assert [e[2]["generation"] for e in ref_evals] == [0] * 15 + [1] * 3 + [2] * 3  # the design, then two fits

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "run", str(cfg), "--run-dir", str(run_dir), "-q"],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 200
    while len(_committed(run_dir)) < 17 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # inside the first fitted round
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    out = evomerge("resume", str(run_dir), "-q")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "replaying the whole log" not in out.stderr
    assert _history(run_dir) == (ref_evals, ref_events)


@needs_zoo
def test_a_bad_map_option_in_a_run_config_is_one_line_and_writes_nothing(tmp_path):
    cfg = reduced("demo_pareto", tmp_path, evaluations=4, holdout=None, optimizer={"name": "map", "options": {"initial": 3}})
    out = evomerge("run", str(cfg), "--run-dir", str(tmp_path / "run"), "-q")
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "initial must be an integer >= " in out.stderr, out.stderr
    assert not (tmp_path / "run" / "run.sqlite").exists()
