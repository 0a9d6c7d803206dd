"""Executors: where candidates get evaluated. The engine streams candidates in and evaluations out.

- `LocalExecutor`: one worker, in this process. The default on a CPU machine, and deterministic.
- `RayExecutor`: one Ray actor per worker, each holding its own resources (a GPU where asked); the
  worker (sources, materializer, fitness) is built once per actor and stays resident. A free actor gets
  the next candidate at once (no generation barrier). An actor that dies mid-evaluation is replaced and
  its candidate retried up to `max_retries` times, then recorded as failed.

This is the only module that imports ray.

A worker factory (`make_worker`) is any picklable zero-argument callable returning an object with
`evaluate(Candidate) -> Evaluation` that never raises for a bad candidate (see evomerge.worker).
"""
from __future__ import annotations

import os
import socket
import time
from collections import deque
from typing import Any, Callable, Protocol

from evomerge.records import Candidate, Evaluation, UserError


class Evaluator(Protocol):
    def evaluate(self, candidate: Candidate) -> Evaluation: ...


WorkerFactory = Callable[[], Evaluator]


class Executor(Protocol):
    workers: int

    def start(self) -> None: ...
    def idle(self) -> int: ...
    def submit(self, candidate: Candidate) -> None: ...
    def wait(self, timeout: float | None = None) -> list[Evaluation]: ...
    def pending(self) -> list[int]: ...
    def shutdown(self) -> None: ...


class LocalExecutor:
    """Evaluates in this process, one candidate at a time, in submission order."""

    workers = 1

    def __init__(self, make_worker: WorkerFactory):
        self._make_worker = make_worker
        self._worker: Evaluator | None = None
        self._queue: deque[Candidate] = deque()
        self._name = f"local@{socket.gethostname()}:{os.getpid()}"

    def start(self) -> None:
        if self._worker is None:
            self._worker = self._make_worker()

    def idle(self) -> int:
        return 0 if self._queue else 1

    def submit(self, candidate: Candidate) -> None:
        self._queue.append(candidate)

    def pending(self) -> list[int]:
        return [c.id for c in self._queue]

    def wait(self, timeout: float | None = None) -> list[Evaluation]:
        if not self._queue:
            return []
        assert self._worker is not None, "start() the executor first"
        cand = self._queue[0]
        ev = self._worker.evaluate(cand)  # a Ctrl-C here leaves the candidate pending: it was not evaluated
        self._queue.popleft()
        ev.worker = ev.worker or self._name
        return [ev]

    def shutdown(self) -> None:
        self._worker = None


class _Actor:
    """The body of one Ray actor: a resident worker evaluating one candidate at a time."""

    def __init__(self, make_worker: WorkerFactory, name: str):
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        self.name = f"{name}@{socket.gethostname()}/{self.node[:8]}:{os.getpid()}"
        self.worker = make_worker()

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(), "node": self.node}

    def evaluate(self, candidate: dict[str, Any]) -> dict[str, Any]:
        ev = self.worker.evaluate(Candidate.from_dict(candidate))
        ev.worker = ev.worker or self.name
        return ev.to_dict()


class RayExecutor:
    """A pool of Ray actors fed as they free up. `address=None` starts a local Ray; "auto" joins a cluster."""

    def __init__(
        self, make_worker: WorkerFactory, *, workers: int = 1, cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0, address: str | None = None, max_retries: int = 2,
        init_options: dict[str, Any] | None = None,
    ):
        if workers < 1:
            raise UserError(f"executor.workers must be >= 1, got {workers}")
        self.workers = workers
        self._make_worker = make_worker
        self._cpus, self._gpus = cpus_per_worker, gpus_per_worker
        self._address = address
        self.max_retries = max_retries
        self._init_options = init_options or {}
        self._owns_ray = False
        self._actors: list[Any] = []
        self._idle: deque[int] = deque()
        self._running: dict[Any, tuple[int, Candidate, int]] = {}  # ref -> (slot, candidate, attempt)
        self._retry: deque[tuple[Candidate, int]] = deque()
        self.replaced = 0  # actors replaced after dying: for status and tests

    def start(self) -> None:
        import ray

        if self._actors:
            return
        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            try:
                ray.init(address=self._address, log_to_driver=False, **self._init_options)
            except ConnectionError as e:
                raise UserError(f"cannot join the Ray cluster at {self._address!r}: {e}") from None
            self._owns_ray = True
        self._remote = ray.remote(_Actor)
        self._actors = [self._spawn(i) for i in range(self.workers)]
        try:  # surface a worker that cannot even start (bad sources, missing package) once, clearly
            ray.get([a.info.remote() for a in self._actors])
        except ray.exceptions.RayActorError as e:
            self.shutdown()
            raise UserError(f"a Ray worker failed to start: {_summary(e)}") from None
        self._idle = deque(range(self.workers))

    def _spawn(self, slot: int):
        return self._remote.options(num_cpus=self._cpus, num_gpus=self._gpus, max_restarts=0).remote(
            self._make_worker, f"ray-{slot}")

    def idle(self) -> int:
        return len(self._idle) - len(self._retry)

    def pending(self) -> list[int]:
        return [c.id for _, c, _ in self._running.values()] + [c.id for c, _ in self._retry]

    def submit(self, candidate: Candidate) -> None:
        self._dispatch(candidate, 1)

    def _dispatch(self, candidate: Candidate, attempt: int) -> None:
        if not self._idle:
            self._retry.append((candidate, attempt))
            return
        slot = self._idle.popleft()
        ref = self._actors[slot].evaluate.remote(candidate.to_dict())
        self._running[ref] = (slot, candidate, attempt)

    def wait(self, timeout: float | None = None) -> list[Evaluation]:
        import ray

        out: list[Evaluation] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while not out and self._running:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(self._running), num_returns=1, timeout=left)
            if not ready:
                break
            ready, _ = ray.wait(list(self._running), num_returns=len(self._running), timeout=0)
            for ref in ready:
                slot, cand, attempt = self._running.pop(ref)
                try:
                    out.append(Evaluation.from_dict(ray.get(ref)))
                    self._idle.append(slot)
                except ray.exceptions.RayActorError as e:
                    # the process died (OOM, kill, node lost): replace the actor, retry the candidate
                    self._actors[slot] = self._spawn(slot)
                    self.replaced += 1
                    self._idle.append(slot)
                    if attempt <= self.max_retries:
                        self._retry.append((cand, attempt + 1))
                    else:
                        out.append(Evaluation.failure(
                            cand.id, f"worker died {attempt} times evaluating it: {_summary(e)}",
                            worker=f"ray-{slot}"))
                except ray.exceptions.RayError as e:  # the worker raised despite its contract: a failure
                    self._idle.append(slot)
                    out.append(Evaluation.failure(cand.id, _summary(e), worker=f"ray-{slot}"))
            while self._retry and self._idle:
                cand, attempt = self._retry.popleft()
                self._dispatch(cand, attempt)
        return out

    def shutdown(self) -> None:
        import ray

        for a in self._actors:
            try:
                ray.kill(a)
            except Exception:  # already dead: nothing to release
                pass
        self._actors, self._running = [], {}
        self._idle.clear()
        self._retry.clear()
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


def _summary(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__
