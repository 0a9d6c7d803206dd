"""The run commands end to end (in process, through `main()`): bad input is one line and changes nothing;
status, report and export read a real run."""
from __future__ import annotations

import hashlib
import json
import sys

import pytest
import yaml

from evomerge.cli import main
from evomerge.run.store import STORE_FILE


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    old = sys.argv
    sys.argv = ["evomerge", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def _write(tmp_path, cfg: dict, name: str = "run.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _box(**over) -> dict:
    cfg = {
        "space": {"bounds": [[0, 1]] * 4, "names": ["layer_0.w", "layer_1.w", "layer_0.d", "layer_1.d"]},
        "optimizer": {"name": "nsga2", "options": {"popsize": 8}},
        "fitness": {"function": "runs_fixtures:two_objectives",
                    "objectives": [{"name": "a", "direction": "min"}, {"name": "b", "direction": "min"}]},
        "budget": {"evaluations": 24},
        "seed": 2,
    }
    cfg.update(over)
    return cfg


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("mutate, needles", [
    (lambda c: c["budget"].update(evalutions=3), ["budget.evalutions", "evaluations, wall_time, cost"]),
    (lambda c: c.update(optimiser={}), ["'optimiser'", "optimizer"]),
    (lambda c: c["executor"].update(kind="slurm") if "executor" in c else c.update(executor={"kind": "slurm"}),
     ["executor.kind", "'local' or 'ray'"]),
    (lambda c: c.update(sources={"base": "nowhere/base"}, base="base"), ["sources.base", "nowhere/base", "no such local directory", "HF_HUB_OFFLINE=0"]),
    (lambda c: c["budget"].update(wall_time="soon"), ["wall_time", "90s, 30m"]),
    (lambda c: c["fitness"].update(function="no_such_module:score"), ["no_such_module:score", "cannot import"]),
    (lambda c: c["fitness"].update(function="runs_fixtures:nothing"), ["runs_fixtures:nothing", "no function"]),
    (lambda c: c.update(sources={"base": "."}, base="base"), ["sources.base", "no config.json"]),  # a folder, no model
    (lambda c: c.update(holdout={"tasks": [{"name": "t", "path": "t.jsonl"}], "baselines": {"TIES": {
        "merge_method": "ties", "base_model": "base", "models": [{"model": "math", "parameters": {"weight": 1, "density": 1.7}}]}}}),
     ["holdout.baselines.TIES", "parameter 'density' for model 'math' must be in [0, 1], got 1.7"]),
    (lambda c: c["optimizer"].update(name="hillclimb"), ["hillclimb", "cmaes"]),
    (lambda c: c.update(space={"name": "layer_weighs"}), ["layer_weighs", "layer_weights"]),
    (lambda c: c["optimizer"]["options"].update(sigma=2), ["'sigma'", "popsize"]),
])
def test_bad_config_is_one_line_and_creates_nothing(tmp_path, capsys, mutate, needles):
    cfg = _box()
    mutate(cfg)
    code, _, err = _cli(capsys, "run", str(_write(tmp_path, cfg)), "--run-dir", str(tmp_path / "r"))
    _one_line_error(code, err, *needles)
    assert not (tmp_path / "r").exists()


def test_not_a_run_dir(tmp_path, capsys):
    for cmd in (["status"], ["resume"], ["report", "-o", str(tmp_path / "x.html")], ["export", "--best", "-o", str(tmp_path / "o")]):
        code, _, err = _cli(capsys, cmd[0], str(tmp_path), *cmd[1:])
        _one_line_error(code, err, "not an evomerge run directory")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def finished_run(tmp_path, capsys):
    code, out, err = _cli(capsys, "run", str(_write(tmp_path, _box())), "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    assert "24/24" in out or "24/24" in err  # the progress bar reached the budget
    return tmp_path / "r"


def test_status_report_export_and_refusals(finished_run, tmp_path, capsys):
    code, out, _ = _cli(capsys, "status", str(finished_run), "--json")
    info = json.loads(out)
    assert code == 0 and info["evaluations"] == 24 and info["in_flight"] == 0 and info["failed"] == 0
    assert set(info["best"]) == {"a", "b"} and info["pareto_size"] >= 2 and info["hypervolume"] > 0
    assert info["last_stop"] == "budget: evaluations"

    code, _, err = _cli(capsys, "report", str(finished_run), "-o", str(tmp_path / "rep.html"))
    page = (tmp_path / "rep.html").read_text()
    assert code == 0 and "Pareto front" in page and "<script src" not in page  # self-contained: plotly.js inline
    assert '"x":["layer 0","layer 1"],"xgap":1,"y":["w","d"]' in page  # heatmap: rows w and d over layer columns 0 and 1

    # a second `run` on the same directory refuses without --resume
    code, _, err = _cli(capsys, "run", str(tmp_path / "run.yaml"), "--run-dir", str(finished_run))
    _one_line_error(code, err, "already holds a run", "--resume")
    # export needs exactly one choice
    code, _, err = _cli(capsys, "export", str(finished_run), "-o", str(tmp_path / "o"))
    _one_line_error(code, err, "exactly one of")


@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_corrupted_store_every_command_fails_cleanly_and_touches_nothing(finished_run, tmp_path, capsys, damage):
    path = finished_run / STORE_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\0" * len(data))
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in finished_run.iterdir()}
    for cmd in (["status"], ["status", "--json"], ["resume"], ["report", "-o", str(tmp_path / "x.html")],
                ["export", "--best", "--format", "recipe", "-o", str(tmp_path / "o.yaml")]):
        code, _, err = _cli(capsys, cmd[0], str(finished_run), *cmd[1:])
        _one_line_error(code, err, str(path))
    code, _, err = _cli(capsys, "run", str(tmp_path / "run.yaml"), "--run-dir", str(finished_run), "--resume")
    _one_line_error(code, err, str(path))
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in finished_run.iterdir()}
    assert after == before
    assert not (tmp_path / "x.html").exists() and not (tmp_path / "o.yaml").exists()


def test_resume_with_a_larger_budget_continues_as_if_planned(finished_run, tmp_path, capsys):
    from evomerge import open_run

    code, _, err = _cli(capsys, "resume", str(finished_run), "--evaluations", "0")
    _one_line_error(code, err, "budget.evaluations")
    code, _, err = _cli(capsys, "resume", str(finished_run), "--evaluations", "40", "-q")
    assert code == 0, err
    cfg = yaml.safe_load((tmp_path / "run.yaml").read_text())
    cfg["budget"]["evaluations"] = 40
    code, _, err = _cli(capsys, "run", str(_write(tmp_path, cfg, "run40.yaml")), "--run-dir", str(tmp_path / "r40"), "-q")
    assert code == 0, err
    a, b = open_run(finished_run).frame(), open_run(tmp_path / "r40").frame()
    assert len(a) == 40 and a.drop(columns=["seconds", "worker"]).equals(b.drop(columns=["seconds", "worker"]))


def test_progress_bar_keeps_its_columns_on_a_narrow_terminal(tmp_path, capsys, monkeypatch):
    """Done/total, elapsed, ETA and rate keep their width; the best-so-far values stay whole (labels go first)."""
    from evomerge import open_run

    monkeypatch.setenv("COLUMNS", "72")
    code, out, err = _cli(capsys, "run", str(_write(tmp_path, _box())), "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    line = [ln.rstrip() for ln in out.splitlines() if ln.startswith("search")][-1]
    assert len(line) <= 72, line
    assert "24/24" in line and "ETA 0:00:00" in line and "eval/min" in line, line
    run = open_run(tmp_path / "r")
    best = {o: float(run.best(o)[o]) for o in ("a", "b")}
    shown = [t.split("=")[-1] for t in line.split("best ", 1)[1].split()]  # 72 columns: room for the first value
    assert shown and shown == [f"{best['a']:.4g}", f"{best['b']:.4g}"][:len(shown)], line


@pytest.mark.parametrize("room, text", [
    (60, "best acc_tf/math_j=0.125 tok_acc/math_j=0.6875"),
    (32, "best acc_tf=0.125 tok_acc=0.6875"),  # the task all objectives share goes first
    (25, "best acc=0.125 tok=0.6875"),
    (21, "best a=0.125 t=0.6875"),
    (18, "best 0.125 0.6875"),
    (12, "best 0.125"),  # never a cut value: the first objective's, whole
])
def test_best_so_far_shortens_labels_never_values(room, text):
    from evomerge.run_commands import best_text

    assert best_text({"acc_tf/math_j": 0.125, "tok_acc/math_j": 0.6875}, 0, room) == text
    assert best_text({"acc_tf/math_j": 0.125}, 2, 40) == "best acc_tf/math_j=0.125 (2 failed)"
    assert best_text({"x/a": 0.5, "x/b": 0.25}, 0, 18) == "best a=0.5 b=0.25"


def test_seed_option_is_the_config_seed_and_not_for_a_resume(finished_run, tmp_path, capsys):
    from evomerge import open_run

    code, _, err = _cli(capsys, "run", str(_write(tmp_path, _box())), "--run-dir", str(tmp_path / "s7"), "--seed", "7", "-q")
    assert code == 0, err
    code, _, err = _cli(capsys, "run", str(_write(tmp_path, _box(seed=7), "seed7.yaml")), "--run-dir", str(tmp_path / "c7"), "-q")
    assert code == 0, err
    by_flag, by_config, seed2 = (open_run(d).frame().drop(columns=["seconds", "worker"]) for d in
                                 (tmp_path / "s7", tmp_path / "c7", finished_run))
    assert by_flag.equals(by_config) and not by_flag.equals(seed2.iloc[:len(by_flag)])
    code, _, err = _cli(capsys, "run", str(tmp_path / "run.yaml"), "--run-dir", str(finished_run), "--resume", "--seed", "3")
    _one_line_error(code, err, "--seed starts a new search")


def test_a_model_run_prints_only_evomerges_lines_and_its_best_values_at_80_columns(tiny_models, tmp_path):
    """A short real run (HF scoring of merged tiny models) as a user starts it, in a fresh process on an
    80-column console: no transformers bars or warnings, nothing but evomerge's lines; the progress bar shows
    the best values whole. With --verbose the other libraries speak again."""
    import os
    import subprocess
    from pathlib import Path

    task = tmp_path / "math_j.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "reference": str(2 * a)}) + "\n" for a in range(10, 16)))
    cfg = {"sources": {k: str(v) for k, v in tiny_models.items()}, "base": "base",
           "space": {"name": "layer_weights", "options": {"method": "ties"}}, "optimizer": {"name": "random"},
           "fitness": {"tasks": [{"name": "math_j", "path": str(task), "metrics": ["teacher_exact", "token_accuracy"]}]},
           "budget": {"evaluations": 3}, "seed": 1}
    config = _write(tmp_path, cfg)

    def run(*extra: str) -> tuple[list[str], Path]:
        out = tmp_path / f"r{len(extra)}"
        res = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(config), "--run-dir", str(out), *extra],
                             env={**os.environ, "COLUMNS": "80"}, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return [ln.rstrip() for ln in (res.stdout + res.stderr).splitlines() if ln.strip()], out

    lines, out = run()
    assert all(ln.startswith(("evomerge: ", "this node: ", "search ")) for ln in lines), lines
    bar = [ln for ln in lines if ln.startswith("search ")][-1]
    from evomerge import open_run

    r = open_run(out)
    objectives = [o.name for o in r.objectives]
    best = [f"{float(r.best(o)[o]):.4g}" for o in objectives]
    assert len(bar) <= 80 and "3/3" in bar, bar
    assert [t.split("=")[-1] for t in bar.split("best ", 1)[1].split()] == best, (bar, best)
    lines, _ = run("--verbose")
    assert any("Loading weights" in ln for ln in lines), lines  # transformers' bar: what the default hides


def test_resume_and_export_refuse_a_source_that_changed_since_the_run_started(tmp_path, tiny_models, capsys, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    from evomerge.run.store import RunStore

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    sources = {k: shutil.copytree(v, tmp_path / "models" / k) for k, v in tiny_models.items()}
    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "reference": str(2 * a)}) + "\n" for a in range(3)))
    cfg = {"sources": {k: str(v) for k, v in sources.items()}, "base": "base",
           "space": {"name": "layer_weights", "options": {"method": "ties"}}, "optimizer": {"name": "random"},
           "fitness": {"tasks": [{"name": "t", "path": str(task), "metrics": ["teacher_exact"]}]},
           "budget": {"evaluations": 2}, "seed": 1}
    run_dir = tmp_path / "run"
    code, _, err = _cli(capsys, "run", str(_write(tmp_path, cfg)), "--run-dir", str(run_dir), "-q")
    assert code == 0, err
    with RunStore.open(run_dir, readonly=True) as s:
        assert set(s.sources) == {"base", "a", "b"} and "model.safetensors" in s.sources["a"]
        digest = s.sources["a"]["model.safetensors"]
    code, _, err = _cli(capsys, "export", str(run_dir), "--best", "-o", str(tmp_path / "best"))
    assert code == 0, err
    assert f"`model.safetensors` sha256 `{digest}`" in (tmp_path / "best" / "README.md").read_text()
    weights = sources["a"] / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1  # the same path, another checkpoint
    save_file(tensors, weights, metadata={"format": "pt"})
    before = (run_dir / "run.sqlite").read_bytes()
    code, _, err = _cli(capsys, "resume", str(run_dir), "--evaluations", "4", "-q")
    _one_line_error(code, err, "source 'a'", f"{weights} differs from the run's")
    assert (run_dir / "run.sqlite").read_bytes() == before  # nothing written
    code, _, err = _cli(capsys, "export", str(run_dir), "--best", "-o", str(tmp_path / "again"))
    _one_line_error(code, err, "source 'a'", f"{weights} differs from the run's")  # not weights other than scored
    assert not (tmp_path / "again").exists()


