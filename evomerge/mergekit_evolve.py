"""mergekit-evolve genome configs, run by `evomerge run` as they are.

A mergekit-evolve config (`genome: {models, merge_method, base_model, layer_granularity, normalize,
allow_negative_weights, filters, smooth, tokenizer_source}`, `tasks: [{name, weight, metric}]`, `limit`,
`num_fewshot`, `apply_chat_template`, `fewshot_as_multiturn`, `shuffle`, `random_init`) becomes the same
search in evomerge's terms: the layer_weights space over the same parameters (a weight, and a density for
ties/dare_ties, per layer group, per filter group, per model), CMA-ES from mergekit's start (weight 1/N,
density 1) with its step (σ 1/6 of a unit weight), 100 evaluations (mergekit's --max-fevals default), and
the lm-eval tasks as fitness whose first objective, `lm_eval/score`, is mergekit's weighted sum. Custom task
YAMLs are looked up beside the config (mergekit's --task-search-path). The equivalent evomerge config is
printed, so the run can be continued and edited in evomerge's own format.

Models are references (evomerge.merge.refs): checkpoint folders relative to the config's folder or the working
directory, Hub IDs, `model+lora`, .gguf files.
Known difference (tests/test_runs_mergekit_evolve.py): the tensors after the last layer (final norm,
lm_head) take layer_weights' first layer group's values, mergekit's last group's.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from evomerge.records import UserError

GENOME_KEYS = ("models", "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize",
               "allow_negative_weights", "filters", "smooth")
TOP_KEYS = ("genome", "tasks", "limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template",
            "fewshot_as_multiturn")
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")  # mergekit-evolve's, less slerp
FILTERS = {"self_attn": "attention", "mlp": "mlp"}  # mergekit filter -> layer_weights module group
SIGMA = 1 / 6  # mergekit-evolve's default --sigma0, in weight units
MAX_FEVALS = 100  # mergekit-evolve's default --max-fevals


def is_genome_config(data: Any) -> bool:
    return isinstance(data, dict) and "genome" in data and "space" not in data


def to_evomerge(data: dict[str, Any], base_dir: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The evomerge run config of a mergekit-evolve config (paths as they resolve from `base_dir`), and notes
    on options evomerge treats differently."""
    genome = _checked_genome(data)
    method, models, base_ref = genome["merge_method"], genome["models"], genome.get("base_model")
    sources: dict[str, str] = {}
    names = [_source(sources, ref, base_dir) for ref in models]
    base = _source(sources, base_ref, base_dir) if base_ref is not None else names[0]
    experts = [n for n in names if n != base] if method != "linear" else names
    notes = []
    if data.get("shuffle"):
        notes.append("shuffle: every candidate is scored on the same documents (the first `limit`), not a reshuffle")
    tokenizer_source = genome.get("tokenizer_source")
    if tokenizer_source not in (None, "base", "union"):  # a model reference: the source it names
        tokenizer_source = _source(sources, tokenizer_source, base_dir)
    negative = bool(genome.get("allow_negative_weights", False))
    config = {
        "sources": sources,
        "base": base,
        **({"tokenizer_source": tokenizer_source} if tokenizer_source else {}),
        "space": {"name": "layer_weights", "options": _space_options(genome, experts)},
        "optimizer": {"name": "cmaes", "options": {"sigma0": round(SIGMA / (2.0 if negative else 1.0), 6)},
                      **({"start": "none"} if data.get("random_init") else {})},
        "fitness": {"backend": "hf", "lm_eval": _lm_eval(data)},
        "budget": {"evaluations": MAX_FEVALS},
        "executor": {"kind": "local"},
        "seed": 0,
    }
    return config, notes


def _checked_genome(data: dict[str, Any]) -> dict[str, Any]:
    """The config's genome, every key and the method checked (one line naming what is wrong)."""
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"mergekit-evolve config: unknown key {unknown[0]!r}; valid keys: {', '.join(TOP_KEYS)}")
    genome = data["genome"]
    if not isinstance(genome, dict):
        raise UserError("mergekit-evolve config: genome is a mapping (models, merge_method, ...)")
    unknown = sorted(set(genome) - set(GENOME_KEYS))
    if unknown:
        raise UserError(f"mergekit-evolve config: unknown key genome.{unknown[0]}; valid keys: {', '.join(GENOME_KEYS)}")
    method = genome.get("merge_method")
    if method not in METHODS:
        raise UserError(f"mergekit-evolve config: genome.merge_method {method!r} is not supported here; "
                        f"valid: {', '.join(METHODS)}")
    if genome.get("smooth"):
        raise UserError("mergekit-evolve config: genome.smooth (values interpolated across layers) is not supported; "
                        "remove it to search one value per layer group")
    models = genome.get("models")
    if not isinstance(models, list) or not models:
        raise UserError("mergekit-evolve config: genome.models lists the models to merge")
    if method != "linear" and genome.get("base_model") is None:
        raise UserError(f"mergekit-evolve config: genome.base_model is required for {method}")
    return genome


