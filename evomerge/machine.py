"""What this machine has, as the dry-run plan and the materializer read it: host memory available; where
evomerge keeps what it computes once per machine (its cache directory); how a file is written on its disk (whole
or not at all); and where a worker's scoring model lives and in what dtype: `fitness.handle: {device:
auto|cpu|cuda|cuda:N, dtype: auto|float32|bfloat16|float16}`.

`auto` device: the worker's GPU when it has one (a Ray actor sees only the GPUs it reserved:
`executor.gpus_per_worker`), else the CPU. `auto` dtype: bfloat16 on a GPU (float16 where the GPU has
no bfloat16), float32 on the CPU. The materializer merges on the same device.
"""
from __future__ import annotations

import os
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evomerge.records import UserError

LIMIT_ENV = "EVOMERGE_MEMORY_LIMIT"  # host bytes to assume available, instead of MemAvailable
CACHE_ENV = "EVOMERGE_CACHE"  # evomerge's cache directory, instead of ~/.cache/evomerge


def cache_dir(*parts: str) -> Path:
    """A folder of evomerge's per-machine cache (EVOMERGE_CACHE, default ~/.cache/evomerge), not created here."""
    root = os.environ.get(CACHE_ENV)
    return Path(root or Path.home() / ".cache" / "evomerge").joinpath(*parts)


def write_whole(path: Path, data: str | bytes | Callable[[Path], None]) -> None:
    """Write `path` whole or not at all, its folder made: the data (or `data(scratch)`, a writer of its own) goes to
    a scratch file beside it, named per process so concurrent writers never share one, then is renamed over it. A
    reader (another worker, a crash's resume) sees the old file or the new one, never half of one; a full disk
    leaves the old file and the error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        if callable(data):
            data(scratch)
        elif isinstance(data, bytes):
            scratch.write_bytes(data)
        else:
            scratch.write_text(data)
        scratch.replace(path)
    finally:
        scratch.unlink(missing_ok=True)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else the platform's word): a float kernel's sums, and so a training
    run's weights, may differ between CPU models."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())


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


DEVICES = "auto, cpu, cuda, cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_options(handle: dict[str, Any]) -> None:
    """The spelling of `fitness.handle.device` and `.dtype` (ValueError naming the key and what is valid)."""
    device, dtype = handle.get("device", "auto"), handle.get("dtype", "auto")
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(f"device {device!r} is not one of {DEVICES}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")


def gpu_index(device: str) -> int | None:
    """The GPU a device string names (cuda -> 0), None for the CPU and for auto."""
    if not device.startswith("cuda"):
        return None
    return int(device.partition(":")[2] or 0)


def resolve_device(spec: str | None = "auto"):
    """`auto|cpu|cuda|cuda:N` -> the torch.device this process scores on; a GPU asked for where torch sees
    none (or too few) is a UserError naming the key."""
    import torch

    spec = spec or "auto"
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        return torch.device("cuda", 0) if seen else torch.device("cpu")
    index = gpu_index(spec)
    if index is not None and index >= seen:
        where = "no GPU" if not seen else f"{seen} GPU(s): cuda:0..cuda:{seen - 1}"
        raise UserError(f"fitness.handle.device: {spec} asks for a GPU but this process sees {where}; "
                        "use device: auto or cpu")
    return torch.device("cuda", index) if index is not None else torch.device(spec)


def dtype_name(spec: str | None, on_gpu: bool) -> str:
    """`auto|float32|bfloat16|float16` for a model on a GPU (or not) -> the dtype's name."""
    if spec not in (None, "auto"):
        return spec
    if not on_gpu:
        return "float32"
    import torch

    return "bfloat16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "float16"


def resolve_dtype(spec: str | None, device) -> Any:
    """`auto|float32|bfloat16|float16` on `device` -> the scoring model's torch dtype."""
    import torch

    return getattr(torch, dtype_name(spec, device.type == "cuda"))
