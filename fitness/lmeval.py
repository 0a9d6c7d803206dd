"""lm-evaluation-harness tasks as a fitness (`fitness: {lm_eval: {...}}`, the `evomerge[lm-eval]` extra).

Tasks are built once per worker (dataset read, metrics and filters resolved) and every candidate is scored
by lm-eval's evaluation core (`lm_eval.evaluator.evaluate`) on the worker's handle through `HandleLM`:
no model loading, no environment probing, no bootstrap, and the requests (prompts, few-shot draws with
lm-eval's default seed: the ones `lm_eval.simple_evaluate` would build) built on the first evaluation and
reused for every candidate.

Each task's chosen metric becomes an objective `lm_eval/<task>/<metric>` (`<metric>,<filter>` when the
task filters its answers, e.g. `exact_match,strict-match`), direction from lm-eval's `higher_is_better`;
`weights` add a first objective `lm_eval/score`, the weighted sum (mergekit-evolve's fitness), which a
single-objective optimizer follows. Per-example scores (M2N2) are lm-eval's per-sample values of the chosen
metrics, larger is better, when every chosen metric is a mean over samples.

Tasks are named as lm-eval names them (its own registry plus the YAMLs under `include_path`) or given
inline as lm-eval task configs. Relative `data_files` in a task YAML resolve beside that YAML. A public
benchmark scored on its evaluation split is refused unless `allow_test_set: true`.
"""
from __future__ import annotations

import difflib
import functools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.records import Objective, UserError
from evomerge.fitness.base import FitnessResult, add_cost
from evomerge.fitness.handle import ModelHandle
from evomerge.fitness.tasks import PUBLIC_BENCHMARKS, TEST_ONLY

PREFIX = "lm_eval"
SCORE = f"{PREFIX}/score"
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("fitness.lm_eval needs lm-evaluation-harness: pip install 'evomerge[lm-eval]'") from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-candidate INFO lines would flood a run's log


@dataclass(frozen=True)
class Chosen:
    """The metric a task contributes: lm-eval's result key `metric,filter` and how to read it."""

    task: str
    metric: str
    filter: str
    direction: str
    mean: bool  # aggregated as a mean of per-sample values (then those are per-example scores)

    @property
    def key(self) -> str:
        return f"{self.metric},{self.filter}"

    @property
    def objective(self) -> str:
        return f"{PREFIX}/{self.task}/{self.metric if self.filter == 'none' else self.key}"


class LMEvalFitness:
    def __init__(
        self,
        tasks: Sequence[str | dict[str, Any]],
        *,
        num_fewshot: int | None = None,
        limit: int | float | None = None,
        apply_chat_template: bool = False,
        fewshot_as_multiturn: bool = False,
        include_path: str | Path | Sequence[str | Path] | None = None,
        weights: dict[str, float] | None = None,
        metrics: dict[str, str] | None = None,
        allow_test_set: bool = False,
    ) -> None:
        _lm_eval()
        if not tasks:
            raise UserError("fitness.lm_eval.tasks lists at least one lm-eval task")
        self.limit, self.apply_chat_template, self.fewshot_as_multiturn = limit, apply_chat_template, fewshot_as_multiturn
        paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
        for p in paths:
            if not Path(p).is_dir():
                raise UserError(f"fitness.lm_eval.include_path: {p} is not a directory")
        self.tasks = load_tasks(tasks, [Path(p) for p in paths], allow_test_set=allow_test_set)
        names = list(self.tasks)
        for key, what in ((weights, "weights"), (metrics, "metrics")):
            unknown = sorted(set(key or {}) - set(names))
            if unknown:
                raise UserError(f"fitness.lm_eval.{what}: {unknown[0]!r} is not one of the tasks ({', '.join(names)})")
        for name, task in self.tasks.items():
            _set_fewshot(task, num_fewshot)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)  # simple_evaluate's draws; requests are built once, so every candidate sees them
            task.build_all_requests = _BuiltOnce(task)
            for method in ("doc_to_text", "doc_to_target", "doc_to_choice"):
                setattr(task, method, _PerDocument(getattr(task, method)))
        self.chosen = [choose_metric(name, task, (metrics or {}).get(name)) for name, task in self.tasks.items()]
        self.weights = None if weights is None else {c.task: float(weights.get(c.task, 1.0)) for c in self.chosen}
        self.objectives = [Objective(c.objective, c.direction) for c in self.chosen]  # type: ignore[arg-type]
        if self.weights is not None:
            self.objectives.insert(0, Objective(SCORE, "max"))

    @classmethod
    def from_config(cls, options: dict[str, Any], base_dir: str | Path | None = None) -> LMEvalFitness:
        """From a run config's `lm_eval` mapping; a relative include_path is taken from `base_dir`."""
        options = dict(options)
        paths = options.get("include_path")
        paths = [paths] if isinstance(paths, str) else list(paths or [])
        options["include_path"] = [Path(base_dir or ".", p) for p in paths] or None
        return cls(**options)

    def run(self, handle: ModelHandle) -> dict[str, Any]:
        """lm-eval's own results for `handle` (results, per-sample records), as `evaluate` returns them."""
        from lm_eval.evaluator import evaluate

        from evomerge.fitness.lmeval_lm import HandleLM

        return evaluate(lm=HandleLM(handle), task_dict={"tasks": self.tasks}, limit=self.limit, bootstrap_iters=0,
                        log_samples=True, apply_chat_template=self.apply_chat_template,
                        fewshot_as_multiturn=self.fewshot_as_multiturn)

    def evaluate(self, handle: ModelHandle) -> FitnessResult:
        return self.result_of(self.run(handle), handle)

    def result_of(self, out: dict[str, Any], handle: Any = None) -> FitnessResult:
        """Objectives and per-example scores from lm-eval's output for one candidate."""
        objectives: dict[str, float] = {}
        per_example: list[float] | None = []
        for c in self.chosen:
            value = out["results"][c.task].get(c.key)
            objectives[c.objective] = float("nan") if value is None else float(value)
            if per_example is not None and c.mean:
                sign = 1.0 if c.direction == "max" else -1.0
                samples = sorted((s for s in out["samples"][c.task] if s["filter"] == c.filter), key=lambda s: s["doc_id"])
                per_example += [sign * float(s[c.metric]) for s in samples]
            else:
                per_example = None
        if self.weights is not None:
            objectives[SCORE] = sum(w * objectives[c.objective] for c, w in zip(self.chosen, self.weights.values()))
        cost: dict[str, float] = {}
        pop = getattr(handle, "pop_cost", None)
        if pop is not None:
            add_cost(cost, pop())
        return FitnessResult(objectives=objectives, per_example=per_example, cost=cost)


