"""The user's own fitness (`module:function`) on a model that is not an LLM: a small MLP merged by the
materializer, scored by a function that reads the merged state dict, checked against a hand-made merge."""
from __future__ import annotations

import pytest
import torch

from evomerge.merge import Materializer
from evomerge.recipe import ModelRef, Recipe
from evomerge.records import Candidate, Objective, UserError
from evomerge.run.worker import FunctionFitness, Worker
from evomerge.fitness.base import FitnessResult
from evomerge.fitness.state_dict import StateDictHandle

GEN = torch.Generator().manual_seed(0)
X = torch.randn(64, 8, generator=GEN)
Y = (X[:, 0] > 0).long()


def mlp(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc1.weight": torch.randn(16, 8, generator=g), "fc1.bias": torch.zeros(16),
            "fc2.weight": torch.randn(2, 16, generator=g), "fc2.bias": torch.zeros(2)}


def predict(w: dict[str, torch.Tensor]) -> torch.Tensor:
    h = torch.relu(X @ w["fc1.weight"].T + w["fc1.bias"])
    return (h @ w["fc2.weight"].T + w["fc2.bias"]).argmax(-1)


def accuracy_fitness(handle) -> FitnessResult:
    """What a user writes: read the merged weights, run their own model, return objectives and per-example."""
    right = (predict(handle.weights) == Y).float()
    return FitnessResult({"acc": float(right.mean()), "size": 1.0}, per_example=right.tolist())


def test_user_function_scores_the_merged_state_dict():
    sources = {"a": mlp(1), "b": mlp(2)}
    handle = StateDictHandle(Materializer(sources))
    fit = FunctionFitness(f"{__name__}:accuracy_fitness", [Objective("acc"), Objective("size", "min")])
    worker = Worker(fit, handle=handle, decode=lambda x: Recipe(
        merge_method="linear", models=[ModelRef("a", {"weight": float(x[0])}), ModelRef("b", {"weight": 1 - float(x[0])})]))
    accs = []
    for i, w in enumerate((0.0, 0.3, 1.0)):
        ev = worker.evaluate(Candidate(i, [w]))
        by_hand = {k: w * sources["a"][k] + (1 - w) * sources["b"][k] for k in sources["a"]}
        want = (predict(by_hand) == Y).float()
        assert ev.status == "ok" and ev.per_example == want.tolist()
        assert ev.objectives == {"acc": pytest.approx(float(want.mean())), "size": 1.0}
        accs.append(ev.objectives["acc"])
    assert len(set(accs)) > 1  # the merge weight mattered


def test_llm_calls_on_a_state_dict_handle_are_one_line_errors():
    handle = StateDictHandle(Materializer({"a": mlp(1), "b": mlp(2)}))
    with pytest.raises(UserError, match="no merged weights yet"):
        handle.weights
    with pytest.raises(UserError, match="not language models"):
        handle.generate(["x"])
