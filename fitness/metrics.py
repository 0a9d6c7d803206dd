"""Metrics: how one example's completion (or teacher-forced scores) becomes a number.

Three families, by what the handle must compute:
- generation: a function of the greedy completion (exact match, numeric answer, regex, length);
- teacher-forced: a function of the reference's token scores (loss, token accuracy, probability,
  teacher-forced exact match), one forward pass, no decoding: cheap partial credit;
- choice: multiple choice by log-likelihood over the example's `choices`.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evomerge.records import Direction, UserError
from evomerge.fitness.handle import TokenScores

# Sakana's MGSM scorer takes the last match of \d*\.?\d+ and compares floats; we also accept a minus
# sign and thousands separators, so "-5" and "1,024" read as the numbers they are.
_NUMBER = re.compile(r"-?\d*\.?\d+")


def last_number(text: str) -> float | None:
    matches = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3})", "", text))
    return float(matches[-1]) if matches else None


def exact_match(completion: str, reference: str) -> float:
    return float(completion.strip() == reference.strip())


def numeric(completion: str, reference: str) -> float:
    got, want = last_number(completion), last_number(reference)
    return float(got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want)))


def length(completion: str, reference: str) -> float:
    return float(len(completion))


@dataclass(frozen=True)
class Metric:
    """One configured metric of a task. `kind` is 'generation', 'teacher' or 'choice'."""

    name: str
    alias: str
    kind: str
    direction: Direction
    options: dict[str, Any]

    def objective(self, task: str) -> str:
        return f"{self.alias}/{task}"

    def generation_fn(self) -> Callable[[str, str], float]:
        if self.name == "regex":
            pattern = self.options["compiled"]

            def regex(completion: str, reference: str) -> float:
                m = pattern.search(completion)
                got = (m.group(1) if pattern.groups else m.group(0)) if m else None
                return float(got is not None and got.strip() == reference.strip())

            return regex
        return _GENERATION[self.name]

    def teacher_value(self, s: TokenScores) -> float:
        return {"loss": s.loss, "token_accuracy": s.token_accuracy, "gold_prob": s.probability,
                "teacher_exact": float(s.exact)}[self.name]


_GENERATION: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "numeric": numeric, "length": length}
# name -> (kind, default objective prefix, direction)
METRICS: dict[str, tuple[str, str, Direction]] = {
    "exact_match": ("generation", "acc", "max"),
    "numeric": ("generation", "acc", "max"),
    "regex": ("generation", "acc", "max"),
    "length": ("generation", "len", "min"),
    "choice": ("choice", "acc", "max"),
    "loss": ("teacher", "loss", "min"),
    "token_accuracy": ("teacher", "tok_acc", "max"),
    "gold_prob": ("teacher", "prob", "max"),
    "teacher_exact": ("teacher", "acc_tf", "max"),
}
_OPTIONS = {"regex": {"pattern"}, "choice": {"normalize"}}


def make_metric(spec: str | dict[str, Any], task: str) -> Metric:
    """A metric from its config: a name, or {name, as (objective prefix), direction, options...}."""
    d = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = d.pop("name", None)
    if name not in METRICS:
        raise UserError(f"task {task!r}: unknown metric {name!r}; valid: {', '.join(METRICS)}")
    kind, alias, direction = METRICS[name]
    alias = str(d.pop("as", alias))
    direction = d.pop("direction", direction)
    if direction not in ("min", "max"):
        raise UserError(f"task {task!r}, metric {name!r}: direction must be min or max, got {direction!r}")
    unknown = sorted(set(d) - _OPTIONS.get(name, set()))
    if unknown:
        raise UserError(f"task {task!r}, metric {name!r}: unknown option {unknown[0]!r}")
    if name == "regex":
        if "pattern" not in d:
            raise UserError(f"task {task!r}: metric regex needs a 'pattern'")
        try:
            d["compiled"] = re.compile(str(d["pattern"]))
        except re.error as e:
            raise UserError(f"task {task!r}: regex pattern {d['pattern']!r} is invalid: {e}") from e
    return Metric(name=name, alias=alias, kind=kind, direction=direction, options=d)
