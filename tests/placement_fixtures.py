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


def mark() -> Path:
    """Once it exists, a worker that loads dies while loading."""
    return Path(os.environ["EVOMERGE_TEST_MARKER"]).with_name("cannot-load")


def exits_once_marked():
    if _in_actor() and mark().exists():
        os._exit(1)
    return START


def kills_its_worker_once(handle) -> dict[str, float]:
    """Candidate 1 kills the process evaluating it and arms `mark()`, so its replacement cannot load. The
    others take 0.3 s: the run still has candidates to give when the death is seen. `gpu_hidden`: whether a
    worker that reserved no GPU sees none."""
    if handle.candidate_id == 1 and not mark().exists():
        mark().write_text("")
        os._exit(1)
    time.sleep(0.3)
    return {"score": -sum((v - 0.3) ** 2 for v in handle.x),
            "gpu_hidden": float(os.environ.get("CUDA_VISIBLE_DEVICES") == "")}
