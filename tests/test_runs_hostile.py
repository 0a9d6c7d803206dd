"""Careless hands on the run commands, with real CLI processes: two runs on one directory, full disks (a real
2 MB tmpfs), read-only and unwritable places, broken configs and stores. Each ends in exit 2 and exactly one
line "evomerge: error: ...", with nothing written; a store cut short by a full disk resumes to the full run."""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import yaml

from evomerge.records import UserError
from evomerge.run.store import LOCK_FILE, STORE_FILE, RunStore
from runs_fixtures import committed

TESTS = Path(__file__).resolve().parent


def _config(where: Path, evaluations: int = 30, **over) -> Path:
    cfg = {"space": {"bounds": [[0, 1]] * 3}, "optimizer": {"name": "random"},
           "fitness": {"function": "runs_fixtures:logged_sphere", "objectives": [{"name": "score", "direction": "max"}]},
           "budget": {"evaluations": evaluations}, "seed": 11, "snapshot_every": 5, **over}
    path = where / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(where: Path, sleep: float = 0.03) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]), "OMP_NUM_THREADS": "1",
            "EVOMERGE_TEST_CALLS": str(where / "calls"), "EVOMERGE_TEST_SLEEP": str(sleep)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from evomerge.cli import main; main()", *map(str, args)]


def _run(env: dict[str, str], *args) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=120)


def _one_line(out: subprocess.CompletedProcess, *expected: str) -> str:
    """Exit 2 and exactly one stderr line, "evomerge: error: ..." containing each of `expected`."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("evomerge: error: "), out.stderr
    for e in expected:
        assert e in lines[0], lines[0]
    return lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"/"
            for p in sorted(root.rglob("*"))} if root.exists() else {}



def _waitcommitted(run_dir: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while committed(run_dir) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert committed(run_dir) >= n, proc.poll()


@pytest.fixture
def tmpfs(tmp_path):
    """A real 2 MB tmpfs (root only); skipped where it cannot be mounted."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)


