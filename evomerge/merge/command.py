"""`evomerge merge CONFIG -o OUT`: a standalone merge, like mergekit-yaml, with evomerge's engine."""
from __future__ import annotations

import time
from pathlib import Path

from evomerge.merge.mergekit_yaml import read_config, to_mergekit
from evomerge.merge.refs import Resolved, check_adapters, resolve
from evomerge.records import UserError


def resolve_models(names: list[str], config_dir: Path, base: str, *, allow_pickle: bool = False) -> dict[str, Resolved]:
    """Each model reference of a recipe resolved (evomerge.merge.refs): a relative path as given (from the
    working directory), else relative to the config file."""
    resolved = {n: resolve(n, (Path.cwd(), config_dir), allow_pickle=allow_pickle) for n in names}
    check_adapters(resolved, base)
    return resolved


def run_merge(config: str, out: str | None, *, force: bool = False, emit_mergekit: bool = False,
              allow_pickle: bool = False, device: str = "cpu", tie_order: str = "mergekit", strict: bool = False) -> None:
    recipe = read_config(config)
    if emit_mergekit:
        print(to_mergekit(recipe), end="")
        return
    if out is None:
        raise UserError("missing -o OUT: the directory to write the merged checkpoint to")
    if Path(out).exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    from evomerge.merge.writer import write_checkpoint

    names = recipe.source_names()
    base = recipe.base_model if isinstance(recipe.base_model, str) else names[0]
    sources = resolve_models(names, Path(config).resolve().parent, base, allow_pickle=allow_pickle)
    start = time.perf_counter()
    write_checkpoint(recipe, {n: str(r.path) for n, r in sources.items()}, out, force=force, allow_pickle=allow_pickle,
                     device=device, tie_order=tie_order, pinned={n: r.pinned for n, r in sources.items()}, strict=strict,
                     compute="mergekit")
    print(f"merged {recipe.merge_method} of {len(sources)} models into {out} in {time.perf_counter() - start:.1f} s")
