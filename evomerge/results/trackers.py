"""Experiment trackers (MLflow, Weights & Biases), off unless the config lists them: every evaluation (its
objectives, failure, timings, cost and a genome summary) and the held-out table, logged from the run's journal.

What is logged is decided by evaluation numbers: each tracker is asked the last evaluation it holds (MLflow: the
history of its `evaluation` metric, logged last in each evaluation's atomic batch; W&B: its server's summary, or
offline its run files) and gets the journal's evaluations after that one, so a resumed or
killed-and-resumed run appends and never duplicates. The trackers are fed by a process of their own (niced), a
thread per tracker reading the store through its own read-only connection: their imports, network and disk never
take the search's interpreter (a 100-evaluation search with MLflow and W&B: 5.9 s without trackers, 11 s with
them as threads of its process, 6.1 s with them in their own), and a slow tracker holds up no other; a tracker
that raises is reported once on stderr and dropped.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from evomerge.machine import write_whole
from evomerge.records import Evaluation, UserError

LOCK_FILE = "trackers.lock"
STATE_FILE = "trackers.json"  # each tracker's run id: a resumed evomerge run continues the same tracker run
POLL_S = 1.0  # how often the thread looks for new evaluations
BATCH = 500  # evaluations per call
_PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}


def _row(number: int, e: Evaluation, genome: dict[str, float]) -> dict[str, Any]:
    """One evaluation as a flat record: numbers a tracker plots, and the failure's message."""
    row: dict[str, Any] = {"candidate": e.candidate_id, "failed": int(not e.ok)}
    row.update({k: float(v) for k, v in e.objectives.items()})
    row.update({f"time/{k}": float(v) for k, v in e.timings.items()})
    row.update({f"cost/{k}": float(v) for k, v in e.cost.items()})
    row.update({f"x/{k}": v for k, v in genome.items()})
    if e.error:
        row["error"] = e.error
    row["evaluation"] = number  # last: MLflow's marker of a fully logged evaluation
    return row


