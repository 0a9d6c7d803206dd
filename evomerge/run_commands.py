"""The run commands of the CLI: run, resume, status, export, report. `register(app)` adds them to `evomerge`.

Heavy imports stay inside the commands so `evomerge --help` is instant. Read-only commands open the store
read-only: a failed command never modifies a run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer

from evomerge.quiet import own_output, ray_output
from evomerge.records import UserError
from evomerge.run.store import FAILING, INTERRUPTED, RunLock, cut_by_wall_time, search_over


def best_text(best: dict[str, float], failed: int, room: int) -> str:
    """The progress bar's best-so-far in at most `room` characters, the values always whole: the first form
    that fits of labels in full, labels without the part all of them share ("acc/math_j", "tok/math_j" ->
    "acc", "tok"), labels cut to their first letters, then values alone (the failed count goes before the
    labels do); at the very least the first objective's value."""
    values = [f"{v:.4g}" for v in best.values()]
    labels = list(best)
    parts = [s.split("/") for s in labels]
    if len(labels) > 1 and all(len(p) == 2 for p in parts):
        for i in (1, 0):
            if len({p[i] for p in parts}) == 1 and len({p[1 - i] for p in parts}) == len(parts):
                labels = [p[1 - i] for p in parts]
    tail = f" ({failed} failed)" if failed else ""

    def text(names: list[str] | None, end: str) -> str:
        pairs = values if names is None else [f"{n}={v}" for n, v in zip(names, values)]
        return "best " + " ".join(pairs) + end

    forms = [text(list(best), tail), text(labels, tail)]
    forms += [text([n[:k] for n in labels], tail) for k in range(max(map(len, labels), default=0), 0, -1)]
    forms += [text(None, tail), text(None, ""), "best " + values[0] if values else "best"]
    return next((f for f in forms if len(f) <= room), forms[-1])


def _progress_bar(total: int | None):
    """A rich progress bar fed by the engine's Progress records: done, ETA, best so far, evaluations/min.
    The best-so-far text fits the terminal's width (80 columns in a log), shortening its labels, never a
    value, so the other columns keep theirs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Column
    from rich.text import Text

    class ETAColumn(TimeRemainingColumn):
        def render(self, task) -> Text:
            return Text("ETA ") + super().render(task)

    bar = Progress(TextColumn("[bold]search"), BarColumn(bar_width=10), MofNCompleteColumn(),
                   TimeElapsedColumn(), ETAColumn(), TextColumn("{task.fields[rate]}"),
                   TextColumn("{task.fields[best]}", table_column=Column(no_wrap=True)), transient=False)
    task = bar.add_task("search", total=total, rate="", best="")

    def update(p) -> None:
        rate = f"{p.evals_per_min:.{1 if p.evals_per_min < 100 else 0}f} eval/min"  # slow runs keep a decimal
        if p.examples:
            rate += f" {p.examples:.0f} ex"
        # the other columns: "search", the bar, done/total, elapsed, "ETA h:mm:ss", the rate, one space after each
        used = 7 + 11 + len(f"{p.done}/{p.total if p.total is not None else '?'}") + 1 + 8 + 12 + len(rate) + 1
        bar.update(task, completed=p.done, total=p.total, rate=rate, best=best_text(p.best, p.failed, bar.console.width - used))

    return bar, update


def _drive(engine, quiet: bool) -> str:
    from evomerge.run.engine import ReplayMismatch

    try:
        if quiet:
            engine.on_progress = None
            reason = engine.run()
        else:
            bar, update = _progress_bar(engine.budget.evaluations)
            engine.on_progress = update
            with bar:
                bar.update(bar.task_ids[0], completed=engine.store.counts()["evaluations"])
                reason = engine.run()
        counts = engine.store.counts()
    except ReplayMismatch as e:
        raise UserError(str(e)) from None
    finally:
        engine.store.close()  # the last connection closing folds the WAL into the store file
    print(f"evomerge: stopped ({reason}): {counts['evaluations']} evaluations, {counts['failed']} failed, "
          f"{counts['in_flight']} in flight; run directory {engine.store.path.parent}")
    total = engine.budget.evaluations
    if cut_by_wall_time(reason, counts["evaluations"], total):
        from evomerge.results.comparisons import cut_message

        print(cut_message("this run", {"evaluations": counts["evaluations"], "budget": total}, engine.budget.wall_time))
    if reason == INTERRUPTED:
        raise SystemExit(130)  # click (non-standalone) would swallow typer.Exit's code
    if reason.startswith(FAILING):
        raise SystemExit(1)  # the line above names the error; `resume` tries again once it is fixed
    return reason


def _tracked(run_dir: Path, engine, quiet: bool) -> None:
    """Drive the search, then (once the budget is reached or the optimizer is done) the held-out table and the
    export the config asks for, while the config's trackers are fed in the background."""
    from evomerge.results.trackers import tracking

    with tracking(run_dir) as feed:
        reason = _drive(engine, quiet)
        if search_over(reason):
            from evomerge.results.holdout import finish_run

            feed.log_table(finish_run(run_dir, progress=not quiet))


