"""Writing a merged model as a Hugging Face checkpoint, atomically.

Everything is written into a temporary directory beside OUT and renamed into place at the end, so an
interrupted or failed merge leaves no OUT (and an existing OUT untouched unless `force`). An existing OUT is
swapped with the new one in one step (renameat2 RENAME_EXCHANGE, where the kernel and file system have it),
so OUT is always there, old or new. The temporary directories carry their writer's pid and host: those of a
killed merge are removed by the next merge beside them. Files follow the user's umask. The checkpoint
holds safetensors shards (+ index when there are several), config.json, the tokenizer and generation
config of the chosen sources, and a model card recording the recipe and the source models.
"""
from __future__ import annotations

import copy
import ctypes
import errno
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from evomerge import arch
from evomerge.merge.materializer import Materializer, SourceLike, parse_dtype
from evomerge.merge.mergekit_yaml import expressible, float32_replay, to_mergekit
from evomerge.merge.vocab import check_source
from evomerge.recipe import Recipe
from evomerge.records import UserError

TOKENIZER_FILES = (  # also what a Hub source downloads (evomerge.merge.refs)
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja",
)
SHARD_BYTES = 4 * 1024**3
PROGRESS_ELEMENTS = 50_000_000  # show a progress bar from this many merged parameters on


def write_checkpoint(
    recipe: Recipe,
    sources: Mapping[str, SourceLike],
    out: str | Path,
    *,
    base: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    device: str = "cpu",
    tie_order: str = "index",
    compute: str = "float32",
    max_shard_bytes: int = SHARD_BYTES,
    progress: bool | None = None,
    pinned: Mapping[str, str] | None = None,
    strict: bool = False,
    identity: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Merge `recipe` over `sources` (name -> checkpoint dir) and write the result at `out`. `tie_order`: which
    equal magnitudes a trim keeps at its threshold (evomerge.merge.sparsify); a search scores with "index".
    `pinned`: how the card and recipe.yaml name each source (a path or a Hub ID at its commit; default: its
    directory), so that `evomerge merge OUT/recipe.yaml` replays the merge. `strict`: a parameter filter that
    matches no tensor is an error, not a warning. `identity`: the sources' files and sha256 (a run's record,
    evomerge/merge/identity.py), listed on the card. `compute`: "mergekit" merges as mergekit does, in the
    recipe's dtype else the sources' (materializer.py)."""
    out = Path(out)
    _remove_stale(out)  # first: it may put back an OUT a killed merge had moved aside
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    names = recipe.source_names()
    missing = [n for n in names if n not in sources]
    if missing:
        raise UserError(f"model {missing[0]!r} of the recipe is not among the sources ({', '.join(sources)})")
    reference = base if base is not None else (recipe.base_model if isinstance(recipe.base_model, str) else names[0])
    used = {n: sources[n] for n in dict.fromkeys([reference, *names])}
    check_source(recipe.tokenizer_source, used)
    mat = Materializer(used, base=reference, device=device, allow_pickle=allow_pickle, tie_order=tie_order, strict=strict,
                       tokenizer_source=recipe.tokenizer_source, compute=compute)
    planned, _ = mat.plan(recipe)
    ref = mat.sources[reference]
    out_dtype = parse_dtype(recipe.out_dtype) or parse_dtype(recipe.dtype) or _stored_dtype(ref, planned[0].inputs[0].tensor)
    total = sum(_numel(ref.shape(p.inputs[0].tensor)) for p in planned)
    show = total >= PROGRESS_ELEMENTS if progress is None else progress

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(out, ".partial")
    try:
        _write_shards(tmp, mat.tensors(recipe, dtype=out_dtype, progress=show), max_shard_bytes)
        _write_config(tmp, ref.config, out_dtype, recipe, planned, mat.names,
                      None if mat.tokenizer is None else len(mat.tokenizer.get_vocab()))
        _write_tokenizer(tmp, recipe.tokenizer_source, mat.tokenizer, used, reference)
        ref_path = _path_of(used[reference])
        if ref_path is not None and (ref_path / "generation_config.json").is_file():
            shutil.copy2(ref_path / "generation_config.json", tmp / "generation_config.json")
        paths = {n: str(p.resolve()) if (p := _path_of(s)) is not None else n for n, s in used.items()}
        paths.update((n, r) for n, r in (pinned or {}).items() if n in used)
        replay = recipe.renamed(paths)
        (tmp / "recipe.yaml").write_text(replay.to_yaml())
        (tmp / "README.md").write_text(model_card(replay, paths, out.name, tie_order, identity))
        if expressible(recipe) is None:  # what mergekit replays to these weights
            replayed = recipe if compute == "mergekit" else float32_replay(recipe, str(out_dtype).removeprefix("torch."))
            (tmp / "mergekit_config.yml").write_text(to_mergekit(replayed, paths))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_card(replay: Recipe, paths: Mapping[str, str], title: str, tie_order: str = "index",
               identity: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """The card: the sources by name and reference (and the sha256 of their files, when known), and `replay`, the
    recipe naming them by reference, as recipe.yaml holds it."""
    lines = [
        "---", "library_name: transformers", "tags:", "- merge", "- evomerge", "---", f"# {title}", "",
        f"Merged with evomerge using **{replay.merge_method}**.", "", "## Source models", "",
    ]
    for name, path in paths.items():
        lines.append(f"- `{name}`: `{path}`")
        lines += [f"  - `{file}` sha256 `{digest}`" for file, digest in sorted((identity or {}).get(name, {}).items())]
    lines += ["", "## Recipe", "", f"recipe.yaml, beside this card; replay it with `evomerge merge recipe.yaml -o OUT --tie-order {tie_order}`:",
              "", "```yaml", replay.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def _write_shards(tmp: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> None:
    """Shards of at most `max_bytes` (a larger tensor gets its own), named as transformers names them."""
    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            save_file({k: v.contiguous() for k, v in current.items()}, str(tmp / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
            shards.append(list(current))
            current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            flush()
        current[name] = t.cpu()
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        (tmp / "shard-0.tmp").rename(tmp / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (tmp / f"shard-{i}.tmp").rename(tmp / fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_config(tmp: Path, config: dict[str, Any], dtype: torch.dtype, recipe: Recipe, planned: list, names: list[str],
                  vocab_size: int | None) -> None:
    """The reference's config, with the output's dtype, depth (stacked recipes) and `vocab_size` (aligned)."""
    cfg = copy.deepcopy(config)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop("torch_dtype", None)
    if vocab_size is not None:
        arch.text_config(arch.layout_for(config, names).family, cfg)["vocab_size"] = vocab_size
    if recipe.path is not None or recipe.slices:  # the depth and every depth-indexed field follow the new stack
        layout = arch.layout_for(config, names)
        if recipe.path is not None:
            arch.check_reorderable(layout.family, cfg)
        arch.apply_config(layout.family, cfg, arch.resize_config(layout.family, cfg, layout.source_layers(planned)))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))


def _write_tokenizer(tmp: Path, tokenizer_source: str | None, tokenizer: Any, sources: Mapping[str, SourceLike],
                     reference: str) -> None:
    """The tokenizer source's files as they are (chat template and special tokens with them); a union
    tokenizer, which no source has, saved as mergekit saves it."""
    if tokenizer_source == "union":
        tokenizer.save_pretrained(str(tmp))
        return
    src = _path_of(sources[reference if tokenizer_source in (None, "base") else tokenizer_source])
    for f in TOKENIZER_FILES:
        if src is not None and (src / f).is_file():
            shutil.copy2(src / f, tmp / f)


def _scratch(out: Path, suffix: str) -> Path:
    """A private directory beside OUT named after its writer, `.OUT.PID@HOST.XXXXXXXX.partial`."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}@{socket.gethostname()}.", suffix=suffix,
                                 dir=out.parent))