def _table_values(result: dict[str, Any]) -> dict[str, float]:
    return {f"holdout/{r}/{c}": float(v) for r, cols in result.get("rows", {}).items() for c, v in cols.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _MLflow:
    batch = BATCH  # a resume asks MLflow what it holds: a batch cut by a kill is completed, not repeated

    def __init__(self, spec, run_dir: Path, state: dict[str, Any], config: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=spec.uri)
        self.run_id = state.get("run")
        if self.run_id is None:
            name = spec.experiment or "evomerge"
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=spec.name or run_dir.name,
                                                 tags={"evomerge.run_dir": str(run_dir.resolve())}).info.run_id
            self.client.log_dict(self.run_id, config, "config.json")
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self.state = {"run": self.run_id}

    def logged(self) -> int:
        return max((int(m.value) for m in self.client.get_metric_history(self.run_id, "evaluation")), default=0)

    def log(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for row in rows:  # a batch per evaluation: atomic in a database store, the `evaluation` marker included
            step = row["evaluation"]
            if "error" in row:
                self.client.log_text(self.run_id, row["error"], f"failures/evaluation_{step}.txt")
            self.client.log_batch(self.run_id, metrics=[Metric(_key(k), float(v), ts, step) for k, v in row.items()
                                                        if k != "error"])

    def table(self, result: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_dict(self.run_id, result, "holdout.json")
        self.client.log_batch(self.run_id, metrics=[Metric(_key(k), v, ts, 0) for k, v in _table_values(result).items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _key(name: str) -> str:
    """MLflow accepts letters, digits, _ - . space / and : in a metric name."""
    return re.sub(r"[^\w\-. /:]", "_", name)


class _Wandb:
    batch = BATCH

    def __init__(self, spec, run_dir: Path, state: dict[str, Any], config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        self.run_id = state.get("run") or uuid.uuid4().hex[:8]
        if spec.dir:
            Path(spec.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=spec.project or "evomerge", entity=spec.entity, mode=spec.mode, dir=spec.dir,
                              name=spec.name or run_dir.name, id=self.run_id, resume="allow", config=config,
                              reinit="create_new", settings=wandb.Settings(silent=True, console="off"))
        self.state = {"run": self.run_id}

    def logged(self) -> int:
        """The last evaluation W&B holds. Its process writes a run's file every 15 s, so what a killed run handed it
        last may be lost: online, the server's summary says what arrived; offline, the run's files on disk."""
        if not self.run.settings._offline:
            return int(self.run.summary.get("evaluation", 0))
        root = Path(self.run.dir).parent.parent  # .../wandb/offline-run-<time>-<id>/files
        return max((int(row["evaluation"]) for f in root.glob(f"offline-run-*-{self.run_id}/run-{self.run_id}.wandb")
                    for row in wandb_history(f) if "evaluation" in row), default=0)

    def log(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.run.log(row, step=row["evaluation"])

    def table(self, result: dict[str, Any]) -> None:
        from evomerge.results.figures import holdout_frame

        frame = holdout_frame(result).reset_index(names="model")
        self.run.log({"holdout": self.wandb.Table(dataframe=frame.astype({c: object for c in frame.columns}))})
        self.run.summary.update(_table_values(result))

    def close(self) -> None:
        self.run.finish()


def wandb_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(kind, message) of each complete record in a W&B run file: LevelDB's log format, 32 KiB blocks of chunks
    with 7-byte headers after the file's own 7-byte header; a chunk cut by a kill ends the scan."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):
            return
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record.WhichOneof("record_type"), record


def wandb_history(path: Path) -> Iterator[dict[str, Any]]:
    """The history rows of a W&B run file, as {key: value}."""
    for kind, r in wandb_records(path):
        if kind == "history":
            yield {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}


_KINDS = {"mlflow": _MLflow, "wandb": _Wandb}


class TrackerFeed:
    """A background thread per tracker feeding it the run's journal (a slow or failing one holds up no other).
    `close()` lets each log what is left and the held-out table given to `log_table`, then end its run."""

    def __init__(self, run_dir: str | Path, specs: list[Any]):
        self.run_dir = Path(run_dir)
        self.specs = list(specs)
        self._stop = threading.Event()
        self._state_lock = threading.Lock()
        self._table: dict[str, Any] | None = None
        self._threads = [threading.Thread(target=self._loop, args=(f"{i}:{spec.kind}", spec), daemon=True,
                                          name=f"evomerge-tracker-{spec.kind}") for i, spec in enumerate(self.specs)]

    def start(self) -> TrackerFeed:
        for t in self._threads:
            t.start()
        return self

    def log_table(self, result: dict[str, Any] | None) -> None:
        self._table = result

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    # ---- a tracker's thread ------------------------------------------------------------------------
    def _loop(self, key: str, spec) -> None:
        from evomerge.run.store import RunStore

        store = RunStore.open(self.run_dir, readonly=True)
        try:
            tracker = self._guard(key, lambda: _KINDS[spec.kind](spec, self.run_dir, self._read_state().get(key, {}),
                                                                  store.config))
            if tracker is None:
                return
            self._write_state(key, tracker.state)  # its run id at once: a kill before its first log resumes that run
            done = self._guard(key, tracker.logged)
            while done is not None:
                stopping = self._stop.wait(POLL_S)
                done = self._feed(store, key, tracker, done)
                if stopping:
                    break
            if done is not None and self._table is not None:
                done = self._guard(key, lambda: tracker.table(self._table))
            if done is not None:
                self._guard(key, tracker.close)
        finally:
            store.close()

    def _feed(self, store, key: str, tracker, done: int) -> int | None:
        """Log the evaluations after number `done`; returns the last one logged, None once the tracker failed."""
        from evomerge.results.figures import parallel_dims

        evals = store.evaluations(after=done, per_example=False)
        names = store.space_names
        dims = parallel_dims(names)  # the same evenly spaced dimensions the parallel-coordinates plot shows
        for b in range(0, len(evals), tracker.batch):
            part = evals[b:b + tracker.batch]
            genomes = store.genomes([e.candidate_id for e in part], dims)
            rows = [_row(done + k + 1, e, {names[d]: float(v) for d, v in zip(dims, x)})
                    for k, (e, x) in enumerate(zip(part, genomes))]
            if self._guard(key, lambda: tracker.log(rows)) is None:
                return None
            done += len(part)
            self._write_state(key, tracker.state)
        return done

    def _guard(self, key: str, fn):
        """`fn()`, or None after reporting its error (once: the tracker is dropped)."""
        try:
            out = fn()
            return True if out is None else out
        except Exception as e:  # any failure of a tracker: the run goes on without it
            print(f"evomerge: tracker {key.split(':')[1]} failed ({type(e).__name__}: {str(e)[:300]}); "
                  f"the run goes on without it", file=sys.stderr)
            return None

    def _read_state(self) -> dict[str, Any]:
        path = self.run_dir / STATE_FILE
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            return {}

    def _write_state(self, key: str, state: dict[str, Any]) -> None:
        with self._state_lock:
            path = self.run_dir / STATE_FILE
            data = {**self._read_state(), key: state}
            write_whole(path, json.dumps(data))


class Tracking:
    """The parent's side: the feeding process, told over its stdin to log the held-out table and to stop."""

    def __init__(self, run_dir: Path, specs: list[Any]):
        self.proc = None
        self.table = False
        if specs:
            import evomerge

            root = str(Path(evomerge.__file__).resolve().parent.parent)  # the evomerge this process runs
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            self.proc = subprocess.Popen([sys.executable, "-m", "evomerge.results.trackers", str(run_dir)], env=env,
                                         stdin=subprocess.PIPE, text=True)

    def log_table(self, result: dict[str, Any] | None) -> None:
        """The held-out table (written to RUN_DIR/holdout.json) is logged before the trackers' runs end."""
        self.table = result is not None

    def close(self, timeout: float = 300.0) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.write("table\n" if self.table else "stop\n")
            self.proc.stdin.close()
        except BrokenPipeError:  # it ended already
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:  # a tracker still uploading: it goes on without holding the command
            print(f"evomerge: trackers still busy after {timeout:.0f} s; they finish in the background "
                  f"(process {self.proc.pid})", file=sys.stderr)


@contextmanager
def tracking(run_dir: str | Path) -> Iterator[Tracking]:
    """The trackers the run's stored config lists, fed while the block runs and closed after it, from a process
    of their own (niced): their imports, network and disk never take the search's interpreter or cores."""
    from evomerge.config import parse_config
    from evomerge.run.store import RunStore

    with RunStore.open(run_dir, readonly=True) as store:
        specs = parse_config(store.config).trackers
    for spec in specs:
        if importlib.util.find_spec(_PACKAGES[spec.kind]) is None:
            raise UserError(f"trackers: {spec.kind} is not installed; pip install 'evomerge[{spec.kind}]'")
    feed = Tracking(Path(run_dir), specs)
    try:
        yield feed
    finally:
        feed.close()


def main() -> None:
    """The feeding process: `python -m evomerge.results.trackers RUN_DIR`; a line `table` or `stop` (or the end of its
    stdin) on its stdin ends it after a last feed."""
    from evomerge.config import parse_config
    from evomerge.results.holdout import read_table
    from evomerge.run.store import RunStore

    import fcntl

    os.nice(10)  # the search first
    run_dir = Path(sys.argv[1])
    with open(run_dir / LOCK_FILE, "w") as lock:
        # one feeding process per run: a killed run's (it still logs what was committed) ends before the
        # resumed run's asks its trackers what they hold
        fcntl.flock(lock, fcntl.LOCK_EX)
        with RunStore.open(run_dir, readonly=True) as store:
            specs = parse_config(store.config).trackers
        feed = TrackerFeed(run_dir, specs).start()
        command = sys.stdin.readline().strip()  # "" when the search's process is gone
        if command == "table":
            feed.log_table(read_table(run_dir))
        feed.close()


if __name__ == "__main__":
    main()
