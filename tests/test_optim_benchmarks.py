"""The search benchmarks stay runnable: a few hundred evaluations of each, far from their full size."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("variant", ["m2n2", "cmaes"])
def test_m2n2_digits_learns_above_chance_quickly(variant):
    import m2n2_digits

    assert m2n2_digits.NUM_PARAMS == 19_210
    r = m2n2_digits.run(variant, seed=0, evaluations=200)
    assert r["train_accuracy"] > 0.2 and r["test_accuracy"] > 0.15  # chance is 0.1


def test_digits_mlp_matches_a_plain_forward_pass():
    import m2n2_digits

    (x, _), _ = m2n2_digits.load_digits()
    assert x.shape == (1437, 64)
    p = np.random.default_rng(0).normal(0, 0.1, m2n2_digits.NUM_PARAMS)
    w1, b1 = p[: 64 * 256].reshape(64, 256), p[64 * 256 : 64 * 256 + 256]
    w2, b2 = p[64 * 256 + 256 : -10].reshape(256, 10), p[-10:]
    expected = np.argmax(np.maximum(x[:50] @ w1 + b1, 0) @ w2 + b2, axis=1)
    assert np.array_equal(m2n2_digits.predict(p, x[:50]), expected)


def test_optimizer_overhead_measures_and_reports_failures_as_data():
    import optimizer_overhead

    r = optimizer_overhead.measure("m2n2", 10, 0.05)
    assert r["candidates"] > 0 and r["s_per_candidate"] > 0
    assert optimizer_overhead.skip_reason("optuna-tpe", 20_000) and optimizer_overhead.skip_reason("cmaes", 20_000) is None


def test_cmaes_goes_separable_in_high_dimension():
    from evomerge.optimizers import make
    from evomerge.records import Objective

    opt = make("cmaes", bounds=np.tile([-1.0, 1.0], (3000, 1)), objectives=[Objective("f", "min")], seed=0)
    assert opt.diagonal and len(opt.ask(100)) == 4 + int(3 * np.log(3000))
