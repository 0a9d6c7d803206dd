"""Cluster faults said in evomerge's words (issue 22): an --address where no Ray head answers is refused in one
line, bounded by the executor's TCP probe, instead of Ray's minutes of "Failed to connect to GCS" warnings."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from test_runs_cli import _box, _write


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    tests = os.path.dirname(__file__)  # the fixtures' module, for the child
    return {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("address, needles", [
    (f"127.0.0.1:{_free_port()}", ["cannot reach the Ray cluster at '127.0.0.1:", "nothing answered", "ray start --head"]),
    ("nowhere", ["--address 'nowhere'", "HOST:PORT"]),
])
def test_an_address_where_no_head_answers_is_one_line(tmp_path, address, needles):
    cfg = _write(tmp_path, _box(budget={"evaluations": 2}, executor={"kind": "ray", "workers": 1}))
    # the subprocess's own timeout only guards the suite: Ray alone would retry for minutes
    p = subprocess.run([sys.executable, "-c", "from evomerge.cli import main; main()", "run", str(cfg),
                        "--run-dir", str(tmp_path / "run"), "--address", address],
                       capture_output=True, text=True, timeout=120, env=_env())
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("evomerge: error:"), p.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    assert "Failed to connect to GCS" not in p.stdout + p.stderr
    assert not (tmp_path / "run").exists()