def _remove_stale(out: Path) -> None:
    """Remove what killed merges into OUT on this host left beside it: scratch directories whose writer is gone."""
    named = re.compile(rf"\.{re.escape(out.name)}\.(\d+)@(.+)\.[^.]+\.(partial|old)")
    host = socket.gethostname()
    for p in out.parent.glob(f".{glob.escape(out.name)}.*@*"):
        m = named.fullmatch(p.name)
        if m and m[2] == host and not _alive(int(m[1])):
            if m[3] == "old" and not out.exists() and (p / "out").is_dir():
                os.rename(p / "out", out)  # killed between moving OUT aside and the new one in: OUT comes back
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # this file system or kernel does not exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished directory into place. An existing OUT (with force) is exchanged with it atomically, then
    removed from where the new one was; without an exchange, it is moved aside first (a kill between the two
    renames leaves OUT only in the hidden `.old` folder, from where the next merge puts it back)."""
    # as the user's umask says: mkdtemp made the folder private, safetensors its shards, copies kept their source's
    mask = _umask()
    os.chmod(tmp, 0o777 & ~mask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~mask)
    if not out.exists():
        os.rename(tmp, out)
    elif out.is_dir() and _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        old = _scratch(out, ".old")
        os.rename(out, old / "out")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stored_dtype(src: Any, name: str) -> torch.dtype:
    return parse_dtype(src.dtype_name(name)) or torch.float32


def _path_of(s: Any) -> Path | None:
    if isinstance(s, (str, Path)):
        return Path(s)
    return getattr(s, "path", None)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
