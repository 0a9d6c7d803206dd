"""Model sources: Hugging Face checkpoint directories read lazily, LoRA adapters, or in-memory state dicts.

Safetensors files are memory-mapped and parsed here (header + `torch.frombuffer`), so opening a
checkpoint reads only its headers and a tensor costs nothing until its bytes are touched. Pickle
checkpoints (`.bin`, `.pt`) execute code when unpickled: they are refused unless the caller opts in,
and even then loaded with `weights_only=True`.

A LoRA adapter directory (PEFT format: adapter_config.json + adapter_model.safetensors) is an expert too:
it reads as the full model it makes of the base, each targeted weight plus (alpha/r) * B @ A, so every
merge method sees it as it sees a full fine-tune. The factors are small; the sum is formed per tensor
when asked.

The maps' pages are mapped into the process by a background thread as soon as the sources are opened
for merging (`map_pages`): otherwise the first candidate takes one page fault per 64 KB of every source.
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import re
import struct
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.machine import host_available
from evomerge.records import UserError

# safetensors dtype codes -> torch dtypes (those torch can view from a buffer)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
ADAPTER_CONFIG = "adapter_config.json"


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """A safetensors file's header (8-byte length, then JSON): each tensor's dtype, shape and data offsets, and
    where the data starts; one line naming the file when it is not one or is cut short."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > path.stat().st_size - 8:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:  # JSON and Unicode errors are ValueErrors
        raise UserError(f"{path}: not a valid safetensors file ({e.__class__.__name__})") from None
    header.pop("__metadata__", None)
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if 8 + n + end > path.stat().st_size:
        raise UserError(f"{path}: truncated (its header promises {8 + n + end} bytes, the file has {path.stat().st_size})")
    return header, 8 + n


class _SafetensorsFile:
    """One memory-mapped safetensors file: tensor names, shapes and dtypes from its header."""

    def __init__(self, path: Path):
        self.path = path
        self.entries, self._start = read_header(path)
        with open(path, "rb") as f:
            # a read-only shared map: its pages are the page cache's, shared with every process of the node,
            # and it commits no memory (a private writable map of a 140 GB checkpoint is refused where the
            # machine has less). Tensors viewing it must never be written (the merge methods never do).
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size > self._start else None

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
        with warnings.catch_warnings():  # torch warns that the buffer is read-only: intended, see __init__
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self._start + begin)
        return t.view(shape)


def _dtype_name(code: str) -> str:
    """A safetensors dtype code as torch names it ('F32' -> 'float32'); unknown codes as they are."""
    return str(_ST_DTYPES[code]).removeprefix("torch.") if code in _ST_DTYPES else code


class _LoraTensors:
    """A LoRA adapter over a base source: a targeted tensor is its weight (the adapter's own copy where it
    saved one, else the base's) plus the delta, in float32 at least so a small delta survives a
    low-precision base; the others are the base's."""

    def __init__(self, base: Source, full: Mapping[str, str], deltas: Mapping[str, Any], stored: _SafetensorsFile):
        self.base, self.full, self.deltas, self.stored = base, full, deltas, stored

    def dtype_name(self, name: str) -> str:
        stored = _dtype_name(self.stored.dtype_name(self.full[name])) if name in self.full else self.base.dtype_name(name)
        return stored if name not in self.deltas or stored == "float64" else "float32"

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def get(self, name: str) -> torch.Tensor:
        t = self.stored.get(self.full[name]) if name in self.full else self.base.get(name)
        if name not in self.deltas:
            return t
        dtype = torch.promote_types(t.dtype, torch.float32)
        return t.to(dtype) + self.deltas[name]().to(dtype)


MADV_POPULATE_READ = 22  # Linux >= 5.14: map a range's pages (reading them into the page cache), no fault per page