def _default_run_dir(config: Path) -> Path:
    """Beside the config, named after it; a fresh `<name>-N` when that already holds a run, so running the same
    config again starts a new run (`evomerge resume` continues an old one)."""
    from evomerge.run.store import is_run_dir

    target, n = config.with_suffix(""), 1
    while is_run_dir(target):
        n += 1
        target = config.with_name(f"{config.stem}-{n}")
    if n > 1:
        print(f"evomerge: {config.with_suffix('')} holds an earlier run (continue it with `evomerge resume`); "
              f"this run goes to {target}")
    return target


# options of several commands, one definition each
_ADDRESS = typer.Option(None, "--address", help="Ray cluster to join ('auto' for the running one).")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
_VERBOSE = typer.Option(False, "--verbose", help="Also show other libraries' progress bars, warnings and log lines (Ray's too, instead of RUN_DIR/ray.log).")
_GRACE = typer.Option(None, "--placement-grace", help="Seconds a Ray worker may wait for a node before the shortfall is said (executor.placement_grace).")


def _grace(seconds: float | None) -> float | None:
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise UserError(f"--placement-grace must be a number of seconds > 0, got {seconds}")
    return seconds


def _show_plan(plan) -> None:
    """The first lines of a run that loads models: its memory plan, per worker and on this node."""
    if plan.loads:
        print(plan.summary())


def run_command(
    config: Path = typer.Argument(..., help="Run config (YAML): evomerge's, or a mergekit-evolve genome config."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default: beside the config, named after it)."),
    address: Optional[str] = _ADDRESS,
    resume: bool = typer.Option(False, "--resume", help="Continue the run already in --run-dir."),
    evaluations: Optional[int] = typer.Option(None, "--evaluations", help="Set the budget to this many evaluations (e.g. a quick try)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Search seed instead of the config's (repeat a search over seeds)."),
    quiet: bool = _QUIET,
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the config and print the memory plan per worker and per node; load nothing, write nothing."),
    verbose: bool = _VERBOSE,
    placement_grace: Optional[float] = _GRACE,
) -> None:
    """Start a search (or continue one with --resume)."""
    from evomerge.run.assemble import open_engine, prepare
    from evomerge.config import parse_config
    from evomerge.mergekit_evolve import load_run_config

    cfg = load_run_config(config)  # an evomerge config, or a mergekit-evolve one (translated and printed)
    if evaluations is not None:
        cfg = cfg.with_budget(evaluations=evaluations)
    if seed is not None:
        if resume:
            raise UserError("--seed starts a new search; a resumed run keeps the seed it started with")
        cfg = parse_config({**cfg.to_dict(), "seed": seed})
    if dry_run:
        plan = prepare(cfg, address=address)[2]
        print(plan.describe())
        plan.check()
        return
    target = run_dir or (config.with_suffix("") if resume else _default_run_dir(config))
    on_ray = address is not None or cfg.executor.kind == "ray"
    with own_output(verbose), ray_output(on_ray and not verbose) as settle:
        engine = open_engine(cfg, target, resume=resume, address=address, on_plan=_show_plan,
                             placement_grace=_grace(placement_grace))
        settle(target)
        _tracked(target, engine, quiet)


def resume_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    address: Optional[str] = _ADDRESS,
    evaluations: Optional[int] = typer.Option(None, "--evaluations", help="Raise the budget to this many evaluations."),
    wall_time: Optional[str] = typer.Option(None, "--wall-time", help="Raise the wall-time budget (90s, 30m, 6h, 2d)."),
    cost: Optional[float] = typer.Option(None, "--cost", help="Raise the cost budget."),
    quiet: bool = _QUIET,
    verbose: bool = _VERBOSE,
    placement_grace: Optional[float] = _GRACE,
) -> None:
    """Continue a stopped or killed run: replay its store, re-run only what was in flight."""
    from evomerge.run.assemble import open_engine
    from evomerge.run.store import RunStore, is_run_dir

    budget = {k: v for k, v in (("evaluations", evaluations), ("wall_time", wall_time), ("cost", cost)) if v is not None}
    on_ray = address is not None
    if is_run_dir(run_dir):
        with RunStore.open(run_dir, readonly=True) as stored:
            on_ray = on_ray or stored.config.get("executor", {}).get("kind") == "ray"
    with own_output(verbose), ray_output(on_ray and not verbose) as settle:
        engine = open_engine(None, run_dir, resume=True, address=address, budget=budget, on_plan=_show_plan,
                             placement_grace=_grace(placement_grace))
        settle(run_dir)
        _tracked(run_dir, engine, quiet)


