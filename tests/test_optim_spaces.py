"""Every optimizer on every space: candidates decode to recipes, the loop runs through recipes, and the
search moves towards a target recipe."""
from __future__ import annotations

import numpy as np
import pytest

from evomerge import search_spaces
from evomerge.optimizers import make
from evomerge.records import Evaluation, Objective
from test_optim_contract import CONFIGS
from test_search_spaces import CASES

OPTIMIZERS = ["random", "cmaes", "nsga2", "m2n2", "optuna-tpe", "nevergrad-de"]
SPACES = ["lw-dare-groups-modules", "swap-transition", "dfs", "evo-merging", "ps+dfs"]


# optuna stores a trial's parameters one by one (slow at ~100 dimensions), so TPE gets the smaller spaces
PAIRS = [(o, s) for o in OPTIMIZERS for s in SPACES if not (o == "optuna-tpe" and s in ("dfs", "ps+dfs"))]


@pytest.mark.parametrize("opt_key,space_case", PAIRS)
def test_optimizer_searches_space_through_recipes(opt_key, space_case):
    name, options = CASES[space_case]
    space = search_spaces.make(name, **options)
    span = space.bounds[:, 1] - space.bounds[:, 0]
    target = space.encode(space.decode(np.random.default_rng(1).uniform(space.bounds[:, 0], space.bounds[:, 1])))

    def loss(recipe):  # only the recipe reaches the "fitness", as in a real run
        return float(np.mean(((space.encode(recipe) - target) / span) ** 2))

    opt_name, opt_options = CONFIGS[opt_key]
    if opt_key == "m2n2":
        opt_options = {**opt_options, "mutation": 0.05 * float(span.mean())}
    opt = make(opt_name, bounds=space.bounds, objectives=[Objective("loss", "min")], seed=0, x0=space.initial(), **opt_options)
    start = loss(space.decode(space.initial()))
    losses = []
    while len(losses) < 64:
        cands = opt.ask(8)
        evs = []
        for c in cands:
            v = loss(space.decode(c.x))
            losses.append(v)
            evs.append(Evaluation(c.id, objectives={"loss": v}, per_example=[-v]))
        opt.tell(evs)
    assert min(losses) <= start
    if opt_key not in ("random", "optuna-tpe"):  # TPE spends its first trials at random: too few here
        assert min(losses) < start
