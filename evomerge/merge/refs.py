"""Model references: how a model is named wherever one is (run config sources, mergekit YAML, `serve --model`,
mergekit-evolve genomes), resolved to the local checkpoint directory the merge reads.

- a local checkpoint directory, a relative one looked up in the caller's folders in order;
- a Hub ID `org/name` or `org/name@revision` (branch, tag or commit), as mergekit writes them: read from the
  HF cache first, else downloaded through huggingface_hub, only the files a merge reads (config, safetensors
  and their index, tokenizer, generation config; pickle weights only when pickle is allowed and the repo has
  no safetensors). HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN are read when resolving;
- mergekit's `model+lora`: a PEFT LoRA adapter (either form above) over a model (either form);
- a `.gguf` file, dequantized into a checkpoint directory by evomerge.gguf.

A local path wins over a Hub ID of the same spelling. The result records the Hub commit, so a reference can
be pinned (`pinned`) and a source's identity recorded.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from evomerge.merge.sources import ADAPTER_CONFIG
from evomerge.merge.writer import TOKENIZER_FILES
from evomerge.records import UserError

# huggingface_hub's repo-id rule (validate_repo_id) with the namespace required, then an optional @revision
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<rev>[\w.\-/]+))?")
_MERGE_FILES = ("config.json", "generation_config.json", ADAPTER_CONFIG, "*.safetensors", "*.safetensors.index.json",
                *TOKENIZER_FILES)
_PICKLE_FILES = ("*.bin", "*.bin.index.json")
_SUBFOLDERS = ("*/*",)  # a checkpoint is its repo's top folder (others hold ONNX, GGUF, original formats)


@dataclass(frozen=True)
class Resolved:
    """A model reference and the local copy it names; `pinned` and `commit` are its identity."""

    ref: str  # the reference as written
    path: Path  # the local checkpoint directory the merge reads (for model+lora: the adapter's)
    pinned: str  # a reference to exactly this copy: an absolute path, or the Hub ID at its commit
    commit: str | None = None  # the Hub commit it resolved to; None for local files
    over: Resolved | None = None  # model+lora: the model the adapter applies to


def resolve(ref: str, dirs: Sequence[str | Path], *, allow_pickle: bool = False) -> Resolved:
    """`ref` as a local checkpoint directory (downloaded from the Hub when it is a Hub ID the cache lacks). A
    relative path is looked up in `dirs`, first match wins. Every failure is a one-line UserError naming `ref`."""
    if not isinstance(ref, str) or not ref.strip():
        raise UserError(f"model reference {ref!r}: expected a checkpoint directory, a .gguf file or a Hub ID (org/name[@revision])")
    local = _local(ref, dirs)
    if local is not None and local.suffix == ".gguf" and local.is_file():
        from evomerge import gguf  # dequantizes into a checkpoint directory

        return Resolved(ref, Path(gguf.checkpoint_dir(local)), str(local))
    if local is not None and local.is_dir():
        return Resolved(ref, local, str(local))
    if ref.count("+") == 1:
        model, lora = ref.split("+")
        over, adapter = resolve(model, dirs, allow_pickle=allow_pickle), resolve(lora, dirs)
        if not (adapter.path / ADAPTER_CONFIG).is_file():
            raise UserError(f"model {ref!r}: {lora} is not a PEFT adapter (no {ADAPTER_CONFIG} in {adapter.path})")
        return Resolved(ref, adapter.path, f"{over.pinned}+{adapter.pinned}", adapter.commit, over)
    hub = _HUB_ID.fullmatch(ref)
    if hub and "--" not in hub["repo"] and ".." not in hub["repo"]:
        return _from_hub(ref, hub["repo"], hub["rev"], allow_pickle)
    where = " or ".join(str(Path(d) / ref) for d in dirs) if not Path(ref).is_absolute() else ref
    raise UserError(f"model {ref!r}: no checkpoint directory or .gguf file at {where}, and not a Hub ID (org/name[@revision])")


def _local(ref: str, dirs: Sequence[str | Path]) -> Path | None:
    p = Path(ref).expanduser()
    for candidate in [p] if p.is_absolute() else [Path(d) / p for d in dirs]:
        with contextlib.suppress(OSError):  # a name too long for the file system names no file: try the Hub's form
            if candidate.exists():
                return candidate.resolve()
    return None


def _from_hub(ref: str, repo: str, rev: str | None, allow_pickle: bool) -> Resolved:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    cache, offline = _cache_dir(), _offline()

    def fetch(patterns: Sequence[str], local_only: bool) -> Path:
        return Path(snapshot_download(repo, revision=rev, cache_dir=cache, allow_patterns=list(patterns),
                                      ignore_patterns=list(_SUBFOLDERS), local_files_only=local_only))

    try:
        try:
            path = fetch(_MERGE_FILES, True)  # the cache first: no request when the copy is there
            if not _has_weights(path, allow_pickle):
                raise LocalEntryNotFoundError(f"{path} has no weights")
        except LocalEntryNotFoundError:
            if offline:
                raise
            path = fetch(_MERGE_FILES, False)
        if allow_pickle and not any(path.glob("*.safetensors")):
            path = fetch((*_MERGE_FILES, *_PICKLE_FILES), offline)
    except RevisionNotFoundError:
        raise UserError(f"model {ref!r}: revision {rev!r} does not exist in {repo} on the Hub") from None
    except RepositoryNotFoundError:
        raise UserError(f"model {ref!r}: the Hub has no repository {repo} this token can read: set HF_TOKEN for a "
                        "private or gated model, or give a local path") from None
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:  # huggingface_hub turns a dropped connection into the first
        raise UserError(_not_cached(ref, repo, rev, cache, offline, e)) from None
    if not _has_weights(path, allow_pickle):
        raise UserError(f"model {ref!r}: {repo} has no safetensors weights"
                        + ("" if allow_pickle else " (pass --allow-pickle to read .bin weights)"))
    return Resolved(ref, path, f"{repo}@{path.name}", path.name)


def _not_cached(ref: str, repo: str, rev: str | None, cache: str | None, offline: bool, error: Exception) -> str:
    where = cache or "the default HF cache"
    cached = Path(cache or _default_cache(), "models--" + repo.replace("/", "--"))
    what = f"revision {rev!r} of {repo}" if rev and cached.is_dir() else repo
    if offline:
        return (f"model {ref!r}: no such local directory, and {what} is not in the HF cache ({where}); HF_HUB_OFFLINE=1 keeps the Hub out: "
                "set HF_HUB_OFFLINE=0 (and HF_TOKEN for a private or gated model) to download it, or give a local path")
    return (f"model {ref!r}: no such local directory, and {what} is not in the HF cache ({where}); the Hub did not give it "
            f"({type(error.__cause__ or error).__name__}): check the connection and the revision, set HF_TOKEN for a private or gated "
            "model, or give a local path")


def _has_weights(path: Path, allow_pickle: bool) -> bool:
    found = any(path.glob("*.safetensors")) or (allow_pickle and any(path.glob("*.bin")))
    return found and ((path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file())


def _cache_dir() -> str | None:
    """The HF cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def _default_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def check_adapters(resolved: Mapping[str, Resolved], base: str) -> None:
    """evomerge reads a `model+lora` source as it reads a local adapter directory, over the base: its model must be
    the base."""
    for name, r in resolved.items():
        if r.over is not None and (base not in resolved or r.over.path != resolved[base].path):
            raise UserError(f"model {name!r}: its adapter applies over {r.over.ref}, but evomerge applies adapters over "
                            f"the base model {base!r}: make {r.over.ref} the base, or merge the adapter into it first")
