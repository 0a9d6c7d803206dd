"""`evomerge merge CONFIG -o OUT`: a standalone merge, like mergekit-yaml, with evomerge's engine."""
from __future__ import annotations

import time
from pathlib import Path

from evomerge.merge.mergekit_yaml import read_config, to_mergekit
from evomerge.records import UserError


def resolve_models(names: list[str], config_dir: Path) -> dict[str, str]:
    """Each model name as a checkpoint directory: as given (relative to the working directory), else
    relative to the config file. Nothing is downloaded."""
    paths = {}
    for n in names:
        for candidate in (Path(n), config_dir / n):
            if candidate.is_dir():
                paths[n] = str(candidate)
                break
        else:
            raise UserError(f"model {n!r}: no checkpoint directory at {n} or {config_dir / n} (evomerge merge reads local checkpoints only)")
    return paths


def run_merge(config: str, out: str | None, *, force: bool = False, emit_mergekit: bool = False,
              allow_pickle: bool = False, device: str = "cpu", tie_order: str = "mergekit") -> None:
    recipe = read_config(config)
    if emit_mergekit:
        print(to_mergekit(recipe), end="")
        return
    if out is None:
        raise UserError("missing -o OUT: the directory to write the merged checkpoint to")
    if Path(out).exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    from evomerge.merge.writer import write_checkpoint

    sources = resolve_models(recipe.source_names(), Path(config).resolve().parent)
    start = time.perf_counter()
    write_checkpoint(recipe, sources, out, force=force, allow_pickle=allow_pickle, device=device, tie_order=tie_order,
                     compute="mergekit")
    print(f"merged {recipe.merge_method} of {len(sources)} models into {out} in {time.perf_counter() - start:.1f} s")
