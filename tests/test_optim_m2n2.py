"""M2N2's own mechanics: competition keeps specialists, attraction pairs complements, split-point crossover."""
from __future__ import annotations

import numpy as np

from evomerge.optimizers import make
from evomerge.optimizers.m2n2 import slerp_split
from evomerge.records import Evaluation, Objective

OBJ = [Objective("acc", "max")]


def seeded(scores, alpha=1.0, attraction=True, interpolation="linear", seed=0):
    """An M2N2 whose archive holds len(scores) initial members with the given per-example scores."""
    opt = make("m2n2", bounds=[[-1.0, 1.0]] * 6, objectives=OBJ, seed=seed, archive_size=len(scores),
               alpha=alpha, attraction=attraction, interpolation=interpolation)
    cands = opt.ask(len(scores))
    assert [c.meta["kind"] for c in cands] == ["initial"] * len(scores)
    opt.tell([Evaluation(c.id, objectives={"acc": float(np.mean(s))}, per_example=list(s)) for c, s in zip(cands, scores)])
    return opt, cands


def test_competition_keeps_the_only_member_right_on_an_example():
    # three generalists right on examples 0-3; the newcomer is right only on examples 4-5, which nobody else
    # gets: shared fitness 4/3 each against its 2, so it stays; unshared (α = 0), 4 each against 2, it goes
    generalists = [[1, 1, 1, 1, 0, 0]] * 3
    for alpha, survives in ((1.0, True), (0.0, False)):
        opt, _ = seeded(generalists, alpha=alpha)
        child = opt.ask(1)[0]
        assert child.meta["kind"] == "child"
        opt.tell([Evaluation(child.id, objectives={"acc": 0.2}, per_example=[0, 0, 0, 0, 1, 1])])
        assert bool(opt.S[:, 4].sum() == 1) is survives
        assert len(opt.X) == 3


def test_attraction_pairs_parents_that_complement_each_other():
    # member 0 and 1 are both right on the first half; member 2 is right on the second half only
    scores = [[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]
    opt, _ = seeded(scores, seed=1)
    pairs = [tuple(c.meta["parents"]) for c in opt.ask(300)]
    complementary = sum((a in (0, 1)) == (b == 2) for a, b in pairs)
    assert complementary == len(pairs)  # a weak where b is strong, always
    opt_ga, _ = seeded(scores, attraction=False, seed=1)
    pairs_ga = [tuple(c.meta["parents"]) for c in opt_ga.ask(300)]
    assert sum((a in (0, 1)) == (b == 2) for a, b in pairs_ga) < 0.7 * len(pairs_ga)


def test_split_point_crossover_mixes_with_ratio_w_then_1_minus_w():
    opt, cands = seeded([[1, 0], [0, 1]])
    xa, xb = (np.asarray(c.x) for c in cands)
    for child in opt.ask(20):
        a, b = child.meta["parents"]
        pa, pb = opt.X[a], opt.X[b]
        s, w = child.meta["split"], child.meta["ratio"]
        t = np.where(np.arange(6) < s, w, 1 - w)
        assert np.allclose(child.x, np.clip((1 - t) * pa + t * pb, -1, 1))
    assert {tuple(x) for x in opt.X} == {tuple(xa), tuple(xb)}


def test_slerp_keeps_norm_between_orthogonal_unit_vectors_and_falls_back_to_linear():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    mid = slerp_split(a, b, np.full(2, 0.5))
    assert np.isclose(np.linalg.norm(mid), 1.0) and np.allclose(mid, [2**-0.5, 2**-0.5])
    assert np.allclose(slerp_split(a, 2 * a, np.full(2, 0.25)), 1.25 * a)


def test_failed_children_never_enter_the_archive_and_failed_initials_are_replaced():
    opt = make("m2n2", bounds=[[-1.0, 1.0]] * 3, objectives=OBJ, seed=0, archive_size=4, mutation=0.1)
    first = opt.ask(10)
    assert len(first) == 4  # only the initial members until they are in
    opt.tell([Evaluation.failure(first[0].id, "oom")] + [Evaluation(c.id, objectives={"acc": 0.5}, per_example=[1, 0]) for c in first[1:]])
    again = opt.ask(2)
    assert again[0].meta["kind"] == "initial" and again[1].meta["kind"] == "child"
    opt.tell([Evaluation(c.id, objectives={"acc": float("nan")}, per_example=[1, 1]) for c in again])
    assert len(opt.X) == 3 and opt.failures == 3
