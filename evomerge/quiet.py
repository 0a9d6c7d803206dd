"""The main job's console is evomerge's own: while a run command works, other libraries' progress bars
(transformers' "Loading weights"), Python warnings and log lines below ERROR are off, unless --verbose.

A context manager, so an in-process caller (a notebook, the tests) gets its settings back afterwards.
evomerge's own warnings (its loggers, and any Python warning raised from its modules) still show."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

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
