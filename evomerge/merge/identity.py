"""What a source checkpoint is, by content: the sha256 of each file a merge reads from it.

A run records its sources' identity when it starts; every worker checks its own copy before its first evaluation
(a node of a cluster may hold another checkpoint at the same path) and a resume checks again, so a score never
comes from weights other than the ones recorded. Digests are cached by (real path, size, mtime) under
EVOMERGE_CACHE (default ~/.cache/evomerge): a file is hashed once per machine. Cost: one read of every source
file at sha256's speed (1.27 GB/s a core measured on this 2-core box; files hashed in parallel), the first time
only: a 7B bf16 base and two experts (42 GB) about 17 s on two cores, 70B (420 GB) about 5.5 core-minutes or the
disk's read time, then nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

from evomerge.machine import cache_dir, write_whole
from evomerge.records import UserError

# the files whose bytes make the merged weights: tensors, and the config that says how they are laid out
_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "config.json", "adapter_config.json")
_CHUNK = 16 << 20


def _cache_file() -> Path:
    return cache_dir("sha256.json")


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted({p for pat in _PATTERNS for p in root.glob(pat) if p.is_file()})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)  # hashlib releases the GIL on large updates: files hash in parallel threads
    return h.hexdigest()


def fingerprint(path: str | Path) -> dict[str, str]:
    """{file name: sha256} of the files a merge reads from the checkpoint at `path` (a directory or one file)."""
    root = Path(path)
    files = _files(root)
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    keys = {}
    for p in files:
        st = p.stat()
        keys[p] = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    todo = [p for p in files if keys[p] not in cache]
    if todo:
        with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1)) as pool:
            for p, digest in zip(todo, pool.map(_sha256, todo)):
                cache[keys[p]] = digest
        try:  # best effort: a cache that cannot be written costs a re-hash next time, nothing else
            write_whole(cache_path, json.dumps(cache))
        except OSError:
            pass
    return {p.name if root.is_file() else str(p.relative_to(root)): cache[keys[p]] for p in files}


def fingerprints(sources: Mapping[str, str | Path]) -> dict[str, dict[str, str]]:
    return {name: fingerprint(path) for name, path in sources.items()}


def _here() -> str:
    """This process's machine, and its Ray node when it is a Ray worker."""
    import socket

    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            return f"node {socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:8]}"
    except ImportError:
        pass
    return f"this machine ({socket.gethostname()})"


def check(recorded: Mapping[str, Mapping[str, str]], sources: Mapping[str, str | Path]) -> None:
    """The sources here are the recorded ones, file by file, or one line naming source, place and file."""
    for name, want in recorded.items():
        if name not in sources:
            continue
        got = fingerprint(sources[name])
        for file in sorted(set(want) | set(got)):
            if want.get(file) == got.get(file):
                continue
            path = Path(sources[name]) / file if Path(sources[name]).is_dir() else Path(sources[name])
            if file not in got:
                what = "is missing"
            elif file not in want:
                what = "was not there when the run started"
            else:
                what = f"differs from the run's (sha256 {got[file][:12]} here, {want[file][:12]} recorded)"
            raise UserError(f"source {name!r} on {_here()}: {path} {what}; every worker must read the checkpoint the "
                            "run started with")