def test_a_space_whose_recipes_cannot_merge_is_one_line_before_the_run(tmp_path, tiny_models, capsys):
    """layer_weights over `linear` never sets the base's weight: said at start, not as a failed evaluation each."""
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"prompt": "1+1=", "reference": "2"}) + "\n")
    cfg = {"sources": {k: str(v) for k, v in tiny_models.items()}, "base": "base",
           "space": {"name": "layer_weights", "options": {"method": "linear"}}, "optimizer": {"name": "random"},
           "fitness": {"tasks": [{"name": "t", "path": str(task), "metrics": ["teacher_exact"]}]},
           "budget": {"evaluations": 2}, "seed": 1}
    code, _, err = _cli(capsys, "run", str(_write(tmp_path, cfg)), "--run-dir", str(tmp_path / "run"), "-q")
    _one_line_error(code, err, "missing required parameter 'weight' for model 'base'")
    assert not (tmp_path / "run").exists()


def test_a_run_that_only_fails_stops_in_one_line_naming_the_error(tmp_path, capsys):
    cfg = _box(fitness={"function": "runs_fixtures:reads_a_missing_file", "objectives": [{"name": "score"}]},
               optimizer={"name": "random"}, budget={"evaluations": 200})
    code, out, err = _cli(capsys, "run", str(_write(tmp_path, cfg)), "--run-dir", str(tmp_path / "r"), "-q")
    assert code == 1 and not err.strip(), err
    (line,) = [x for x in out.splitlines() if x.startswith("evomerge: stopped")]
    assert line.startswith("evomerge: stopped (failing: the first 10 evaluations all failed, the first with: ")
    assert "no-such-dev.jsonl" in line and "10 evaluations, 10 failed" in line
