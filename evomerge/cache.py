"""Where evomerge keeps what it can recompute (source hashes, compiled kernels): $EVOMERGE_CACHE, by default
~/.cache/evomerge; never inside the installed package, which may be read-only or shared by several users."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge")
