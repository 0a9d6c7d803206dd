"""Shared fixtures. Every test process runs torch on one thread: two cores, contention is costly."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)

from runs_fixtures import ray_local  # noqa: E402,F401  the session's one Ray, defined once for every test file


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny random Llama base and two experts (base + random deltas), as HF checkpoint dirs."""
    from evomerge.zoo.random_models import random_expert, random_llama

    root = tmp_path_factory.mktemp("tiny")
    base = random_llama(root / "base", seed=0)
    return {
        "base": base,
        "a": random_expert(base, root / "a", seed=1),
        "b": random_expert(base, root / "b", seed=2),
    }


@pytest.fixture(scope="session")
def real_zoo(tmp_path_factory):
    """A truncated real zoo (`evomerge zoo build --real DIR --scale 0.04`: two steps per expert, 8 problems
    scored) built once per session through the real CLI: (DIR, the finished process)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("real-zoo")
    env = {**os.environ, "EVOMERGE_CACHE": str(root / "cache")}
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "zoo", "build", "--real", str(root / "real"),
                           "--scale", "0.04"], capture_output=True, text=True, env=env, timeout=900)
    return root / "real", done


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """Tiny random base + experts of an architecture family (tests/arch_fixtures.py), built once per session."""
    from tests.arch_fixtures import build_family

    root = tmp_path_factory.mktemp("families")
    built: dict = {}

    def get(name: str):
        if name not in built:
            built[name] = build_family(name, root / name)
        return built[name]

    return get