def map_pages(sources: Mapping[str, Source]) -> threading.Thread | None:
    """Map every page of the sources' safetensors files into this process, in a background thread, when they
    all fit in the memory available: the first candidate's merge would otherwise take a page fault per
    64 KB of each source (0.05 s per GB here, about a quarter of its extra time at 1B), while this runs as
    the scoring model loads. Nothing where they would not stay in the page cache (it would read them from
    disk only to evict them), or where the call is unsupported (other systems, Linux < 5.14)."""
    maps = list({id(m): m for s in sources.values() for m in s.maps()}.values())
    total, available = sum(len(m) for m in maps), host_available()
    if not maps or available is None or total > available // 2:
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise  # ctypes releases the GIL around the call
    except (OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int

    def populate() -> None:
        for m in maps:
            try:
                address = np.frombuffer(m, np.uint8).ctypes.data  # a read-only map has no writable buffer for ctypes
            except ValueError:  # closed meanwhile
                continue
            if madvise(address, len(m), MADV_POPULATE_READ) != 0:
                return  # unsupported here: the merge faults the pages in as it reads them

    thread = threading.Thread(target=populate, name="evomerge-map-pages", daemon=True)
    thread.start()
    return thread


class Source:
    """A model's tensors by name, loaded on demand, plus its config and tokenizer facts."""

    def __init__(self, name: str, path: Path | None, config: dict[str, Any], tensors: Mapping[str, Any]):
        self.name = name
        self.path = path
        self.config = config
        self._tensors = tensors  # name -> _SafetensorsFile | torch.Tensor
        self._aliases: dict[str, str] = {}  # a name read from another tensor (a tied head: the input embedding)
        self._rows: dict[str, Any] = {}  # a vocabulary-indexed tensor read in another vocabulary (vocab.Rows)

    @classmethod
    def open(cls, name: str, path: str | Path, *, allow_pickle: bool = False) -> Source:
        p = Path(path)
        if not p.is_dir():
            raise UserError(f"model {name!r}: {p} is not a checkpoint directory")
        config = read_model_config(name, p)
        tensors: dict[str, Any] = {}
        files = weight_files(name, p)
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
        return [*self._tensors, *self._aliases]

    def maps(self) -> list[mmap.mmap]:
        """The memory maps of its safetensors files."""
        files = {id(t): t for t in self._tensors.values() if isinstance(t, _SafetensorsFile) and t._map is not None}
        return [f._map for f in files.values()]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors or name in self._aliases

    def alias(self, name: str, stored: str) -> None:
        self._aliases[name] = stored

    def realign(self, name: str, rows: Any) -> None:
        """Read tensor `name` through `rows` (evomerge.merge.vocab.Rows): its rows in the merge's vocabulary."""
        self._rows[name] = rows

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._rows:
            return (len(self._rows[name].index), *self._stored_shape(name)[1:])
        return self._stored_shape(name)

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        name = self._aliases.get(name, name)
        t = self._tensors[name]
        return tuple(t.shape) if isinstance(t, torch.Tensor) else t.shape(name)

    def dtype_name(self, name: str) -> str:
        """The stored dtype as a short name ('float32', 'F8_E4M3', ...), without reading the tensor."""
        if name in self._rows:
            return str(self._rows[name].dtype).removeprefix("torch.")
        name = self._aliases.get(name, name)
        t = self._tensors[name]
        if isinstance(t, _SafetensorsFile):
            return _dtype_name(t.dtype_name(name))
        if isinstance(t, _LoraTensors):
            return t.dtype_name(name)
        return str(t.dtype).removeprefix("torch.")

    def get(self, name: str) -> torch.Tensor:
        rows = self._rows.get(name)
        return self.stored(name) if rows is None else rows.apply(self.stored(name))

    def stored(self, name: str) -> torch.Tensor:
        """The tensor as stored (in its own vocabulary where `get` realigns it)."""
        name = self._aliases.get(name, name)
        t = self._tensors[name]
        return t if isinstance(t, torch.Tensor) else t.get(name)

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


def read_model_config(name: str, p: Path) -> dict[str, Any]:
    """A checkpoint's config.json: it names the architecture, which every check and the writer need."""
    f = p / "config.json"
    if not f.is_file():
        raise UserError(f"model {name!r}: no config.json in {p} (a checkpoint directory holds its config beside the weights)")
    try:
        config = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"model {name!r}: {f} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"model {name!r}: {f} holds a {type(config).__name__}, not a config mapping")
    return config


def open_lora(name: str, path: str | Path, base: Source) -> Source:
    """A PEFT LoRA adapter directory as the full model it makes of `base`: each targeted weight W gets
    scale * B @ A (transposed for embeddings and fan-in-fan-out layers), scale = alpha / r, or
    alpha / sqrt(r) with rsLoRA; r is each module's actual rank, alpha per module from `alpha_pattern`.
    Full tensors the adapter saved (`modules_to_save`, an embedding's base layer) replace the base's."""
    p = Path(path)
    cfg = json.loads((p / ADAPTER_CONFIG).read_text())
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise UserError(f"model {name!r}: {p} is a {kind} adapter; only LoRA adapters are supported")
    if cfg.get("use_dora"):
        raise UserError(f"model {name!r}: DoRA adapters are not supported (their update is not a task vector B @ A)")
    weights = p / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"model {name!r}: no adapter_model.safetensors in {p} (convert a .bin adapter to safetensors)")
    st = _SafetensorsFile(weights)
    factors: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    for key in st.entries:
        short = key.removeprefix("base_model.model.")
        m = re.fullmatch(r"(.+)\.lora_(A|B|embedding_A|embedding_B)(?:\.weight)?", short)
        if m is not None:
            factors.setdefault(m.group(1), {})[m.group(2).removeprefix("embedding_")] = key
            continue
        target = short.replace(".base_layer.", ".")
        if target not in base or base.shape(target) != st.shape(key):
            raise UserError(f"model {name!r}: adapter tensor {key} is neither a LoRA factor nor a tensor of base {base.name!r}")
        full[target] = key
    alpha = float(cfg.get("lora_alpha", 8))
    deltas: dict[str, Any] = {}
    for module, keys in factors.items():
        if set(keys) != {"A", "B"}:
            raise UserError(f"model {name!r}: adapter module {module} has only one of its two LoRA factors")
        a_key, b_key = keys["A"], keys["B"]
        target = f"{module}.weight"
        if target not in base:
            raise UserError(f"model {name!r}: adapter targets {target}, which base {base.name!r} does not have")
        r = st.shape(a_key)[0]
        a = _pattern_value(cfg.get("alpha_pattern") or {}, module, alpha)
        scale = a / math.sqrt(r) if cfg.get("use_rslora") else a / r
        transpose = "lora_embedding_A" in a_key or bool(cfg.get("fan_in_fan_out"))
        shape = (st.shape(a_key)[1], st.shape(b_key)[0]) if transpose else (st.shape(b_key)[0], st.shape(a_key)[1])
        if shape != base.shape(target):
            raise UserError(f"model {name!r}: the adapter's B @ A for {target} is {list(shape)}, base {base.name!r} has {list(base.shape(target))}")
        deltas[target] = lambda a_key=a_key, b_key=b_key, scale=scale, transpose=transpose: lora_delta(
            st.get(a_key), st.get(b_key), scale, transpose=transpose)
    tensors = dict.fromkeys(base.names(), _LoraTensors(base, full, deltas, st))
    return Source(name, p, base.config, tensors)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, *, transpose: bool = False) -> torch.Tensor:
    """scale * B @ A in float32 (A: r x in, B: out x r), transposed where the layer stores W as in x out."""
    d = (b.float() @ a.float()).mul_(scale)
    return d.T if transpose else d