def _fill(disk: Path) -> Path:
    """Fill `disk` to the last byte with one file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    return filler


def _remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


# ---- one writer per run directory -------------------------------------------------------------------
def test_a_second_run_or_resume_on_a_busy_directory_is_refused_naming_the_holder(tmp_path):
    cfg, run_dir, env = _config(tmp_path, evaluations=40), tmp_path / "r", _env(tmp_path, sleep=0.3)
    holder = subprocess.Popen(_cli("run", cfg, "--run-dir", run_dir, "-q"), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    _waitcommitted(run_dir, 3, holder)
    before = committed(run_dir)
    line = _one_line(_run(env, "resume", run_dir, "-q"), f"pid {holder.pid} on {socket.gethostname()}, started ")
    assert "in use by another evomerge run" in line
    _one_line(_run(env, "run", cfg, "--run-dir", run_dir, "--resume", "-q"), f"pid {holder.pid}")
    assert holder.poll() is None and committed(run_dir) >= before  # the holder went on, untouched
    out, err = holder.communicate(timeout=120)
    assert holder.returncode == 0, err
    calls = [int(c) for c in (tmp_path / "calls").read_text().split()]
    assert sorted(calls) == list(range(40))  # no candidate evaluated twice
    status = json.loads(_run(env, "status", run_dir, "--json").stdout)
    assert status["last_stop"] == "budget: evaluations" and status["sessions"] == 1
    assert "last stop: budget: evaluations" in _run(env, "status", run_dir).stdout


def _state(env: dict[str, str], run_dir: Path) -> str:
    out = _run(env, "status", run_dir, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["state"] in _run(env, "status", run_dir).stdout.splitlines()[0]
    return info["state"]


def test_the_lock_dies_with_a_killed_holder_and_status_tells_running_killed_and_finished(tmp_path):
    cfg, run_dir, env = _config(tmp_path, evaluations=30), tmp_path / "r", _env(tmp_path, sleep=0.5)  # 15 s a run
    holder = subprocess.Popen(_cli("run", cfg, "--run-dir", run_dir, "-q"), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    _waitcommitted(run_dir, 3, holder)
    assert _state(env, run_dir).startswith(f"running (pid {holder.pid} on {socket.gethostname()}, started ")
    assert holder.poll() is None  # the status probe did not disturb the holder
    holder.kill()
    holder.wait()
    assert _state(env, run_dir) == "killed (no clean stop; `evomerge resume` continues it)"
    done = _run({**env, "EVOMERGE_TEST_SLEEP": "0"}, "resume", run_dir, "-q")  # at once: no stale lock to wait for or remove
    assert done.returncode == 0, done.stderr
    with RunStore.open(run_dir, readonly=True) as s:
        assert s.counts()["evaluations"] == 30 and s.sessions()[-1]["reason"] == "budget: evaluations"
    assert _state(env, run_dir) == "finished, last stop: budget: evaluations"


# ---- full disks, read-only and unwritable places ------------------------------------------------------
def test_disk_full_mid_run_is_one_line_and_the_store_resumes_to_the_full_run(tmp_path, tmpfs):
    cfg, env = _config(tmp_path, evaluations=40), _env(tmp_path)
    ref = _run(env, "run", cfg, "--run-dir", tmp_path / "ref", "-q")
    assert ref.returncode == 0, ref.stderr
    run_dir = tmpfs / "r"
    proc = subprocess.Popen(_cli("run", cfg, "--run-dir", run_dir, "-q"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _waitcommitted(run_dir, 5, proc)
    filler = _fill(tmpfs)
    out, err = proc.communicate(timeout=120)
    _one_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
              f"cannot write run store {run_dir / STORE_FILE}", "disk is full")
    assert 5 <= committed(run_dir) < 40
    filler.unlink()
    done = _run(env, "resume", run_dir, "-q")
    assert done.returncode == 0, done.stderr
    with RunStore.open(run_dir, readonly=True) as s, RunStore.open(tmp_path / "ref", readonly=True) as r:
        assert [(e.candidate_id, e.objectives) for e in s.evaluations()] == \
               [(e.candidate_id, e.objectives) for e in r.evaluations()]


def test_disk_full_at_store_creation_leaves_nothing(tmp_path, tmpfs):
    cfg, env = _config(tmp_path), _env(tmp_path)
    _fill(tmpfs)
    before = _tree(tmpfs)
    _one_line(_run(env, "run", cfg, "--run-dir", tmpfs / "r", "-q"), f"{tmpfs / 'r'}")
    _one_line(_run(env, "run", cfg, "--run-dir", tmpfs / "a" / "b", "-q"), f"{tmpfs / 'a' / 'b'}")
    assert _tree(tmpfs) == before  # no run directory, no 0-byte run.sqlite.creating


def test_resume_on_a_read_only_run_directory_and_a_run_into_one(tmp_path, tmpfs):
    cfg, env = _config(tmp_path, evaluations=6), _env(tmp_path, sleep=0)
    assert _run(env, "run", cfg, "--run-dir", tmpfs / "r", "-q").returncode == 0
    _remount(tmpfs, "ro")
    try:
        before = _tree(tmpfs)
        _one_line(_run(env, "resume", tmpfs / "r", "--evaluations", "9", "-q"), "Read-only file system", str(tmpfs / "r"))
        _one_line(_run(env, "run", cfg, "--run-dir", tmpfs / "new", "-q"), "Read-only file system", str(tmpfs / "new"))
        status = _run(env, "status", tmpfs / "r", "--json")  # reading still works
        assert status.returncode == 0 and json.loads(status.stdout)["evaluations"] == 6
        assert _tree(tmpfs) == before
    finally:
        _remount(tmpfs, "rw")


# ---- broken input ---------------------------------------------------------------------------------------
def test_broken_configs_flags_and_places_are_one_line_and_write_nothing(tmp_path):
    env = _env(tmp_path, sleep=0)
    cfg = _config(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(cfg.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    negative = tmp_path / "neg.yaml"
    negative.write_text(cfg.read_text().replace("seed: 11", "seed: -5"))
    (tmp_path / "afile").write_text("x")
    before = _tree(tmp_path)
    _one_line(_run(env, "run", latin, "--run-dir", tmp_path / "r1"), str(latin), "not UTF-8")
    _one_line(_run(env, "run", negative, "--run-dir", tmp_path / "r2"), "seed", "greater than or equal to 0")
    _one_line(_run(env, "run", cfg, "--run-dir", tmp_path / "r3", "--seed", "-5"), "seed", "greater than or equal to 0")
    _one_line(_run(env, "run", cfg, "--run-dir", tmp_path / "afile"), str(tmp_path / "afile"), "not a directory")
    _one_line(_run(env, "run", cfg, "--run-dir", tmp_path / "afile" / "r"), str(tmp_path / "afile" / "r"))
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("table,column", [("evaluations", "objectives"), ("candidates", "meta"), ("meta", "value")])
def test_a_store_record_that_does_not_parse_is_one_line_naming_it(tmp_path, table, column):
    env = _env(tmp_path, sleep=0)
    run_dir = tmp_path / "r"
    assert _run(env, "run", _config(tmp_path, evaluations=6), "--run-dir", run_dir, "-q").returncode == 0
    key = {"evaluations": "candidate_id", "candidates": "id", "meta": "key"}[table]
    row = "'objectives'" if table == "meta" else "3"
    con = sqlite3.connect(run_dir / STORE_FILE)
    con.execute(f"UPDATE {table} SET {column} = '{{broken' WHERE {key} = {row}")
    con.commit()
    con.close()
    before = _tree(run_dir)
    name = f"run store record {table} {row.strip(chr(39))} ({column}) is not valid JSON"
    _one_line(_run(env, "status", run_dir), name)
    if table != "candidates":  # a resume reads a candidate's meta only while it is in flight
        _one_line(_run(env, "resume", run_dir, "--evaluations", "8", "-q"), name)  # the raised budget unstored too
    after = _tree(run_dir)
    after.pop(LOCK_FILE), before.pop(LOCK_FILE)  # a refused resume held the lock: its holder line changed
    # a read-only SQLite reader may leave the WAL index files beside the store: no data, and none in the WAL
    assert after.pop(STORE_FILE + "-wal", b"") == b""
    after.pop(STORE_FILE + "-shm", None)
    assert after == before


# ---- a seeded fuzz of run configs -----------------------------------------------------------------------
CONFIG_KEYS = ["extra", "sources", "base", "space", "optimizer", "fitness", "budget", "executor", "seed", "options", "name",
               "path", "holdout", "workers", "evaluations", "wall_time", "cost", "snapshot_every", "tasks", "metrics",
               "objectives", "function", "backend", "handle", "racing", "subset", "bounds", "method", ""]


@pytest.fixture(scope="module")
def config_fuzz(tmp_path_factory):
    """(the project's run configs, copied with what they name by relative path, the outcome per seeded mutation):
    2,000 mutations, each loaded and checked in this process as `evomerge run` does before it writes anything
    (load_run_config, prepare, the memory plan's check): a UserError or a config that passes, never another
    exception. runs/demo_lmeval.yaml is left out: lm-eval builds its task for each check (0.6 s)."""
    from evomerge.run.assemble import prepare
    from evomerge.mergekit_evolve import load_run_config
    from fuzz_fixtures import encode, mutate

    where = tmp_path_factory.mktemp("config-fuzz")
    shutil.copytree(TESTS.parent / "runs", where / "runs", ignore=lambda d, names: [n for n in names if (Path(d) / n).is_dir()
                                                                                  and n != "lmeval_tasks"])
    (where / "evomerge").symlink_to(TESTS.parent / "evomerge")
    configs = sorted(p for p in (where / "runs").glob("*.yaml") if p.name != "demo_lmeval.yaml")
    valid = {p: yaml.safe_load(p.read_text()) for p in configs}
    rng, outcomes = random.Random(23), []
    for i in range(2000):
        source = rng.choice(configs)
        data = valid[source]
        for _ in range(rng.choice([1, 1, 2, 3])):
            data = mutate(data, rng, CONFIG_KEYS)
        path = source.with_name(f"fuzz{i}.yaml")
        try:
            text = yaml.safe_dump(data, allow_unicode=True)
        except RecursionError:  # PyYAML's writer recurses: deep nesting goes out as JSON, which is YAML too
            text = json.dumps(data)
        path.write_bytes(encode(text, rng))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                prepare(load_run_config(path))[2].check()
            outcomes.append((path, "ok"))
        except UserError as e:
            outcomes.append((path, str(e)))
        except Exception as e:  # noqa: BLE001  the finding: collected, then shown all at once
            at = traceback.extract_tb(e.__traceback__)[-1]
            outcomes.append((path, f"BUG {type(e).__name__} at {Path(at.filename).name}:{at.lineno}: {e}"))
    return where, outcomes


def test_fuzz_of_2000_mutated_run_configs_gives_no_traceback(config_fuzz):
    _, outcomes = config_fuzz
    bugs = [(p.name, o[:300], p.read_bytes()[:600]) for p, o in outcomes if o.startswith("BUG ")]
    assert not bugs, bugs
    refused = sum(o != "ok" for _, o in outcomes)
    print(f"config fuzz: {len(outcomes)} mutations, {refused} refused with one line, {len(outcomes) - refused} valid")
    assert refused > 1000 and len(outcomes) - refused > 50  # most break the config; some stay valid


def test_a_sample_of_fuzzed_configs_through_the_cli_is_exit_2_one_line_nothing_written(config_fuzz, tmp_path):
    where, outcomes = config_fuzz
    refused = [(p, o) for p, o in outcomes if o != "ok"]
    before = _tree(where)
    for k, (path, message) in enumerate(random.Random(5).sample(refused, 20)):
        out = _run(_env(tmp_path, sleep=0), "run", path, "--run-dir", where / f"r{k}", "-q")
        assert _one_line(out) == f"evomerge: error: {message}".strip()  # the CLI says what the in-process check said
        assert _tree(where) == before, path


def test_export_reads_a_live_run_whole_and_holdout_on_it_is_refused(tmp_path, tiny_models):
    """`export` reads a consistent snapshot of a run still going (SQLite WAL readers need no lock) and writes its
    output whole; `holdout` on it is one line naming the holder, nothing written (the run scores its own table at
    its end); the live run goes on untouched and stops cleanly on Ctrl-C (a budget it never reaches here)."""
    cfg = {"sources": {k: str(v) for k, v in tiny_models.items()}, "base": "base",
           "space": {"name": "layer_weights", "options": {"method": "ties"}}, "optimizer": {"name": "random"},
           "fitness": {"tasks": [{"name": "t", "path": str(tmp_path / "t.jsonl"), "metrics": ["teacher_exact"]}]},
           "budget": {"evaluations": 100_000}, "seed": 3}
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "reference": str(2 * a)}) + "\n" for a in range(3)))
    path, run_dir, env = tmp_path / "run.yaml", tmp_path / "r", _env(tmp_path)
    path.write_text(yaml.safe_dump(cfg))
    holder = subprocess.Popen(_cli("run", path, "--run-dir", run_dir, "-q"), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    _waitcommitted(run_dir, 3, holder)
    before = _tree(run_dir)
    _one_line(_run(env, "holdout", run_dir), f"is still being searched (pid {holder.pid} on ")
    out = _run(env, "export", run_dir, "--best", "-o", tmp_path / "best")
    assert out.returncode == 0, out.stderr
    assert {p.name for p in (tmp_path / "best").iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert holder.poll() is None and not (run_dir / "holdout.json").exists()
    assert set(_tree(run_dir)) == set(before)  # the readers added no file to the live run
    holder.send_signal(signal.SIGINT)
    assert holder.wait(timeout=120) == 130, holder.stderr.read()[-2000:]
    assert committed(run_dir) >= 3 and _state(env, run_dir) == "stopped, last stop: interrupted"
