"""Helpers for the search area's tests: an engine-like driver loop and benchmark functions."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from evomerge.records import Evaluation, Objective


def sphere(x: np.ndarray) -> dict[str, float]:
    return {"loss": float(np.sum((np.asarray(x) - 1.0) ** 2))}


def zdt1(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x)
    g = 1.0 + 9.0 * float(np.mean(x[1:]))
    return {"f1": float(x[0]), "f2": float(g * (1.0 - math.sqrt(x[0] / g)))}


SPHERE_OBJ = [Objective("loss", "min")]
ZDT1_OBJ = [Objective("f1", "min"), Objective("f2", "min")]


def drive(
    opt,
    f: Callable[[np.ndarray], dict[str, float]],
    budget: int,
    batch: int = 4,
    fail: Callable[[int], str | None] = lambda i: None,
) -> list[tuple[np.ndarray, dict[str, float] | None]]:
    """Ask in batches, tell each batch back in reverse order (results arrive out of order). `fail(i)` may
    turn evaluation i into a failure ("failed") or a NaN result ("nan"). Returns (x, objectives or None)."""
    seen: list[tuple[np.ndarray, dict[str, float] | None]] = []
    while len(seen) < budget:
        cands = opt.ask(min(batch, budget - len(seen)))
        if not cands:  # nothing is outstanding here, so only a finished optimizer may ask nothing
            assert opt.done, "optimizer asked nothing while nothing was outstanding"
            break
        evals = []
        for c in cands:
            x = np.asarray(c.x)
            kind = fail(len(seen))
            if kind == "failed":
                evals.append(Evaluation.failure(c.id, "boom"))
                seen.append((x, None))
            elif kind == "nan":
                evals.append(Evaluation(c.id, objectives={k: math.nan for k in f(x)}))
                seen.append((x, None))
            else:
                obj = f(x)
                evals.append(Evaluation(c.id, objectives=obj, per_example=[-v for v in obj.values()][:1]))
                seen.append((x, obj))
        opt.tell(list(reversed(evals)))
    return seen


def best_loss(seen) -> float:
    return min(o["loss"] for _, o in seen if o is not None)


def hypervolume(seen, ref=(1.1, 1.1)) -> float:
    from pymoo.indicators.hv import HV

    F = np.array([[o["f1"], o["f2"]] for _, o in seen if o is not None])
    return float(HV(ref_point=np.array(ref))(F))
