"""Executors: where candidates get evaluated. The engine streams candidates in and evaluations out.

- `LocalExecutor`: one worker, in this process. The default on a CPU machine, and deterministic.
- `RayExecutor`: one Ray actor per worker, each holding its own resources (a GPU where asked); the
  worker (sources, materializer, fitness) is built once per actor and stays resident. A free actor gets
  the next candidate at once (no generation barrier). An actor that dies mid-evaluation is replaced and
  its candidate retried up to `max_retries` times, then recorded as failed; a replacement gets candidates
  only once it is placed and loaded. A worker not placed within `placement_grace` seconds is said in one
  line and the run goes on with those placed (it joins when capacity returns), or stops when none is.
  An actor that dies while loading (its factory raised, or it was killed, e.g. out of memory): at start the
  run is refused; later (a node that cannot load) its slot is placed again, up to `load_tries` times in a
  row, then given up with one line; the run ends when no worker is left. A cluster whose head (GCS) stops
  answering for HEAD_LOST_S is handed to `on_lost` (the engine's), before Ray's driver aborts in C++ a
  minute later.

This is the only module that imports ray.

A worker factory (`make_worker`) is any picklable zero-argument callable returning an object with
`evaluate(Candidate) -> Evaluation` that never raises for a bad candidate (see evomerge.run.worker).
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Protocol

from evomerge.quiet import route_ray_loggers
from evomerge.records import Candidate, Evaluation, UserError

log = logging.getLogger("evomerge")


class Evaluator(Protocol):
    def evaluate(self, candidate: Candidate) -> Evaluation: ...


MakeWorker = Callable[[], Evaluator]


class Executor(Protocol):
    workers: int

    def start(self) -> None: ...
    def idle(self) -> int: ...
    def submit(self, candidate: Candidate) -> None: ...
    def pending(self) -> list[int]: ...
    def wait(self, timeout: float | None = None) -> list[Evaluation]: ...
    def shutdown(self) -> None: ...


class LocalExecutor:
    """Evaluates in this process, one candidate at a time, in submission order."""

    workers = 1

    def __init__(self, make_worker: MakeWorker):
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
        worker, self._worker = self._worker, None
        close = getattr(worker, "close", None)
        if close is not None:
            close()  # an engine's processes stop now, while the interpreter is whole, not in its teardown


class _Actor:
    """The body of one Ray actor: a resident worker evaluating one candidate at a time."""

    def __init__(self, make_worker: MakeWorker, name: str):
        import ray

        ctx = ray.get_runtime_context()
        if not ctx.get_accelerator_ids().get("GPU"):
            # Ray no longer hides the GPUs from an actor that reserved none: `auto` placement would put every
            # such actor on GPU 0, beside the ones that did reserve it
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        self.node = ctx.get_node_id()
        self.name = f"{name}@{socket.gethostname()}/{self.node[:8]}:{os.getpid()}"
        self._make_worker = make_worker  # loaded by `load`, so that placed and loaded can be told apart

    def placed(self) -> str:
        return self.node

    def load(self) -> dict[str, Any]:
        self.worker = self._make_worker()
        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(), "node": self.node}

    def evaluate(self, candidate: dict[str, Any]) -> dict[str, Any]:
        ev = self.worker.evaluate(Candidate.from_dict(candidate))
        ev.worker = ev.worker or self.name
        return ev.to_dict()


class RayExecutor:
    """A pool of Ray actors fed as they free up. `address=None` starts a local Ray; "auto" joins a cluster."""

    def __init__(
        self, make_worker: MakeWorker, *, workers: int = 1, cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0, address: str | None = None, max_retries: int = 2,
        placement_grace: float = 60.0, load_tries: int = 3, init_options: dict[str, Any] | None = None,
    ):
        if workers < 1:
            raise UserError(f"executor.workers must be >= 1, got {workers}")
        self.workers = workers
        self._make_worker = make_worker
        self._cpus, self._gpus = cpus_per_worker, gpus_per_worker
        self._address = address
        self.max_retries = max_retries
        self.grace = placement_grace
        self.load_tries = load_tries
        # told (head's GCS address, the address the run joined by) when the head is lost; may not return
        self.on_lost: Callable[[str, str | None], None] | None = None
        self._watchdog: threading.Event | None = None  # set to stop it
        self._load_fails: dict[int, int] = {}  # slot -> loads failed in a row since it last loaded
        self._init_options = init_options or {}
        self._owns_ray = False
        self._actors: list[Any] = []  # None: a retired slot (its worker died while loading)
        self._loaded: list[Any] = []  # per slot: a reference that resolves once its worker has loaded
        self._placed: list[Any] = []  # per slot: a reference that resolves once its actor has a node
        self._idle: deque[int] = deque()
        self._running: dict[Any, tuple[int, Candidate, int]] = {}  # ref -> (slot, candidate, attempt)
        self._retry: deque[tuple[Candidate, int]] = deque()
        self._placing: dict[Any, tuple[int, float, bool]] = {}  # loaded ref -> (slot, since, shortfall said)
        self._nodes: dict[int, str] = {}  # slot -> the node its worker loaded on, for the lines that name it
        self.replaced = 0  # actors replaced after dying: for status and tests

    def start(self) -> None:
        import ray

        if self._actors:
            return
        if not ray.is_initialized():
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            _probe(self._address)
            try:
                # quiet: Ray's own start-up lines are not the run's output
                ray.init(address=self._address, log_to_driver=False, **{"logging_level": logging.WARNING, **self._init_options})
            except ConnectionError as e:
                raise UserError(f"cannot join the Ray cluster at {self._address!r}: {e}") from None
            self._owns_ray = True
            route_ray_loggers()
            self._watch_head(ray.get_runtime_context().gcs_address)
            if self._address is None:  # a Ray of this machine alone: no node will join, what it lacks never comes
                self._check_fits(ray.cluster_resources())
        self._remote = ray.remote(_Actor)
        self._loaded, self._placed = [None] * self.workers, [None] * self.workers
        self._actors = [self._spawn(i) for i in range(self.workers)]
        while self._placing:  # the first worker that cannot load (bad sources, out of memory) ends the start, clearly
            try:
                self._settle(time.monotonic() + self.grace, starting=True)
            except UserError:
                self.shutdown()
                raise
            if not self._placing or all(said for _, _, said in self._placing.values()):
                break

    def _watch_head(self, gcs: str) -> None:
        """A thread probing the head's GCS port every second: one silent for HEAD_LOST_S is a lost cluster."""
        self._gcs, stop = gcs, threading.Event()
        self._watchdog = stop

        def watch() -> None:
            answered = time.monotonic()
            while not stop.wait(1.0):
                if _answers(gcs):
                    answered = time.monotonic()
                elif time.monotonic() - answered >= HEAD_LOST_S:
                    self._lost()
                    return

        threading.Thread(target=watch, name="evomerge-head-watchdog", daemon=True).start()

    def _lost(self) -> None:
        if self.on_lost is not None:
            self.on_lost(self._gcs, self._address)

    def _check_fits(self, have: dict[str, float]) -> None:
        """All workers' reservations within this Ray's CPUs and GPUs: an actor that cannot be placed waits for
        ever, and the start waits for every actor."""
        for key, per, option in (("CPU", self._cpus, "cpus_per_worker"), ("GPU", self._gpus, "gpus_per_worker")):
            need, total = self.workers * per, have.get(key, 0.0)
            if need > total + 1e-9:
                self.shutdown()
                raise UserError(f"executor: workers {self.workers} x {option} {per:g} need {need:g} {key}s, but the local Ray "
                                f"has {total:g}: lower executor.workers or executor.{option}, or join a cluster (--address)")

    def _spawn(self, slot: int):
        actor = self._remote.options(num_cpus=self._cpus, num_gpus=self._gpus, max_restarts=0).remote(
            self._make_worker, f"ray-{slot}")
        # an actor runs its calls in order: `placed` answers once it has its node, `load` once its worker is built;
        # only the first is held to the grace period (loading a large model may take longer)
        self._placed[slot] = actor.placed.remote()
        self._loaded[slot] = actor.load.remote()
        self._placing[self._loaded[slot]] = (slot, time.monotonic(), False)
        return actor

    def _settle(self, until: float, starting: bool = False) -> None:
        """Waits until `until` for workers being placed: a loaded one joins the idle ones, one that died loading
        ends the start (or is retired later); one still unplaced after the grace period is said once, and stays
        pending so that it joins when capacity returns. No worker placed at all ends the run in one line."""
        import ray

        refs = list(self._placing)
        if refs:
            unplaced = [since for slot, since, said in self._placing.values() if not said and not self._has_node(slot)]
            next_due = min(unplaced) + self.grace if unplaced else until
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, min(until, next_due) - time.monotonic()),
                                fetch_local=False)
            for ref in ready:
                slot, _, said = self._placing.pop(ref)
                why = self._load_failure(slot)
                if why is not None:
                    if starting:
                        raise UserError(why)
                    self._load_failed(slot, why)
                    continue
                self._load_fails.pop(slot, None)
                self._idle.append(slot)
                self._nodes[slot] = ray.get(ref)["node"]
                if said or not starting:
                    log.warning("evomerge: worker ray-%d placed on node %s; %d worker%s working", slot,
                                self._nodes[slot][:8], self.alive(), "s" * (self.alive() > 1))
        now = time.monotonic()
        late = [(ref, slot) for ref, (slot, since, said) in self._placing.items()
                if not said and now - since >= self.grace and not self._has_node(slot)]
        if not late:
            return
        for ref, slot in late:
            self._placing[ref] = (slot, self._placing[ref][1], True)
        alive = self.alive()
        free = ray.available_resources()
        need = f"{self._cpus:g} CPU" + (f" + {self._gpus:g} GPU" if self._gpus else "")
        what = (f"{len(self._placing)} worker{'s' * (len(self._placing) > 1)} "
                f"({', '.join(f'ray-{s}' for s, *_ in self._placing.values())}) not placed after {self.grace:g} s: the "
                f"cluster has {free.get('CPU', 0):g} CPUs and {free.get('GPU', 0):g} GPUs free, each worker needs {need}"
                f"{_pending_nodes(ray.get_runtime_context().gcs_address)}")
        if not alive:
            raise UserError(f"{what}; no worker is placed: add nodes, or lower executor.workers or "
                            "executor.cpus_per_worker/gpus_per_worker")
        log.warning("evomerge: %s; going on with %d worker%s, the rest join when capacity returns", what, alive,
                    "s" * (alive > 1))

    def _has_node(self, slot: int) -> bool:
        import ray

        return bool(ray.wait([self._placed[slot]], timeout=0, fetch_local=False)[0])

    def alive(self) -> int:
        """Workers placed and loaded, ready or busy."""
        placing = {slot for slot, *_ in self._placing.values()}
        return sum(a is not None and i not in placing for i, a in enumerate(self._actors))

    def _load_failure(self, slot: int) -> str | None:
        """Why the worker in `slot` died before it finished loading; None once it has loaded (waits for that)."""
        import ray

        try:
            ray.get(self._loaded[slot])
        except ray.exceptions.RayActorError as e:
            return f"worker ray-{slot} died while loading: {_cause(e)}"
        except ray.exceptions.RayTaskError as e:  # its factory raised: the actor, of no use, is let go
            ray.kill(self._actors[slot])
            return f"worker ray-{slot} died while loading: {_raised(e)}"
        return None

    def _load_failed(self, slot: int, why: str) -> None:
        """A worker that could not load on its node (its sources, its memory) is placed again, maybe elsewhere, up
        to `load_tries` times in a row; then its slot is given up."""
        fails = self._load_fails[slot] = self._load_fails.get(slot, 0) + 1
        if fails >= self.load_tries:
            self._retire(slot, f"{why}; {fails} loads in a row failed, slot ray-{slot} given up")
            return
        self._actors[slot] = self._spawn(slot)
        log.warning("evomerge: %s; placing it again (try %d of %d)", why, fails + 1, self.load_tries)

    def _retire(self, slot: int, why: str) -> None:
        """A worker that cannot load would die again on every respawn: drop its slot and say so, once."""
        self._actors[slot] = None
        left = sum(a is not None for a in self._actors)
        if not left:
            raise UserError(f"{why}; no worker is left")
        log.warning("evomerge: %s; going on with %d worker%s", why, left, "s" * (left > 1))

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
        self._dispatch_retries()  # a retry and a free worker may meet with nothing else to wait for
        while not out and (self._running or (self._placing and (self._retry or not self._idle))):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._placing:  # poll the evaluations in turn with the workers being placed
                left = min(1.0, left) if left is not None else 1.0
            ready, _ = ray.wait(list(self._running), num_returns=1, timeout=left) if self._running else ([], [])
            if self._placing:  # with nothing running, the workers being placed are what is waited on
                self._settle(time.monotonic() + (0.0 if self._running else left))
            if not ready:
                self._dispatch_retries()
                if deadline is not None and time.monotonic() >= deadline:
                    break
                continue
            ready, _ = ray.wait(list(self._running), num_returns=len(self._running), timeout=0)
            for ref in ready:
                slot, cand, attempt = self._running.pop(ref)
                try:
                    out.append(Evaluation.from_dict(ray.get(ref)))
                    self._idle.append(slot)
                except ray.exceptions.RayActorError as e:
                    if self._watchdog is not None and not _answers(self._gcs):  # the head itself is gone
                        self._lost()
                        raise ClusterLost(self._gcs) from None
                    # the process died (OOM, kill, node lost) mid-evaluation: a new actor takes the slot once it is
                    # placed and loaded; the candidate is retried on the next free worker
                    cause = "its node was lost" if _node_gone(self._nodes.get(slot)) else _cause(e)
                    self._actors[slot] = self._spawn(slot)
                    self.replaced += 1
                    retry = attempt <= self.max_retries
                    log.warning("evomerge: worker ray-%d on node %s lost evaluating candidate %d (%s); a replacement is "
                                "being placed; candidate %d %s", slot, self._nodes.get(slot, "?")[:8], cand.id, cause, cand.id,
                                f"retried (attempt {attempt + 1})" if retry else "recorded as failed")
                    if retry:
                        self._retry.append((cand, attempt + 1))
                    else:
                        out.append(Evaluation.failure(
                            cand.id, f"worker died {attempt} times evaluating it: {cause}",
                            worker=f"ray-{slot}"))
                except ray.exceptions.RayError as e:  # the worker raised despite its contract: a failure
                    self._idle.append(slot)
                    out.append(Evaluation.failure(cand.id, _summary(e), worker=f"ray-{slot}"))
            self._dispatch_retries()
        return out

    def _dispatch_retries(self) -> None:
        while self._retry and self._idle:
            cand, attempt = self._retry.popleft()
            self._dispatch(cand, attempt)

    def shutdown(self) -> None:
        import ray

        if self._watchdog is not None:
            self._watchdog.set()
            self._watchdog = None
        for a in self._actors:
            try:
                if a is not None:
                    ray.kill(a)
            except Exception:  # already dead: nothing to release
                pass
        self._actors, self._running, self._placing = [], {}, {}
        self._idle.clear()
        self._retry.clear()
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


