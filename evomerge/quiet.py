"""The main job's console is evomerge's own: while a run command works, other libraries' progress bars
(transformers' "Loading weights"), Python warnings and log lines below ERROR are off, unless --verbose.

A context manager, so an in-process caller (a notebook, the tests) gets its settings back afterwards.
evomerge's own warnings (its loggers, and any Python warning raised from its modules) still show."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

OWN = ("evomerge", "fitness", "search_spaces")  # the project's top-level packages (and loggers)


@contextmanager
def own_output(verbose: bool = False) -> Iterator[None]:
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    root, own = logging.getLogger(), [logging.getLogger(n) for n in OWN]
    levels = (root.level, [lg.level for lg in own], hf_logging.get_verbosity())
    bars = hf_logging.is_progress_bar_enabled()
    root.setLevel(logging.ERROR)
    for lg in own:
        lg.setLevel(logging.WARNING)  # still reaches the console through Python's last-resort handler
    hf_logging.set_verbosity_error()  # transformers logs through its own handler, not the root's
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            warnings.filterwarnings("default", module=rf"({'|'.join(OWN)})(\.|$)")
            yield
    finally:
        root.setLevel(levels[0])
        for lg, level in zip(own, levels[1]):
            lg.setLevel(level)
        hf_logging.set_verbosity(levels[2])
        if bars:
            hf_logging.enable_progress_bar()


RAY_LOG = "ray.log"  # in the run directory: Ray's own output while the run worked
_capturing: list[bool] = []  # non-empty while `ray_output` captures


@contextmanager
def ray_output(capture: bool = True) -> Iterator[Callable[[Path], None]]:
    """Ray's own output off the terminal: its C++ core writes to file descriptor 2, which goes to a file (a
    temporary one until the run directory exists, then RUN_DIR/ray.log: call the yielded function with it),
    while sys.stderr keeps the terminal for evomerge's lines and bars; `route_ray_loggers` sends Ray's Python
    loggers after fd 2. Not capturing (--verbose, a run without Ray): everything on the terminal."""
    if not capture:
        yield lambda run_dir: None
        return
    sys.stderr.flush()
    terminal, held = os.dup(2), tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    saved = sys.stderr
    sys.stderr = open(terminal, "w", buffering=1, encoding=saved.encoding, errors="backslashreplace", closefd=False)
    _capturing.append(True)

    def settle(run_dir: Path) -> None:
        with open(Path(run_dir) / RAY_LOG, "ab") as log:
            held.seek(0)
            shutil.copyfileobj(held, log)
            log.flush()
            os.dup2(log.fileno(), 2)  # fd 2 keeps the file open once `log` is closed

    try:
        yield settle
    finally:
        _capturing.pop()
        sys.stderr.flush()
        os.dup2(terminal, 2)
        sys.stderr = saved
        os.close(terminal)
        held.close()


def route_ray_loggers() -> None:
    """Ray's Python loggers, and the cluster's messages its driver prints ("(raylet) Raylet is terminated ..." and
    the like, on sys.stdout when they come), write to Python's streams: while `ray_output` captures, to fd 2."""
    if not _capturing:
        return
    import ray._private.worker as ray_worker

    native = open(2, "w", buffering=1, closefd=False)
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers = [logging.StreamHandler(native)]
    ray_logger.propagate = False
    # Ray 2.60's error listener calls this module global for every message it prints
    ray_worker.print_to_stdstream = lambda data, ignore_prefix: ray_worker.print_worker_logs(data, native, ignore_prefix)
