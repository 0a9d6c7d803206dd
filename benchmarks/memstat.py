"""Resident memory of this process (private = anonymous, shared = file-backed pages such as memory-mapped
checkpoints), its peaks, and the facts of the machine a benchmark ran on. Linux /proc only."""
from __future__ import annotations

import os
import platform
import subprocess
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def status() -> dict[str, int]:
    """RssAnon, RssFile, RssShmem, VmRSS, VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


def reset_peak() -> None:
    """Restart VmHWM (the peak resident set) from the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Sampler:
    """Calls `sample()` on a thread every `interval` seconds while in its `with` block, and once more at its end
    (a phase shorter than the interval still counts its end state); `peak` holds each field's largest value."""

    def __init__(self, fields, interval_s: float):
        self.interval = interval_s
        self.peak = dict.fromkeys(fields, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        raise NotImplementedError

    def _record(self) -> None:
        for k, v in self.sample().items():
            self.peak[k] = max(self.peak[k], v)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._record()


class PeakSampler(_Sampler):
    """Samples RssAnon and RssFile (the kernel keeps a peak only of their sum, VmHWM): the private peak of a phase
    is the largest sample. Merge kernels release the GIL, so sampling keeps up."""

    def __init__(self, interval_s: float = 0.005):
        super().__init__(("RssAnon", "RssFile"), interval_s)

    def sample(self) -> dict[str, int]:
        s = status()
        return {k: s[k] for k in self.peak}


def machine() -> dict:
    from evomerge.machine import cpu_model

    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "memory_bytes": mem, "kernel": platform.release()}


def versions(root: Path) -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "mergekit", "evomerge"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        out["evomerge_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["evomerge_commit"] = None
    return out


def tree(root: int) -> list[int]:
    """`root` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def rollup(pid: int) -> dict[str, int]:
    """Rss, Pss, Pss_Anon, Pss_File, Anonymous of one process, in bytes (empty when it is gone). Pss splits each
    shared page among the processes mapping it, so Pss summed over processes counts every page once."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


class TreePeak(_Sampler):
    """Samples a process tree's summed rollup (see `rollup`); `peak` holds each field's largest sum, `processes`
    the most processes seen at once."""

    FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous")

    def __init__(self, root: int, interval_s: float = 0.25):
        super().__init__(self.FIELDS, interval_s)
        self.root, self.processes = root, 0

    def sample(self) -> dict[str, int]:
        pids = tree(self.root)
        self.processes = max(self.processes, len(pids))
        total = dict.fromkeys(self.FIELDS, 0)
        for pid in pids:
            for k, v in rollup(pid).items():
                total[k] += v
        return total


def emit(report: dict, out: str | None) -> None:
    """Print a benchmark's JSON report, and write it to `out` (the committed artifact) when given."""
    import json

    text = json.dumps(report, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)
