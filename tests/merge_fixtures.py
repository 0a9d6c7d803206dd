"""Helpers for the merge tests: run mergekit 0.1.5 as the independent reference, compare state dicts."""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def resolve_names(cfg: dict[str, Any], paths: dict[str, Path]) -> dict[str, Any]:
    """A copy of a recipe dict with model names replaced by checkpoint paths (mergekit reads paths)."""
    c = copy.deepcopy(cfg)

    def sub(x: Any) -> Any:
        return str(paths[x]) if isinstance(x, str) and x in paths else x

    if "base_model" in c:
        c["base_model"] = sub(c["base_model"])
    for m in c.get("models") or []:
        m["model"] = sub(m["model"])
    for s in c.get("slices") or []:
        for src in s["sources"]:
            src["model"] = sub(src["model"])
    return c


def mergekit_merge(cfg: dict[str, Any], paths: dict[str, Path], out: Path) -> dict[str, torch.Tensor]:
    """Merge with mergekit's own planner and executor (`run_merge`), and read the result back."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    logging.getLogger("mergekit").setLevel(logging.ERROR)
    run_merge(MergeConfiguration.model_validate(resolve_names(cfg, paths)), str(out), MergeOptions(quiet=True))
    return load_checkpoint(out)


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def worst_relative_error(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """max over tensors of max|ours - ref| / max|ref|, and the tensor where it occurs."""
    assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))
    worst, where = 0.0, ""
    for k in ref:
        assert ours[k].shape == ref[k].shape, k
        err = ((ours[k].double() - ref[k].double()).abs().max() / ref[k].double().abs().max().clamp_min(1e-30)).item()
        if err > worst:
            worst, where = err, k
    return worst, where


def assert_matches_mergekit(cfg: dict[str, Any], paths: dict[str, Path], materializer: Any, tmp: Path, tol: float = 1e-6) -> None:
    """evomerge's merge of `cfg` equals mergekit's within `tol` relative (per tensor)."""
    from evomerge.recipe import Recipe

    ref = mergekit_merge(cfg, paths, tmp / "mk")
    err, where = worst_relative_error(materializer.materialize(Recipe.from_dict(cfg)), ref)
    assert err <= tol, f"{cfg['merge_method']}: {err:.2e} at {where}"