def _pattern_value(patterns: Mapping[str, Any], module: str, default: float) -> float:
    """PEFT's per-module override: the first pattern matching the module name's tail."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    return default


def weight_files(name: str, p: Path) -> list[Path]:
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
    sources: Mapping[str, str | Path | Mapping[str, torch.Tensor] | Source],
    *,
    allow_pickle: bool = False,
    base: str | None = None,
) -> dict[str, Source]:
    """Open every source by name: checkpoint paths lazily, state dicts as they are, LoRA adapter
    directories over `base` (default: the first source, as the materializer's reference)."""
    out: dict[str, Source] = {}
    adapters: dict[str, Path] = {}
    for name, s in sources.items():
        if isinstance(s, Source):
            out[name] = s
        elif isinstance(s, (str, Path)) and Path(s, ADAPTER_CONFIG).is_file():
            adapters[name] = Path(s)
        elif isinstance(s, (str, Path)):
            out[name] = Source.open(name, s, allow_pickle=allow_pickle)
        elif isinstance(s, Mapping):
            out[name] = Source.from_state_dict(name, s)
        else:
            raise UserError(f"model {name!r}: expected a checkpoint path or a state dict, got {type(s).__name__}")
    if adapters:
        ref = base if base is not None else next(iter(sources))
        if ref in adapters:
            raise UserError(f"LoRA adapter {next(iter(adapters))!r} needs a full base checkpoint as the base model, not an adapter")
        if ref not in out:
            raise UserError(f"base {ref!r} is not among the sources ({', '.join(sources)})")
        for name, path in adapters.items():
            out[name] = open_lora(name, path, out[ref])
    _share_heads(out)
    return {name: out[name] for name in sources}


def _share_heads(sources: Mapping[str, Source]) -> None:
    """As mergekit does: when some sources store an output head and others tie it to their input embedding
    (tie_word_embeddings), the latter read their head from their embedding, so all of them merge."""
    from evomerge import arch

    for src in sources.values():
        f = arch.lookup(src.config, src.names())
        embedding = f.pre[0] if f.pre else None
        if f.head not in src and embedding in src and any(f.head in other for other in sources.values()):
            src.alias(f.head, embedding)
