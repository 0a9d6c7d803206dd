"""A fitness made of task suites: every task's metrics become named objectives (`acc/math_j`,
`len/math_j`, ...), and the first metric of each task gives the per-example scores M2N2 needs. Any subset of
the examples can be scored (`score_examples`): racing and subset + estimate need it (fitness/partial.py)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.records import Objective, UserError
from evomerge.fitness.base import FitnessResult, add_cost
from evomerge.fitness.handle import ModelHandle, TokenScores
from evomerge.fitness.partial import ExampleScores, full_values
from evomerge.fitness.tasks import Task, TaskSpec, load_task


class TaskFitness:
    def __init__(self, tasks: Sequence[Task]) -> None:
        if not tasks:
            raise UserError("a task fitness needs at least one task")
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"task name {dup[0]!r} is used twice")
        self.tasks = list(tasks)
        self.objectives = [Objective(m.objective(t.name), m.direction) for t in self.tasks for m in t.metrics]

    @classmethod
    def from_config(cls, specs: Sequence[TaskSpec | dict[str, Any]], base_dir: str | Path | None = None) -> TaskFitness:
        return cls([load_task(s, base_dir) for s in specs])

    def evaluate(self, handle: ModelHandle) -> FitnessResult:
        scores = self.score_examples(handle, range(self.example_count()))
        return FitnessResult(objectives=full_values(scores), per_example=scores.primary.tolist(), cost=scores.cost)

    def example_count(self) -> int:
        return sum(len(t.examples) for t in self.tasks)

    def score_examples(self, handle: ModelHandle, indices: Sequence[int]) -> ExampleScores:
        """The examples at `indices` of all tasks' examples laid end to end; one batched call per task and
        kind of metric. A task's objectives are NaN at the other tasks' examples."""
        idx = np.asarray(list(indices), dtype=int)
        values = {o.name: np.full(len(idx), np.nan) for o in self.objectives}
        primary = np.full(len(idx), np.nan)
        start = 0
        for task in self.tasks:
            mine = np.flatnonzero((idx >= start) & (idx < start + len(task.examples)))
            if mine.size:
                part = replace(task, examples=[task.examples[j] for j in idx[mine] - start])
                scored = evaluate_task(part, handle)
                for m in task.metrics:
                    values[m.objective(task.name)][mine] = scored[m.name]
                first = task.metrics[0]
                sign = 1.0 if first.direction == "max" else -1.0  # per-example scores: larger is better
                primary[mine] = sign * np.asarray(scored[first.name], dtype=float)
            start += len(task.examples)
        cost: dict[str, float] = {}
        pop = getattr(handle, "pop_cost", None)
        if pop is not None:
            add_cost(cost, pop())
        return ExampleScores(values=values, primary=primary, cost=cost)


def evaluate_task(task: Task, handle: ModelHandle) -> dict[str, list[float]]:
    """Per metric name, one value per example. Each kind of metric costs one batched handle call."""
    prompts = [task.prompt(ex) for ex in task.examples]
    refs = [ex.reference for ex in task.examples]
    kinds = {m.kind for m in task.metrics}
    out: dict[str, list[float]] = {}
    if "generation" in kinds:
        texts = handle.generate(prompts, task.spec.sampling)
        for m in task.metrics:
            if m.kind == "generation":
                fn = m.generation_fn()
                out[m.name] = [fn(t, r) for t, r in zip(texts, refs)]
    if "teacher" in kinds:
        eos = any(m.name == "teacher_exact" for m in task.metrics)
        scored = handle.score(list(zip(prompts, refs)), eos=eos)
        for m in task.metrics:
            if m.kind == "teacher":
                # loss, token accuracy and probability are about the reference's own tokens, not the EOS
                view = scored if m.name == "teacher_exact" or not eos else [_without_last(x) for x in scored]
                out[m.name] = [m.teacher_value(x) for x in view]
    for m in task.metrics:
        if m.kind == "choice":
            out[m.name] = _choice(task, handle, prompts, normalize=bool(m.options.get("normalize", False)))
    return out


def _without_last(s: TokenScores) -> TokenScores:
    return TokenScores(logprobs=s.logprobs[:-1], greedy=s.greedy[:-1])


def _choice(task: Task, handle: ModelHandle, prompts: list, *, normalize: bool) -> list[float]:
    """1 where the reference has the highest log-likelihood among the choices (per character when
    `normalize`, lm-eval's acc_norm), else 0. Ties count as wrong: a constant model earns nothing."""
    pairs = [(p, c) for p, ex in zip(prompts, task.examples) for c in ex.choices or []]
    scored = iter(handle.score(pairs))
    out = []
    for ex in task.examples:
        lls = []
        for c in ex.choices or []:
            total = sum(next(scored).logprobs)
            lls.append(total / max(1, len(c)) if normalize else total)
        best = max(lls)
        right = lls[ex.choices.index(ex.reference)]
        out.append(float(right == best and lls.count(best) == 1))
    return out
