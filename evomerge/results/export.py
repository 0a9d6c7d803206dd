"""Exporting candidates of a run: as an evomerge recipe, a mergekit config (names mapped to the run's
checkpoint paths), or a merged HF checkpoint, both through the merge engine (evomerge.merge).

Outputs are written beside their destination and renamed into place: a failed export leaves nothing.
"""
from __future__ import annotations

from pathlib import Path

from evomerge.machine import write_whole
from evomerge.recipe import Recipe
from evomerge.records import UserError

FORMATS = ("hf", "mergekit", "recipe")
_MAGNITUDE_TRIMS = ("ties", "breadcrumbs", "breadcrumbs_ties")


def mergekit_config(recipe: Recipe, sources: dict[str, str], base: str | None, names: dict[str, str]) -> str:
    """`recipe` as mergekit YAML that replays what a search scored and `--format hf` writes: with no `dtype` of its
    own, merged in float32 and written in the base's stored dtype (mergekit would otherwise merge in that dtype).
    `names`: how the YAML names each source (a path, or a Hub ID at its commit)."""
    from evomerge.merge.materializer import DTYPES
    from evomerge.merge.mergekit_yaml import float32_replay, to_mergekit
    from evomerge.merge.sources import open_sources

    if recipe.dtype is None:
        ref = base if base is not None else (recipe.base_model if isinstance(recipe.base_model, str) else recipe.source_names()[0])
        src = open_sources({ref: sources[ref]})[ref]
        stored = src.dtype_name(src.names()[0])
        recipe = float32_replay(recipe, stored if stored in DTYPES else "float32")
    text = to_mergekit(recipe, names)
    if recipe.merge_method in _MAGNITUDE_TRIMS:
        text = ("# equal magnitudes at a trim's threshold: the run kept the lowest indices, mergekit keeps those its "
                "sort puts first (the weights differ only where such a tie straddles the threshold)\n") + text
    return text


def export_run(run_dir: str | Path, out: str | Path, *, fmt: str = "hf", best: str | None = None,
               candidate: int | None = None, pareto: bool = False) -> list[Path]:
    """Export the chosen candidate(s); returns the paths written. `--pareto` writes one entry per front member
    into the folder `out` (candidate_<id>.yaml or candidate_<id>/)."""
    from evomerge.merge.writer import write_checkpoint
    from evomerge.results.journal import open_run

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not valid; use one of {', '.join(FORMATS)}")
    out = Path(out)
    run = open_run(run_dir)
    try:
        if pareto:
            ids = [int(i) for i in run.pareto().id]
            if not ids:
                raise UserError(f"{run_dir} has no successful evaluation yet")
        elif candidate is not None:
            ids = [int(candidate)]
        else:
            ids = [int(run.best(best)["id"])]
        recipes = {i: run.recipe(i) for i in ids}
        cfg = run.config
        identity = run.sources
    finally:
        run.close()
    sources = {k: str(v) for k, v in (cfg.get("sources") or {}).items()}
    pinned = {**sources, **(cfg.get("source_refs") or {})}  # Hub sources by ID at their commit, others by path
    if fmt != "recipe" and not sources:
        raise UserError("this run has no model sources: only --format recipe applies")
    targets = {i: (out / f"candidate_{i}{'' if fmt == 'hf' else '.yaml'}") if pareto else out for i in ids}
    for i, target in targets.items():
        if target.exists():
            raise UserError(f"{target} already exists; choose another -o")
    if fmt == "hf" and identity:  # the weights written are the ones scored, or nothing is written
        from evomerge.merge.identity import check

        check(identity, sources)
    for i, target in targets.items():
        if fmt == "recipe":
            write_whole(target, recipes[i].to_yaml())
        elif fmt == "mergekit":
            write_whole(target, mergekit_config(recipes[i], sources, cfg.get("base"), pinned))
        else:  # the writer stages in a temporary folder and renames it into place
            write_checkpoint(recipes[i], sources, target, base=cfg.get("base"), pinned=pinned, identity=identity)
    return list(targets.values())