class ClusterLost(Exception):
    """The Ray head stopped answering: `on_lost` has been told."""


HEAD_LOST_S = 5.0  # a head silent this long is lost (Ray's driver would wait 60 s, then abort in C++)


def _pending_nodes(gcs: str) -> str:
    """What Ray's autoscaler says it is bringing (launches asked for, nodes starting, and what each waits for), as a
    clause of the shortfall line; "" on a cluster without an autoscaler, or when it brings nothing."""
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(gcs, timeout=5)
    except Exception:  # no autoscaler state to read (a cluster started by hand): the shortfall alone
        return ""
    parts = [f"{x.count} {x.ray_node_type_name} ({x.instance_type_name}) "
             + (f"launch failed: {x.details}" if x.state.name == "FAILED" else "being launched")
             for x in status.pending_launches]
    parts += [f"{n.ray_node_type_name} {n.ip_address or n.instance_id} {n.details or n.node_status or 'starting'}"
              for n in status.pending_nodes]
    return f"; the autoscaler has pending: {', '.join(parts)}" if parts else ""


def _node_gone(node_id: str | None) -> bool:
    """Whether a node is lost, by Ray's node table (which may say so seconds late) or its raylet's port not
    answering: an actor's error alone reads the same for a killed process and a node that went away."""
    import ray

    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
    if node is None:
        return False
    return not node["Alive"] or not _answers(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")


def _answers(hostport: str) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
        return True
    except OSError:
        return False


PROBE_S = 10.0  # ray.init retries an unreachable GCS for minutes with no bound a caller can set


def _probe(address: str | None) -> None:
    """A named cluster address must answer a TCP connect within PROBE_S, or the run is refused in one line.
    None (a Ray of its own) and "auto" (Ray finds its cluster, or says at once there is none) need no probe."""
    if address in (None, "auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address!r}: expected HOST:PORT of a Ray head (its GCS, 6379 by default) or 'auto'")
    deadline, why = time.monotonic() + PROBE_S, ""
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=max(0.1, deadline - time.monotonic())).close()
            return
        except OSError as e:  # refused answers at once: a head may be starting, so ask again until the deadline
            why = e.strerror or type(e).__name__
            time.sleep(0.5)
    raise UserError(f"cannot reach the Ray cluster at {address!r}: nothing answered on {host}:{port} within "
                    f"{PROBE_S:g} s ({why}); is `ray start --head` running there, and the port open?")


def _summary(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _raised(e: BaseException) -> str:
    """The exception a remote call raised, in one line: 'evomerge.records.UserError: x' -> 'UserError: x'."""
    return re.sub(r"^(\w+\.)+(?=\w+: )", "", _summary(e))


def _cause(e: BaseException) -> str:
    """Why an actor died, in one line, from Ray's error: the exception its constructor raised, its node lost, Ray's
    memory monitor, or its process ending (which the kernel's OOM killer may have done)."""
    if getattr(e, "actor_init_failed", False):
        return _raised(e)
    text = str(e)
    if re.search(r"node (it was running on )?(is|has) (dead|died)|node has died|node .*(was )?(removed|terminated)", text, re.I):
        return "its node was lost"
    dump = "(`evomerge run --dry-run CONFIG` shows the memory plan)"
    if re.search(r"out of memory|OUT_OF_MEMORY|memory monitor|low on memory", text, re.I):
        return f"Ray's memory monitor killed it: its node ran low on memory {dump}"
    pid = re.search(r"\bpid: (\d+)", text)
    return (f"its process{f' (pid {pid.group(1)})' if pid else ''} was killed or exited; on a node short of memory "
            f"the kernel's OOM killer does this {dump}")