def _space_options(genome: dict[str, Any], experts: list[str]) -> dict[str, Any]:
    """layer_weights' options for the genome's parameters, from mergekit-evolve's start."""
    method = genome["merge_method"]
    modules = []
    for f in genome.get("filters") or []:
        if f not in FILTERS:
            raise UserError(f"mergekit-evolve config: genome.filters entry {f!r} is not supported; valid: {', '.join(FILTERS)}")
        modules.append(FILTERS[f])
    normalize = genome.get("normalize")
    options: dict[str, Any] = {
        "method": method,
        "granularity": int(genome.get("layer_granularity") or 0),
        "normalize": bool(method in ("ties", "dare_ties", "linear") if normalize is None else normalize),
        "negative_weights": bool(genome.get("allow_negative_weights", False)),
        "weight_max": 1.0,
        "initial_weight": 1.0 / len(genome["models"]),
        "sources": experts,
    }
    if modules:
        options["modules"] = modules
    if method in ("ties", "dare_ties"):
        options["initial_density"] = 1.0
    if method == "linear":
        options["base"] = None  # every listed model is merged; none is a base
    return options


def _lm_eval(data: dict[str, Any]) -> dict[str, Any]:
    """The lm-eval fitness of the config's tasks: mergekit's weighted sum of each task's metric."""
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise UserError("mergekit-evolve config: tasks lists the lm-eval tasks to score")
    tasks = [{"name": t} if isinstance(t, str) else t for t in tasks]
    for t in tasks:
        if not isinstance(t, dict) or "name" not in t or set(t) - {"name", "weight", "metric"}:
            raise UserError(f"mergekit-evolve config: a task is a name or {{name, weight, metric}}, got {t!r}")
    lm_eval: dict[str, Any] = {
        "tasks": [t["name"] for t in tasks],
        "weights": {t["name"]: float(t.get("weight", 1.0)) for t in tasks},
        "metrics": {t["name"]: str(t.get("metric", "acc,none")) for t in tasks},
        "include_path": ".",
        "apply_chat_template": bool(data.get("apply_chat_template", True)),
        "fewshot_as_multiturn": bool(data.get("fewshot_as_multiturn", True)),
    }
    for key in ("limit", "num_fewshot"):
        if data.get(key) is not None:
            lm_eval[key] = data[key]
    return lm_eval


def _source(sources: dict[str, str], ref: Any, base_dir: str | Path) -> str:
    """The source name of a model reference (its last path part), added to `sources` once. A reference that
    resolves from the config's folder stays as written (the run config resolves it from there too); another is
    written pinned (an absolute path, a Hub ID at its commit)."""
    from evomerge.merge.refs import resolve

    for name, path in sources.items():
        if path == ref:
            return name
    resolved = resolve(ref, (base_dir, Path.cwd()))
    path = ref if (Path(base_dir) / ref).exists() else resolved.pinned
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(ref).name) or "model"
    while name in sources:
        name += "_"
    sources[name] = path
    return name


def load_run_config(path: str | Path):
    """An evomerge RunConfig from an evomerge config or a mergekit-evolve config; for the latter, the
    equivalent evomerge config is printed first."""
    import yaml

    from evomerge.config import load_config, parse_config
    from evomerge.recipe import read_yaml_mapping

    data = read_yaml_mapping(path, "config")
    if not is_genome_config(data):
        return load_config(path)
    config, notes = to_evomerge(data, Path(path).parent)
    print(f"evomerge: {path} is a mergekit-evolve config; the same search as an evomerge config "
          "(save it to continue in evomerge's format):")
    print(yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip())
    for note in notes:
        print(f"evomerge: note: {note}")
    return parse_config(config, base_dir=Path(path).parent)
