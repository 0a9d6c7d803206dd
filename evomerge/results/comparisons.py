"""Comparison searches: the rows of `holdout.compare`, each found by a search of its own.

A fair table gives every tuned row the same budget. Each entry replaces the run's `space` and/or `optimizer`
and keeps its fitness, budget and seed; it searches in RUN_DIR/compare/<row>, a run directory like any other,
so a killed comparison resumes where it stopped and a finished one is not searched again. `searched` says
how many evaluations a search did and whether its wall-time cap, rather than its evaluation budget, ended it.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from evomerge.config import RunConfig, parse_config
from evomerge.records import UserError
from evomerge.run.store import INTERRUPTED, cut_by_wall_time, search_over

COMPARE_DIR = "compare"


def compare_dir(run_dir: Path, row: str) -> Path:
    return Path(run_dir) / COMPARE_DIR / (re.sub(r"[^A-Za-z0-9_.-]+", "_", row).strip("_") or "row")


def compare_config(cfg: RunConfig, row: str) -> RunConfig:
    """The run's config with the entry's space/optimizer, no holdout of its own, and none of the user's starting
    recipes (a row measures what its search finds from the space's start; another space may not hold them)."""
    entry = cfg.holdout.compare[row]
    data = cfg.to_dict()
    del data["holdout"]
    data["optimizer"].pop("starts", None)
    for key in ("space", "optimizer"):
        part = getattr(entry, key)
        if part is not None:
            data[key] = part.model_dump(mode="json", exclude_none=True)
    return parse_config(data)


def _what(sub: RunConfig, run_dir: Path) -> str:
    """What the row's search does differently from the run's (as run_dir stored it), in words."""
    from evomerge.run.store import RunStore

    with RunStore.open(run_dir, readonly=True) as store:
        cfg = parse_config(store.config)
    parts = []
    if sub.optimizer != cfg.optimizer:
        parts.append(f"optimizer {sub.optimizer.name}")
    if sub.space != cfg.space:
        parts.append(f"space {sub.space.name or 'box'} {json.dumps(sub.space.options)}" if sub.space.options else
                     f"space {sub.space.name or 'box'}")
    if sub.fitness != cfg.fitness:  # a benchmark's baseline scoring its own metrics (benchmarks/curves.py)
        return ", ".join(parts + ["its own fitness"]) + ", the run's budget and seed"
    return ", ".join(parts) + ", the run's fitness, budget and seed"


def searched(store: Any, budget: dict[str, Any]) -> dict[str, Any]:
    """How a search ended: evaluations done, the evaluation budget, the last stop reason, and `cut` when the
    wall-time cap stopped it before its evaluation budget (the result then depends on the machine's speed)."""
    done = store.counts()["evaluations"]
    sessions = store.sessions()
    stopped = sessions[-1]["reason"] if sessions else None
    total = budget.get("evaluations")
    return {"evaluations": done, "budget": total, "stopped": stopped, "cut": cut_by_wall_time(stopped, done, total)}


def cut_message(row: str, info: dict[str, Any], wall_time: float | None) -> str:
    return (f"evomerge: warning: the wall-time cap ({wall_time:g} s) cut the search of {row!r} at "
            f"{info['evaluations']} of {info['budget']} evaluations: its result depends on this machine's speed; "
            f"`evomerge resume` with a larger --wall-time finishes it")


def run_comparison(cfg: RunConfig, run_dir: Path, row: str, *, progress: bool = True) -> Path:
    """Search for row `row` (or finish its search) and return its run directory."""
    from evomerge.run.assemble import open_engine
    from evomerge.run.store import RunStore, is_run_dir

    target = compare_dir(run_dir, row)
    sub = compare_config(cfg, row)
    budget = sub.budget.model_dump(exclude_none=True)
    if is_run_dir(target):
        with RunStore.open(target, readonly=True) as store:
            same = parse_config(store.config).budget == sub.budget
            info = searched(store, budget)
        if same and search_over(info["stopped"]):
            return target
        engine = open_engine(None, target, resume=True, budget=budget)
    else:
        engine = open_engine(sub, target, resume=False)
    try:
        if progress:
            from rich.progress import Progress

            # a line each side of the bar: a log (no terminal) shows no bar, and a long search must not look hung
            done = engine.store.counts()["evaluations"]
            print(f"evomerge: searching for the row {row!r} ({_what(sub, run_dir)}; {sub.budget.evaluations or '?'} "
                  f"evaluations{f', {done} done before' if done else ''}) in {target}", flush=True)
            t0 = time.monotonic()
            with Progress(transient=True) as bar:
                task = bar.add_task(f"search for {row}", total=sub.budget.evaluations,
                                    completed=engine.store.counts()["evaluations"])
                engine.on_progress = lambda p: bar.update(task, completed=p.done)
                reason = engine.run()
            print(f"evomerge: row {row!r}: {engine.store.counts()['evaluations']} evaluations, "
                  f"{time.monotonic() - t0:.0f} s ({reason})", flush=True)
        else:
            reason = engine.run()
    finally:
        engine.store.close()
    if reason == INTERRUPTED:
        raise KeyboardInterrupt
    if not search_over(reason):
        raise UserError(f"the comparison search {row!r} in {target} stopped ({reason})")
    return target
