"""Where a worker's scoring model lives and in what dtype: `fitness.handle: {device: auto|cpu|cuda|cuda:N,
dtype: auto|float32|bfloat16|float16}`.

`auto` device: the worker's GPU when it has one (a Ray actor sees only the GPUs it reserved:
`executor.gpus_per_worker`), else the CPU. `auto` dtype: bfloat16 on a GPU (float16 where the GPU has
no bfloat16), float32 on the CPU. The materializer merges on the same device.
"""
from __future__ import annotations

import re
from typing import Any

from evomerge.records import UserError

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
