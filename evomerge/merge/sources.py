"""Model sources: Hugging Face checkpoint directories read lazily, or in-memory state dicts.

Safetensors files are memory-mapped and parsed here (header + `torch.frombuffer`), so opening a
checkpoint reads only its headers and a tensor costs nothing until its bytes are touched. Pickle
checkpoints (`.bin`, `.pt`) execute code when unpickled: they are refused unless the caller opts in,
and even then loaded with `weights_only=True`.
"""
from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from evomerge.records import UserError

# safetensors dtype codes -> torch dtypes (those torch can view from a buffer)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class _SafetensorsFile:
    """One memory-mapped safetensors file: tensor names, shapes and dtypes from its header."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path}: not a valid safetensors file ({e.__class__.__name__})") from e
            # copy-on-write map: writable views for torch without touching the file
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if path.stat().st_size > 8 + n else None
        self._start = 8 + n
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._start + end > path.stat().st_size:
            raise UserError(f"{path}: truncated (its header promises {self._start + end} bytes, the file has {path.stat().st_size})")

    def dtype_name(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        dtype = _ST_DTYPES.get(e["dtype"])
        if dtype is None:
            raise UserError(f"{self.path}: tensor {name} has dtype {e['dtype']}, which evomerge does not support")
        begin, end = e["data_offsets"]
        shape = tuple(e["shape"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self._start + begin)
        return t.view(shape)


class Source:
    """A model's tensors by name, loaded on demand, plus its config and tokenizer facts."""

    def __init__(self, name: str, path: Path | None, config: dict[str, Any], tensors: Mapping[str, Any]):
        self.name = name
        self.path = path
        self.config = config
        self._tensors = tensors  # name -> _SafetensorsFile | torch.Tensor

    @classmethod
    def open(cls, name: str, path: str | Path, *, allow_pickle: bool = False) -> Source:
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"model {name!r}: {p} is not a checkpoint directory")
        cfg_path = p / "config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        tensors: dict[str, Any] = {}
        files = _weight_files(name, p)
        if files and files[0].suffix == ".safetensors":
            for f in files:
                st = _SafetensorsFile(f)
                tensors.update(dict.fromkeys(st.entries, st))
        elif files:
            if not allow_pickle:
                raise UserError(
                    f"model {name!r}: {files[0].name} is a pickle checkpoint, which can run code when loaded; "
                    "convert it to safetensors or pass --allow-pickle"
                )
            for f in files:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # weights_only refuses anything but tensors and plain containers
                    raise UserError(f"model {name!r}: {f.name} was refused by weights-only loading: {str(e).splitlines()[0]}") from e
                tensors.update(sd)
        else:
            raise UserError(f"model {name!r}: no .safetensors (or pickle) weights in {p}")
        return cls(name, p, config, tensors)

    @classmethod
    def from_state_dict(cls, name: str, state_dict: Mapping[str, torch.Tensor], config: dict[str, Any] | None = None) -> Source:
        return cls(name, None, dict(config or {}), {k: v.detach() for k, v in state_dict.items()})

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._tensors[name]
        return t.shape(name) if isinstance(t, _SafetensorsFile) else tuple(t.shape)

    def dtype_name(self, name: str) -> str:
        """The stored dtype as a short name ('float32', 'F8_E4M3', ...), without reading the tensor."""
        t = self._tensors[name]
        if isinstance(t, _SafetensorsFile):
            code = t.dtype_name(name)
            return str(_ST_DTYPES[code]).removeprefix("torch.") if code in _ST_DTYPES else code
        return str(t.dtype).removeprefix("torch.")

    def get(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        return t.get(name) if isinstance(t, _SafetensorsFile) else t

    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    def vocabulary(self) -> dict[str, int] | None:
        """The tokenizer's token -> id map (tokenizer.json, with added tokens), or None if there is none."""
        if self.path is None or not (self.path / "tokenizer.json").is_file():
            return None
        data = json.loads((self.path / "tokenizer.json").read_text())
        vocab = dict((data.get("model") or {}).get("vocab") or {})
        if isinstance(vocab, list):  # unigram models list [token, score] pairs
            vocab = {tok: i for i, (tok, _) in enumerate(vocab)}
        for added in data.get("added_tokens") or []:
            vocab[added["content"]] = added["id"]
        return vocab


def _weight_files(name: str, p: Path) -> list[Path]:
    """The checkpoint's weight files: from the shard index when there is one."""
    for index_name, suffix in (("model.safetensors.index.json", ".safetensors"), ("pytorch_model.bin.index.json", ".bin")):
        index = p / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise UserError(f"model {name!r}: shard {missing[0]} listed in {index_name} is missing")
            return [p / s for s in shards]
    st = sorted(p.glob("*.safetensors"))
    if st:
        return st
    return sorted(f for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES and f.is_file())


def open_sources(
    sources: Mapping[str, str | Path | Mapping[str, torch.Tensor] | Source], *, allow_pickle: bool = False
) -> dict[str, Source]:
    """Open every source by name: checkpoint paths lazily, state dicts as they are."""
    out: dict[str, Source] = {}
    for name, s in sources.items():
        if isinstance(s, Source):
            out[name] = s
        elif isinstance(s, (str, Path)):
            out[name] = Source.open(name, s, allow_pickle=allow_pickle)
        elif isinstance(s, Mapping):
            out[name] = Source.from_state_dict(name, s)
        else:
            raise UserError(f"model {name!r}: expected a checkpoint path or a state dict, got {type(s).__name__}")
    return out
