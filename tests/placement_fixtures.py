"""Load-time hooks for the placement tests: a space's starting points are computed whenever a worker loads,
so a `space.points` function here makes a Ray worker fail while loading (never the test's own process).
Importable by name from Ray workers (the session's Ray puts tests/ on their path)."""
from __future__ import annotations

import os
import time
from pathlib import Path

START = [[0.5, 0.5]]


def _in_actor() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def raises_in_worker():
    if _in_actor():
        raise ValueError("cannot read the sources on this node")
    return START


def exits_in_worker():
    if _in_actor():
        os._exit(1)  # the process vanishes mid-load, as when the OOM killer takes it
    return START


def _marker(name: str) -> Path:
    return Path(os.environ["EVOMERGE_TEST_MARKER"]).with_name(name)


def mark() -> Path:
    """Once it exists, the next worker that loads dies while loading (and takes it away: one death)."""
    return _marker("cannot-load")


def reloaded() -> Path:
    """Written by the worker loaded after that death: the run saw it and placed the slot again."""
    return _marker("reloaded")


def markers() -> list[Path]:
    return [mark(), _marker("load-failed"), reloaded()]


def exits_once_marked():
    if _in_actor():
        if mark().exists():
            mark().rename(_marker("load-failed"))
            os._exit(1)
        if _marker("load-failed").exists():
            reloaded().write_text("")
    return START


def kills_its_worker_once(handle) -> dict[str, float]:
    """Candidate 1 kills the process evaluating it and arms `mark()`, so its replacement cannot load. Once armed,
    every evaluation waits until the slot is placed again, so the run cannot end before it sees the failed load
    (a loaded machine once finished the budget first). The others take 0.3 s. `gpu_hidden`: whether a worker that
    reserved no GPU sees none."""
    if handle.candidate_id == 1 and not any(m.exists() for m in markers()):
        mark().write_text("")
        os._exit(1)
    deadline = time.monotonic() + 120
    while any(m.exists() for m in markers()) and not reloaded().exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    return {"score": -sum((v - 0.3) ** 2 for v in handle.x),
            "gpu_hidden": float(os.environ.get("CUDA_VISIBLE_DEVICES") == "")}