class _BuiltOnce:
    """A task's `build_all_requests` that builds its requests (prompt rendering, few-shot draws) on the first
    evaluation only: `evaluate` asks for them again for every candidate, which would redo the same work each
    time; later calls only clear the previous candidate's responses."""

    def __init__(self, task: Any) -> None:
        self.task, self.build, self.built = task, task.build_all_requests, False

    def __call__(self, **kwargs: Any) -> None:
        if not self.built:
            self.build(**kwargs)
            self.built = True
            return
        for inst in self.task.instances:
            inst.resps.clear()
            inst.filtered_resps.clear()


class _PerDocument:
    """A task's doc_to_* rendered once per document: lm-eval renders (and compiles) a Jinja template on every
    call, and `evaluate` calls them again for every candidate (gold answers, logged samples)."""

    def __init__(self, render: Any) -> None:
        self.render, self.seen = render, {}

    def __call__(self, doc: Any, *args: Any) -> Any:
        if args and args[0] is not None:  # a few-shot config's own template: rare, not cached
            return self.render(doc, *args)
        key = json.dumps(doc, sort_keys=True, default=str)
        if key not in self.seen:
            self.seen[key] = self.render(doc)
        return self.seen[key]


# -- building tasks ---------------------------------------------------------------------------------------
def load_tasks(specs: Sequence[str | dict[str, Any]], include: list[Path], *, allow_test_set: bool) -> dict[str, Any]:
    """lm-eval Task objects by name, built once. The full registry (~15k YAMLs, seconds to index) is read
    only when a name is not among the `include` YAMLs."""
    names = [s if isinstance(s, str) else s.get("task") for s in specs]
    for s, n in zip(specs, names):
        if not isinstance(n, str) or not n:
            raise UserError(f"fitness.lm_eval.tasks: an entry is a task name or an lm-eval task config with 'task', got {s!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"fitness.lm_eval.tasks: {dup[0]!r} is listed twice")
    paths = tuple(str(p.resolve()) for p in include)
    manager = _manager(paths, defaults=False) if paths else None
    if manager is None or any(isinstance(s, str) and s not in manager.task_index for s in specs):
        manager = _manager(paths, defaults=True)
    tasks: dict[str, Any] = {}
    for spec, name in zip(specs, names):
        config = _config(manager, spec)
        guard_test_set(name, config, allow_test_set)
        if isinstance(spec, str) and _relative_data_files(config):
            spec = {**config, "dataset_kwargs": {**config["dataset_kwargs"], "data_files": _relative_data_files(config)}}
        tasks[name] = _build(manager, spec, name, config)
    return tasks


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], *, defaults: bool) -> Any:
    """lm-eval's task index, once per process (a holdout and a local worker reuse the run's)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def _config(manager: Any, spec: str | dict[str, Any]) -> dict[str, Any]:
    """The task's lm-eval config as written (its YAML with includes resolved, or the inline mapping)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    if isinstance(spec, dict):
        return dict(spec)
    entry = manager.task_index.get(spec)
    if entry is None:
        close = difflib.get_close_matches(spec, manager.all_tasks, n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; see `lm-eval ls tasks`, or add include_path"
        raise UserError(f"fitness.lm_eval: unknown lm-eval task {spec!r}{hint}")
    if entry.kind in (Kind.GROUP, Kind.TAG):
        members = manager.load([spec])["tasks"] if entry.kind == Kind.TAG else None
        listed = ", ".join(list(members)[:5]) if members else "its member tasks"
        raise UserError(f"fitness.lm_eval: {spec!r} is an lm-eval {entry.kind.name.lower()}, not a task; list the tasks "
                        f"to score ({listed}), each becomes an objective")
    if entry.yaml_path is None:
        return {"task": spec}
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    cfg["_yaml_dir"] = str(Path(entry.yaml_path).parent)
    return cfg


def _relative_data_files(config: dict[str, Any]) -> Any:
    """data_files with relative paths made absolute beside the task YAML; None when there are none."""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    where = config.get("_yaml_dir")
    if files is None or where is None:
        return None

    def fix(f: Any) -> Any:
        if isinstance(f, str) and "://" not in f and not Path(f).is_absolute():
            return str(Path(where) / f)
        if isinstance(f, list):
            return [fix(x) for x in f]
        if isinstance(f, dict):
            return {k: fix(v) for k, v in f.items()}
        return f

    fixed = fix(files)
    return None if fixed == files else fixed


def _build(manager: Any, spec: str | dict[str, Any], name: str, config: dict[str, Any]) -> Any:
    if isinstance(spec, dict):
        spec = {k: v for k, v in spec.items() if k != "_yaml_dir"}
    try:
        loaded = manager.load([spec])["tasks"]
    except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds; each becomes one line
        dataset = "/".join(str(x) for x in (config.get("dataset_path"), config.get("dataset_name")) if x)
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if _offline(e) and not (config.get("dataset_kwargs") or {}).get("data_files"):
            raise UserError(f"fitness.lm_eval: task {name!r} needs dataset {dataset or '?'}, which is not available "
                            "offline; put it in the Hugging Face datasets cache, or point a task YAML under include_path "
                            "at local files (dataset_path: json, dataset_kwargs: {data_files: ...})") from None
        raise UserError(f"fitness.lm_eval: task {name!r} cannot be built: {type(e).__name__}: {text}") from None
    return loaded[name]


def _offline(e: BaseException) -> bool:
    """A dataset that could not be fetched: no network (or offline mode) and not in the cache."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, (ConnectionError, FileNotFoundError)) or type(seen).__name__ in (
                "DatasetNotFoundError", "OfflineModeIsEnabled", "LocalEntryNotFoundError"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _set_fewshot(task: Any, num_fewshot: int | None) -> None:
    """As `simple_evaluate` does: num_fewshot overrides the task's default unless the task pins 0."""
    if num_fewshot is not None and task.get_config("num_fewshot") != 0:
        task.set_config(key="num_fewshot", value=int(num_fewshot))
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)


