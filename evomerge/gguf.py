"""llama.cpp GGUF files as sources: a GGUF file becomes a plain Hugging Face checkpoint directory once.

`checkpoint_dir(path)` dequantizes the file through transformers' GGUF loader (the `gguf` package underneath)
and writes config.json (no quantization_config), safetensors, the tokenizer with its chat template and the
generation config, so every reader of checkpoint directories (the materializer, the HF and vLLM handles, the
dry-run planner) takes a GGUF source as it takes any other. The directory is cached under
$EVOMERGE_CACHE/gguf (default ~/.cache/evomerge/gguf), keyed by the file's resolved path, size and mtime and the
dtype, and written into a temporary directory renamed into place, so a failed or concurrent conversion never
leaves a half-written checkpoint.

Cost: dequantization holds the model once in the output dtype (2 bytes/param for bf16: 14 GB at 7B, 140 GB at
70B) plus one tensor in float32; it runs once per file.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np

from evomerge.machine import cache_dir
from evomerge.records import UserError

MAGIC = b"GGUF"
# The dtype a GGUF file declares is that of its half-precision tensors (its norms stay F32 beside them), as
# transformers reads it; all F32 is float32. A quantized file keeps no trace of its weights' dtype before
# quantization: it is written in bfloat16, the dtype of the checkpoints llama.cpp's users quantize (SmolLM2,
# Llama, Mistral, Qwen releases), at half float32's size; pass dtype="float32" for the exact dequantization.
HALF_TYPES = {"BF16": "bfloat16", "F16": "float16"}  # in the order transformers looks for them
QUANTIZED_DTYPE = "bfloat16"
DTYPES = ("bfloat16", "float16", "float32")


def cache_root() -> Path:
    return cache_dir("gguf")



def checkpoint_dir(path: Path, *, dtype: str | None = None) -> Path:
    """The checkpoint directory of GGUF file `path` (converted on first use, then read from the cache).
    `dtype`: the safetensors dtype ('float32', 'bfloat16', 'float16'); default: the one the file declares."""
    path = Path(path).resolve()
    reader = _reader(path)
    dtype = dtype or _declared_dtype(reader)
    if dtype not in DTYPES:
        raise UserError(f"GGUF {path}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = entry(path, dtype)
    if (out / "config.json").is_file():
        return out
    model_class = _model_class(path, reader)
    _check_quantizations(path, reader)
    del reader  # its memory map; transformers opens its own
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _convert(path, model_class, dtype, scratch)
        try:
            scratch.rename(out)
        except OSError:  # another process converted the same file meanwhile: keep its copy
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def entry(path: Path, dtype: str) -> Path:
    """The cache directory of (resolved path, size, mtime) written in `dtype`: a file changed in place gets a new one."""
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / f"{path.stem}-{key}-{dtype}"


def _reader(path: Path):
    if not path.is_file():
        raise UserError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise UserError(f"{path} is not a GGUF file (no GGUF magic at its start)")
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError) as e:
        raise UserError(f"{path} is not a readable GGUF file: {e}") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _declared_dtype(reader) -> str:
    types = {t.tensor_type.name for t in reader.tensors}
    if not types <= {"F32", *HALF_TYPES}:
        return QUANTIZED_DTYPE
    return next((dtype for t, dtype in HALF_TYPES.items() if t in types), "float32")


def _model_class(path: Path, reader) -> type:
    """The transformers class of the file's architecture, if evomerge's table (evomerge/arch.py) has it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge import arch

    name = _field(reader, "general.architecture", "(none)")
    known = {a for f in arch.FAMILIES.values() for a in f.architectures}
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except (ValueError, KeyError):
        model_class = None
    if model_class is None or model_class.__name__ not in known:
        got = f" ({model_class.__name__})" if model_class is not None else ""
        raise UserError(f"{path}: GGUF architecture {name!r}{got} is not in evomerge's architecture table "
                        f"({', '.join(sorted(known))})")
    return model_class


def _check_quantizations(path: Path, reader) -> None:
    """Every tensor type of the file must dequantize; each distinct type is tried on one zero block."""
    import gguf

    for qtype in sorted({t.tensor_type for t in reader.tensors}):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.dequantize(np.zeros(size, dtype=np.uint8), qtype)
        except NotImplementedError:
            tensor = next(t.name for t in reader.tensors if t.tensor_type == qtype)
            raise UserError(f"{path}: tensor {tensor} is quantized as {qtype.name}, which the gguf package "
                            f"cannot dequantize") from None


def _convert(path: Path, model_class: type, dtype: str, out: Path) -> None:
    """transformers refuses save_pretrained on a GGUF-loaded model: the plain model is rebuilt from its config
    (without quantization_config) around the dequantized tensors, then saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    # dequantize=True: transformers would otherwise keep some families' weights in packed GGUF blocks
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, dtype),
                                                  quantization_config=GgufConfig(dequantize=True))
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = getattr(torch, dtype)
    state = loaded.state_dict()
    del loaded
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