def holdout_command(
    run_dir: Path = typer.Argument(..., help="A run directory whose config has a holdout section."),
    config: Optional[Path] = typer.Option(None, "--config", help="Take the holdout section (baselines, comparison rows, tasks) from this run config first: every other section must be the run's."),
    quiet: bool = _QUIET,
    verbose: bool = typer.Option(False, "--verbose", help="Also show other libraries' progress bars, warnings and log lines."),
) -> None:
    """Score the baselines and the best candidate on the held-out tasks, print the table, export the best."""
    from evomerge.config import load_config
    from evomerge.results.holdout import finish_run, replace_holdout
    from evomerge.results.trackers import tracking

    holder = RunLock.holder(run_dir)
    if holder is not None:  # its own end writes holdout.json and the export: a table now would race and go stale
        raise UserError(f"{run_dir} is still being searched ({holder}); the run scores its held-out table when "
                        "it ends: wait for it, or stop it first")
    if config is not None:
        replace_holdout(run_dir, load_config(config).to_dict(), str(config))
    with tracking(run_dir) as feed:
        with own_output(verbose):
            result = finish_run(run_dir, progress=not quiet)
        if result is None:
            raise UserError(f"the run in {run_dir} has no holdout section in its config")
        feed.log_table(result)


def compare_command(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories with held-out tables (e.g. one search over seeds)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Held-out tables of several runs side by side: mean, min and max per row and column."""
    from evomerge.results.holdout import compare, print_comparison

    result = compare(run_dirs)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_comparison(result)


def status_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until the run stops (Ctrl-C to leave)."),
    every: float = typer.Option(2.0, "--every", help="Seconds between refreshes with --watch."),
) -> None:
    """Evaluations done / failed / in flight, best per objective, Pareto size, hypervolume, cost."""
    from evomerge.results.journal import run_status

    if not watch:
        info = run_status(run_dir)
        print(json.dumps(info, indent=2) if as_json else status_text(run_dir, info))
        return
    if every <= 0:
        raise UserError(f"--every must be > 0 seconds, got {every}")
    _watch(run_dir, as_json, every)


def export_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    best: bool = typer.Option(False, "--best", help="Export the best candidate (on --objective; default the run's best: the first objective, or the front's knee)."),
    objective: Optional[str] = typer.Option(None, "--objective", help="The objective --best ranks by."),
    candidate: Optional[int] = typer.Option(None, "--candidate", help="Export this candidate id."),
    pareto: bool = typer.Option(False, "--pareto", help="Export every candidate of the Pareto front (one folder each)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (or file for --format recipe)."),
    fmt: str = typer.Option("hf", "--format", help="hf (merged checkpoint), mergekit (mergekit YAML), recipe (evomerge recipe YAML)."),
) -> None:
    """Write a candidate as a merged model, a mergekit config or a recipe."""
    from evomerge.results.export import export_run

    if best + (candidate is not None) + pareto != 1:
        raise UserError("choose exactly one of --best [--objective NAME], --candidate ID, --pareto")
    written = export_run(run_dir, out, fmt=fmt, best=objective if best else None, candidate=candidate,
                         pareto=pareto)
    for w in written:
        print(f"wrote {w}")


def report_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    out: Path = typer.Option(..., "-o", "--out", help="HTML file to write."),
) -> None:
    """A self-contained HTML report: best so far, the Pareto front, the best recipe as a heatmap."""
    from evomerge.results.report import write_report

    write_report(run_dir, out)
    print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the run commands to the `evomerge` app."""
    for name, command in (("run", run_command), ("resume", resume_command), ("holdout", holdout_command),
                          ("compare", compare_command), ("status", status_command), ("export", export_command),
                          ("report", report_command)):
        app.command(name)(command)


def status_text(run_dir: Path, info: dict[str, Any]) -> str:
    from evomerge.results.figures import fmt

    lines = [f"{run_dir}: {info['evaluations']} evaluations ({info['failed']} failed), {info['in_flight']} in flight, "
             f"{info['state']}"]
    lines += [f"  best {name} ({b['direction']}): {fmt(b['value'])}  (candidate {b['candidate']})"
              for name, b in info["best"].items()]
    hv = "" if info["hypervolume"] is None else f"; hypervolume {fmt(info['hypervolume'])}"
    lines.append(f"  pareto front: {info['pareto_size']} candidates{hv}")
    if info["cost"]:
        lines.append("  cost: " + ", ".join(f"{k} {fmt(v)}" for k, v in info["cost"].items()))
    s = info["scoring"]
    if s["stopped"] or s["estimated"]:
        lines.append(f"  examples scored: {s['examples']:.0f}; {s['stopped']} evaluations stopped by racing, "
                     f"{s['estimated']} estimated from anchors")
    return "\n".join(lines)


def _watch(run_dir: Path, as_json: bool, every: float) -> None:
    """Print the status every `every` seconds until the run's last session has ended: a terminal redraws it in
    place, a log (a cluster job's output) gets one timestamped block per refresh, written only when it changed."""
    import sys
    import time

    from evomerge.results.journal import run_status

    tty = sys.stdout.isatty()
    last = None
    try:
        while True:
            info = run_status(run_dir)
            text = json.dumps(info) if as_json else status_text(run_dir, info)
            if text != last:
                stamp = time.strftime("%H:%M:%S")
                print(("\x1b[2J\x1b[H" if tty else "") + (text if as_json else f"[{stamp}] {text}"), flush=True)
                last = text
            if info["holder"] is None and info["sessions"]:  # no live process holds the run: it ended or died
                return
            time.sleep(every)
    except KeyboardInterrupt:
        return