def choose_metric(name: str, task: Any, wanted: str | None) -> Chosen:
    """The task's metric `wanted` ('acc', or 'exact_match,flexible-extract'), default its first metric and
    first filter; a metric or filter the task does not produce is a UserError listing what it does."""
    from lm_eval.api.metrics import mean

    aggregation = task.aggregation()
    filters = [f["name"] for f in (task.config.filter_list or [])] or ["none"]
    produced = [f"{m},{f}" for m in aggregation for f in filters]
    metric, _, filt = (wanted or next(iter(aggregation), "")).partition(",")
    filt = filt or filters[0]
    if metric not in aggregation or filt not in filters:
        raise UserError(f"fitness.lm_eval: task {name!r} does not produce metric {wanted!r}; it produces: "
                        f"{', '.join(produced)}")
    direction = "max" if task.higher_is_better().get(metric, True) else "min"
    return Chosen(task=name, metric=metric, filter=filt, direction=direction, mean=aggregation[metric] is mean)


def guard_test_set(name: str, config: dict[str, Any], allow: bool) -> None:
    """Refuse a public benchmark scored on the split it is reported on (its test split, or its validation
    split when it has no public test labels), as evomerge's own tasks do; a train split is fine."""
    if allow:
        return
    where = " ".join(str(config.get(k) or "") for k in ("dataset_path", "dataset_name"))
    tokens = set(re.split(r"[^a-z0-9]+", f"{name} {where}".lower()))
    bench = sorted(tokens & set(PUBLIC_BENCHMARKS))
    split = config.get("test_split") or config.get("validation_split") or ""
    if bench and ("train" not in str(split) or set(bench) & set(TEST_ONLY)):
        raise UserError(f"fitness.lm_eval: task {name!r} scores the {bench[0]} evaluation set ({split or 'its test split'}); "
                        "a search scored on it overfits the numbers it will be judged by. Score a train/dev split "
                        "instead, or set allow_test_set: true to insist")
