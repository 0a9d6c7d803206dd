"""What this machine has, as the dry-run plan and the materializer read it: host memory available; and where
evomerge keeps what it computes once per machine (its cache directory)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from evomerge.records import UserError

LIMIT_ENV = "EVOMERGE_MEMORY_LIMIT"  # host bytes to assume available, instead of MemAvailable
CACHE_ENV = "EVOMERGE_CACHE"  # evomerge's cache directory, instead of ~/.cache/evomerge


def cache_dir(*parts: str) -> Path:
    """A folder of evomerge's per-machine cache (EVOMERGE_CACHE, default ~/.cache/evomerge), not created here."""
    root = os.environ.get(CACHE_ENV)
    return Path(root or Path.home() / ".cache" / "evomerge").joinpath(*parts)


def host_available() -> int | None:
    """Host memory available: EVOMERGE_MEMORY_LIMIT when set, else MemAvailable (None where unknown)."""
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        return parse_bytes(limit, LIMIT_ENV)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str, what: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"{what}={text!r} is not a size like 8GiB, 500MB or 1000000 (bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
