"""Merge outputs as a shell user sees them, with real `evomerge merge` processes: files follow the umask, what
killed merges left beside OUT is cleaned (only when its writer is gone), an existing OUT is swapped in one step,
and numba's compiled kernels are cached per user, not inside the package."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import evomerge.merge.kernels
from evomerge.merge.writer import _exchange

ROOT = Path(__file__).resolve().parent.parent
TIES = {"merge_method": "ties", "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.5}},
                   {"model": "b", "parameters": {"weight": 0.6, "density": 0.8}}]}


@pytest.fixture()
def workdir(tiny_models, tmp_path):
    for name, path in tiny_models.items():
        (tmp_path / name).symlink_to(path)
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(TIES))
    return tmp_path


def _merge(workdir: Path, out: Path, *extra: str, umask: int = 0o022, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(workdir / "merge.yaml"), "-o", str(out),
                           *extra], cwd=workdir, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: os.umask(umask),
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_follows_the_umask(workdir, umask):
    out = workdir / "merged"
    done = _merge(workdir, out, umask=umask)
    assert done.returncode == 0, done.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert "model.safetensors" in modes  # written private by safetensors before
    assert modes.pop("merged") == 0o777 & ~umask
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_what_killed_merges_left_is_removed_and_a_live_merges_kept(workdir):
    out, host = workdir / "merged", socket.gethostname()
    dead, live = _dead_pid(), os.getpid()
    stale = [workdir / f".merged.{dead}@{host}.abcd1234.partial", workdir / f".merged.{dead}@{host}.efgh5678.old"]
    kept = [workdir / f".merged.{live}@{host}.ijkl9012.partial",  # a merge still running
            workdir / f".merged.{dead}@other.host.mnop3456.partial",  # another host's: its pid says nothing here
            workdir / ".other.{dead}@{host}.qrst7890.partial"]  # another OUT's
    for p in stale + kept:
        (p / "sub").mkdir(parents=True)
        (p / "sub" / "shard").write_bytes(b"\0" * 1000)
    done = _merge(workdir, out)
    assert done.returncode == 0, done.stderr
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert (out / "model.safetensors").is_file()


def test_an_out_a_killed_merge_had_moved_aside_comes_back(workdir):
    """The swap without renameat2: OUT moved into `.old`, then the process killed before the new one moved in."""
    out = workdir / "merged"
    assert _merge(workdir, out).returncode == 0
    aside = workdir / f".merged.{_dead_pid()}@{socket.gethostname()}.abcd1234.old"
    aside.mkdir()
    out.rename(aside / "out")
    again = _merge(workdir, out)  # without --force: the old OUT is back, and kept
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (out / "model.safetensors").is_file() and not aside.exists()


def test_force_swaps_out_in_one_step(workdir, tmp_path):
    a, b = tmp_path / "x" / "a", tmp_path / "x" / "b"
    a.mkdir(parents=True)
    b.mkdir()
    (a / "f").write_text("new")
    (b / "f").write_text("old")
    ino = a.stat().st_ino
    assert _exchange(a, b)  # this Linux and file system have renameat2 RENAME_EXCHANGE
    assert (b / "f").read_text() == "new" and (a / "f").read_text() == "old" and b.stat().st_ino == ino
    out = workdir / "merged"
    assert _merge(workdir, out).returncode == 0
    (out / "marker").write_text("the old OUT")
    done = _merge(workdir, out, "--force")
    assert done.returncode == 0, done.stderr
    assert not (out / "marker").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".merged.")]


def test_compiled_kernels_are_cached_per_user_not_in_the_package(tmp_path):
    package_cache = Path(evomerge.merge.kernels.__file__).parent / "__pycache__"
    before = {p: p.stat().st_mtime for p in package_cache.glob("kernels*.nb*")}
    start = time.time()
    code = ("import numpy as np; from evomerge.merge import kernels as k; h = np.zeros(2 * k.BINS, np.int64); "
            "k.histogram(np.zeros(10, np.float32), np.ones(10, np.float32), h); assert h.sum() == 10")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "EVOMERGE_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    cached = list((tmp_path / "cache" / "numba").rglob("kernels.histogram*.nbi"))
    assert cached and all(p.stat().st_mtime >= start - 1 for p in cached)
    assert {p: p.stat().st_mtime for p in package_cache.glob("kernels*.nb*")} == before


def test_a_killed_merge_leaves_a_partial_named_after_it_which_the_next_merge_removes(workdir):
    out = workdir / "merged"
    cmd = [sys.executable, "-m", "evomerge.cli", "merge", str(workdir / "merge.yaml"), "-o", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partials: list[Path] = []
    while not partials and proc.poll() is None:
        partials = list(workdir.glob(".merged.*.partial"))
    proc.kill()
    proc.wait()
    assert partials and partials[0].exists() and not out.exists(), "the merge ended before it could be killed"
    assert partials[0].name.startswith(f".merged.{proc.pid}@{socket.gethostname()}.")
    done = _merge(workdir, out)
    assert done.returncode == 0, done.stderr
    assert not [p for p in workdir.iterdir() if p.name.startswith(".merged.")]
