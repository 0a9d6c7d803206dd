"""The run config (YAML, validated with pydantic) and how a run's parts are built from it.

```yaml
sources: {base: ./models/base, math: ./models/math, code: org/code@v1}   # name -> checkpoint dir, Hub ID, ...
base: base                       # which source is the base model
tokenizer_source: union          # optional (base | union | a source): tokenizers that differ, as mergekit's
space: {name: layer_weights, options: {method: dare_ties}}   # or {bounds: [[0, 1], ...]} for a plain box
optimizer: {name: cmaes, options: {sigma0: 0.17}, starts: [mine.yml]}   # starts: your recipes, scored first
fitness: {tasks: [{name: math, path: math.jsonl, metrics: [exact]}], backend: hf, handle: {batch_size: 16}}
# or lm-eval tasks: {lm_eval: {tasks: [my_task], include_path: lm_tasks, num_fewshot: 0}}
# or the user's own: {function: mypkg.score:fitness, objectives: [{name: acc, direction: max}]}
# fitness.racing: {chunk: 20, confidence: 0.95} or fitness.subset: {anchors: 30}: fewer examples scored
budget: {evaluations: 200, wall_time: 6h, cost: 20.0}   # also examples: (scored) and tokens: (API)
executor: {kind: ray, workers: 8, gpus_per_worker: 1, address: auto}
seed: 0
holdout:                         # after the budget: a table on held-out data, and the best model exported
  tasks: [{name: math, path: math_test.jsonl, metrics: [exact]}]
  baselines: {MATH: {merge_method: linear, models: [{model: math, parameters: {weight: 1.0}}]},
              PUBLISHED: {merge_method: linear, models: [{model: org/merged, parameters: {weight: 1.0}}]}}  # any reference
  export: best_model             # inside the run directory
trackers: [{kind: mlflow, uri: "sqlite:///mlflow.db"}, {kind: wandb, project: merges, mode: offline}]
# or the user's own: {function: mypkg.score:test_table}  (the best candidate's genome -> {row: {metric: value}})
```
`space: {points: module:function, bound: 5}` searches a box around the starting genomes the function returns
(one row each, e.g. flattened parameters of trained models; M2N2 starts its archive from all of them).
`module:function` names resolve with the config's folder on the import path.
Sources are model references (evomerge.merge.refs), relative paths from the config's folder; a source that is
not a local directory (a Hub ID, a .gguf file, `model+lora`) is recorded pinned in `source_refs`, which the
exported model card and recipe.yaml name it by.
Every mistake is a one-line UserError naming the key and what is valid.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from evomerge import machine
from evomerge.recipe import Recipe, read_yaml_mapping
from evomerge.records import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObjectiveConfig(_Strict):
    name: str
    direction: Literal["min", "max"] = "max"


class SpaceConfig(_Strict):
    """A search space by name (from search_spaces), or a plain box of genomes given by its bounds."""

    name: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    bounds: list[tuple[float, float]] | None = None
    names: list[str] | None = None
    points: str | None = None  # module:function returning the starting genomes, one row each
    bound: float | None = Field(default=None, gt=0)  # points: the box is [-bound, bound] (default 10 × max |point|)

    @model_validator(mode="after")
    def _one_kind(self) -> SpaceConfig:
        if sum(v is not None for v in (self.name, self.bounds, self.points)) != 1:
            raise ValueError("give exactly one of space.name (a search space), space.bounds (a plain box) or "
                             "space.points (module:function giving starting genomes)")
        if self.bound is not None and self.points is None:
            raise ValueError("space.bound applies to space.points only")
        return self


FRONT_OPTIMIZERS = ("nsga2", "map")  # they search a front over every objective
# the most evaluations the default search is Bayesian for: a Gaussian process's ask grows with the trials told (about
# a second at 300 on a CPU core, cubic beyond), NSGA-II's and CMA-ES's do not
GP_UP_TO = 1000


class OptimizerConfig(_Strict):
    # default: Bayesian optimisation (optuna's gp, over every objective) when the budget counts at most GP_UP_TO
    # evaluations; beyond, nsga2 when the fitness scores several tasks (a front), else cmaes
    name: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    start: Literal["space", "none"] = "space"  # start from the space's initial point, or let the optimizer pick
    # recipes of the user's own (mergekit configs or evomerge recipes, relative to the config's folder) scored first,
    # before the space's start; each must be a point of the space (its models the run's sources, by name or path)
    starts: list[Path] = Field(default_factory=list)


class RemoteLossConfig(_Strict):
    """The loss of each recipe on a dataset the service keeps (`evomerge serve --dataset`): the client sees
    neither weights nor data."""

    dataset: str
    limit: int | None = Field(default=None, ge=1)
    objective: str | None = None  # default loss/<dataset>


class LMEvalConfig(_Strict):
    """lm-evaluation-harness tasks (fitness.lmeval, the `evomerge[lm-eval]` extra), options named as lm-eval
    names them: tasks by name (lm-eval's registry and the YAMLs under include_path, relative to the config's
    folder) or inline lm-eval task configs; `metrics` and `weights` per task name."""

    tasks: list[str | dict[str, Any]]
    num_fewshot: int | None = Field(default=None, ge=0)
    limit: int | float | None = Field(default=None, gt=0)  # < 1: a fraction of each task's documents
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    include_path: str | list[str] | None = None
    weights: dict[str, float] | None = None  # adds objective lm_eval/score, the weighted sum (first objective)
    metrics: dict[str, str] | None = None  # task -> "acc" or "exact_match,strict-match"; default its first
    allow_test_set: bool = False


class RacingConfig(_Strict):
    """Score a candidate's examples in a fixed random order, `chunk` at a time, and stop it once it cannot
    plausibly beat what it must (evomerge/run/frugal.py): with probability >= `confidence`, no candidate whose
    full-dev score would reach that is stopped. `range`: the bounds of a per-example score."""

    chunk: int = Field(default=20, ge=1)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    range: tuple[float, float] = (0.0, 1.0)
    keep: float = Field(default=0.5, gt=0, le=1)  # generational optimizers: the top fraction of a generation that counts

    @model_validator(mode="after")
    def _range(self) -> RacingConfig:
        if not self.range[0] < self.range[1]:
            raise ValueError(f"fitness.racing.range must be [low, high] with low < high, got {list(self.range)}")
        return self


class SubsetConfig(_Strict):
    """Score most candidates on `anchors` examples chosen from the run's own per-example history and estimate
    the full-dev score (evomerge/run/frugal.py); the first `warmup` candidates and every `full_every`-th are scored
    on everything, and so is any whose estimate reaches the best."""

    anchors: int = Field(default=30, ge=1)
    strata: int = Field(default=8, ge=1)  # clusters of examples by their scores so far; anchors are drawn within each
    warmup: int = Field(default=12, ge=2)  # full rows before the first anchors
    window: int = Field(default=100, ge=2)  # the anchors are fitted on this many most recent full rows
    refit_every: int = Field(default=8, ge=1)  # new full rows between re-anchorings
    full_every: int = Field(default=10, ge=2)


class FitnessConfig(_Strict):
    """Task suites scored through a model handle (`tasks`, `backend`, `handle` options), lm-eval tasks
    (`lm_eval`), the user's own function `module:function` of the handle (`function` + `objectives`), or a
    loss the service computes (`remote_loss`, with the api backend)."""

    tasks: list[dict[str, Any]] | None = None  # fitness.tasks.TaskSpec mappings
    lm_eval: LMEvalConfig | None = None
    backend: Literal["hf", "vllm", "api"] = "hf"  # api: an OpenAI-compatible service (`evomerge serve` builds recipes)
    handle: dict[str, Any] = Field(default_factory=dict)  # options of the handle (batch_size, dtype, base_url, ...)
    function: str | None = None
    objectives: list[ObjectiveConfig] | None = None
    remote_loss: RemoteLossConfig | None = None
    racing: RacingConfig | None = None  # off by default: see benchmarks/fitness_cost.py
    subset: SubsetConfig | None = None

    @field_validator("handle")
    @classmethod
    def _placement(cls, handle: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if info.data.get("backend") in ("hf", "vllm"):  # an API handle has no device of its own
            machine.check_options(handle)
            tp = handle.get("tensor_parallel_size", 1)
            if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
                raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
        return handle

    def task_count(self) -> int:
        """Tasks scored as objectives of their own (lm-eval tasks with `weights` make one weighted score)."""
        if self.tasks is not None:
            return len(self.tasks)
        if self.lm_eval is not None and self.lm_eval.weights is None:
            return len(self.lm_eval.tasks)
        return 1

    @model_validator(mode="after")
    def _one_kind(self) -> FitnessConfig:
        if sum(v is not None for v in (self.tasks, self.lm_eval, self.function, self.remote_loss)) != 1:
            raise ValueError("give exactly one of fitness.tasks (task suites), fitness.lm_eval (lm-eval tasks), "
                             "fitness.function (module:function) or fitness.remote_loss (a loss evomerge serve computes)")
        if self.remote_loss is not None and self.backend != "api":
            raise ValueError("fitness.remote_loss needs backend: api (a service that takes recipes: evomerge serve)")
        if self.function is not None and not self.objectives:
            raise ValueError("fitness.function needs fitness.objectives: [{name: ..., direction: max|min}]")
        if self.racing is not None and self.subset is not None:
            raise ValueError("give fitness.racing or fitness.subset, not both")
        if (self.racing is not None or self.subset is not None) and (self.lm_eval is not None or self.remote_loss is not None):
            raise ValueError("fitness.racing and fitness.subset score subsets of the examples: they need fitness.tasks "
                             "or a fitness.function taking `examples`")
        return self


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class BudgetConfig(_Strict):
    evaluations: int | None = Field(default=None, ge=1)
    wall_time: float | None = None  # seconds, or "90s", "30m", "6h", "2d"
    cost: float | None = Field(default=None, gt=0)
    cost_key: str = "usd"
    examples: int | None = Field(default=None, ge=1)  # examples scored, summed over evaluations
    tokens: int | None = Field(default=None, ge=1)  # API prompt + completion tokens

    @field_validator("wall_time", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        if isinstance(v, str):
            m = _DURATION.match(v)
            if not m:
                raise ValueError(f"wall_time {v!r} is not a duration like 90s, 30m, 6h, 2d")
            return float(m.group(1)) * _SECONDS[m.group(2)]
        return v

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetConfig:
        if all(v is None for v in (self.evaluations, self.wall_time, self.cost, self.examples, self.tokens)):
            raise ValueError("budget needs at least one of evaluations, wall_time, cost, examples, tokens")
        return self


class ExecutorConfig(_Strict):
    kind: Literal["local", "ray"] = "local"
    workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1.0, ge=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    address: str | None = None  # Ray: None starts a local Ray, "auto" joins the running cluster
    max_retries: int = Field(default=2, ge=0)
    placement_grace: float = Field(default=60.0, gt=0)  # seconds a Ray worker may wait to be placed before it is said
    runtime_env: dict[str, Any] | None = None  # Ray runtime_env when evomerge starts or joins Ray (env_vars, working_dir, pip)


class CompareConfig(_Strict):
    """A comparison row found by its own search: the run's fitness, budget and seed with another `space`
    and/or `optimizer` (each replaces the run's whole section), e.g. random search in the same space."""

    space: SpaceConfig | None = None
    optimizer: OptimizerConfig | None = None

    @model_validator(mode="after")
    def _changes_something(self) -> CompareConfig:
        if self.space is None and self.optimizer is None:
            raise ValueError("a holdout.compare entry needs space and/or optimizer (what its search does differently)")
        return self


class HoldoutConfig(_Strict):
    """The end-of-run comparison on held-out data: the baseline recipes, the best of each `compare` search and
    the evolved best scored on `tasks` through the run's model handle (or the user's `function` of the best
    genome), and the best model exported to `export` (a folder inside the run directory)."""

    tasks: list[dict[str, Any]] | None = None  # fitness.tasks.TaskSpec mappings, e.g. a test split
    lm_eval: LMEvalConfig | None = None  # or lm-eval tasks
    baselines: dict[str, dict[str, Any]] = Field(default_factory=dict)  # row name -> recipe
    sources: dict[str, Path] = Field(default_factory=dict)  # models the baselines name beyond the run's, resolved
    compare: dict[str, CompareConfig] = Field(default_factory=dict)  # row name -> its own search, same budget
    function: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of `function`
    export: Path | None = None
    percent: bool = True  # show values × 100

    @model_validator(mode="after")
    def _one_kind(self) -> HoldoutConfig:
        if sum(v is not None for v in (self.tasks, self.lm_eval, self.function)) != 1:
            raise ValueError("give either holdout.tasks or holdout.function (module:function), or holdout.lm_eval "
                             "(lm-eval tasks): exactly one")
        if (self.baselines or self.compare) and self.tasks is None and self.lm_eval is None:
            raise ValueError("holdout.baselines and holdout.compare are recipes scored on holdout.tasks; give tasks")
        from evomerge.merge.checks import check_parameters

        for name, recipe in self.baselines.items():
            try:
                check_parameters(Recipe.from_dict(recipe))
            except UserError as e:
                raise ValueError(f"holdout.baselines.{name}: {e}") from None
        return self


class TrackerConfig(_Strict):
    """An experiment tracker the run logs every evaluation and the held-out table to (none unless listed)."""

    kind: Literal["mlflow", "wandb"]
    uri: str | None = None  # mlflow: tracking URI (sqlite:///mlflow.db, http://host:5000); default: MLflow's own
    experiment: str | None = None  # mlflow; default "evomerge"
    project: str | None = None  # wandb; default "evomerge"
    entity: str | None = None  # wandb
    mode: Literal["online", "offline"] | None = None  # wandb; default: W&B's own (WANDB_MODE)
    dir: str | None = None  # wandb: where its files go
    name: str | None = None  # the tracker's run name; default: the run directory's name

    @model_validator(mode="after")
    def _keys_of_its_kind(self) -> TrackerConfig:
        own = {"mlflow": {"uri", "experiment"}, "wandb": {"project", "entity", "mode", "dir"}}
        other = {k for k in self.model_fields_set - {"kind", "name"} if getattr(self, k) is not None} - own[self.kind]
        if other:
            raise ValueError(f"{sorted(other)[0]!r} is not a {self.kind} setting; {self.kind} takes "
                             f"{', '.join(sorted(own[self.kind] | {'name'}))}")
        return self


class RunConfig(_Strict):
    sources: dict[str, Path] = Field(default_factory=dict)  # name -> the local checkpoint directory it resolved to
    source_refs: dict[str, str] = Field(default_factory=dict)  # name -> the Hub ID at its commit (or .gguf file, model+lora)
    base: str | None = None
    tokenizer_source: str | None = None  # base, union or a source: sources whose tokenizers differ merge aligned by token
    space: SpaceConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    fitness: FitnessConfig
    budget: BudgetConfig
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    seed: int = Field(default=0, ge=0, lt=2**32)  # numpy's legacy seeding takes 0 to 2**32 - 1 only
    workdir: Path | None = None  # relative task files resolve here; set to the YAML's folder when loaded
    snapshot_every: int = Field(default=20, ge=1)  # optimizer snapshots every N tells (resume replays the rest)
    holdout: HoldoutConfig | None = None
    best: Literal["first", "knee"] | None = None  # the run's best: on the first objective, or the front's knee
    trackers: list[TrackerConfig] = Field(default_factory=list)  # e.g. [{kind: mlflow, uri: sqlite:///mlflow.db}]
    # the optimizer and best sections as the user wrote them, where _defaults chose for them (with_budget chooses again)
    _chosen: tuple[OptimizerConfig, str | None] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _sources(self) -> RunConfig:
        for name, path in self.sources.items():
            if not path.is_dir():
                raise ValueError(f"sources.{name}: model path {str(path)!r} is not a directory")
            if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
                raise ValueError(f"sources.{name}: no config.json (or LoRA adapter_config.json) in {str(path)!r}")
        if self.base is not None and self.base not in self.sources:
            raise ValueError(f"base {self.base!r} is not a source; sources: {', '.join(self.sources) or 'none'}")
        if self.sources and self.base is None:
            raise ValueError("base is missing: name the source that is the base model")
        if self.tokenizer_source not in (None, "base", "union", *self.sources):
            raise ValueError(f"tokenizer_source {self.tokenizer_source!r} names no source (use base, union or one of "
                             f"{', '.join(self.sources)})")
        if self.tokenizer_source is not None and self.fitness.backend == "vllm":
            raise ValueError("tokenizer_source needs fitness.backend hf (the vLLM handle reads the base's vocabulary)")
        return self

    @model_validator(mode="after")
    def _defaults(self) -> RunConfig:
        """Within a budget of evaluations a user pays for, the search that needs fewest to get there: a Gaussian
        process over every objective (benchmarks/curves.py on the zoo; on the real MATH + FR merge it kept both skills
        where NSGA-II lost MATH's). Several tasks are several skills: the search keeps a front and the best is its
        knee, rather than the first task's best, which may have lost the others."""
        several = self.fitness.task_count() > 1
        if self.optimizer.name is None:
            self._chosen = (self.optimizer.model_copy(deep=True), self.best)
            evaluations = self.budget.evaluations
            if evaluations is not None and evaluations <= GP_UP_TO:
                self.optimizer.name, self.optimizer.options = "optuna", {"sampler": "gp", **self.optimizer.options}
            else:
                self.optimizer.name = "nsga2" if several else "cmaes"
        if self.best is None:
            self.best = "knee" if several or self.optimizer.name in FRONT_OPTIMIZERS else "first"
        return self

    @model_validator(mode="after")
    def _gpus(self) -> RunConfig:
        """A Ray worker sees only the GPUs it reserves: the handle's device and tensor parallelism must fit them."""
        gpus, handle = self.executor.gpus_per_worker, self.fitness.handle
        if self.executor.kind != "ray" or self.fitness.backend == "api":
            return self
        index = machine.gpu_index(handle.get("device", "auto"))
        if index is not None and index >= max(gpus, 1 if gpus else 0):
            raise ValueError(f"fitness.handle.device {handle['device']} needs executor.gpus_per_worker >= {index + 1} "
                             f"(a Ray worker sees only the GPUs it reserves; it reserves {gpus:g})")
        tp = handle.get("tensor_parallel_size", 1)
        if self.fitness.backend == "vllm" and gpus > 0 and tp != max(1, gpus):
            raise ValueError(f"fitness.handle.tensor_parallel_size {tp} does not match executor.gpus_per_worker "
                             f"{gpus:g}: each worker's engine shards the model over the GPUs it reserves; set both "
                             f"to the same number (a fractional share of one GPU runs tensor_parallel_size 1)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def with_budget(self, **limits: Any) -> RunConfig:
        """This config with these budget limits; an optimizer it chose by the budget is chosen again for the new one
        (`--evaluations 5000` on a config naming none is not a Gaussian process's search: its asks grow cubically)."""
        data = {**self.to_dict(), "budget": {**self.budget.model_dump(exclude_none=True), **limits}}
        if self._chosen is not None:
            optimizer, best = self._chosen
            data["optimizer"], data["best"] = optimizer.model_dump(mode="json", exclude_none=True), best
        return parse_config(data)


def _format_error(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        parent = _model_at(model, err["loc"][:-1])
        valid = ", ".join(parent.model_fields) if parent else "see the docs"
        return f"config: unknown key {where!r}; valid keys here: {valid}"
    if err["type"] == "missing":
        return f"config: {where} is required"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        return f"config: {where}: {msg}"
    return f"config: {msg}" if not loc else f"config: {where}: {msg}"


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    cur: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            continue
        field = cur.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (args[0] if args else None)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def parse_config(data: Any, *, base_dir: str | Path | None = None) -> RunConfig:
    """Validate a config mapping; relative source paths are taken from `base_dir` (the YAML's folder)."""
    if not isinstance(data, dict):
        raise UserError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    if base_dir is not None:
        data.setdefault("workdir", str(Path(base_dir).resolve()))
    if isinstance(data.get("sources"), dict):
        _resolve_sources(data, Path(base_dir) if base_dir is not None else Path.cwd())
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_error(e.errors()[0], RunConfig)) from None


def _resolve_sources(data: dict[str, Any], base_dir: Path) -> None:
    """Every source reference as its local directory; those that were not one recorded pinned in source_refs."""
    from evomerge.merge.refs import check_adapters, resolve

    resolved = {}
    for name, ref in data["sources"].items():
        if not isinstance(ref, (str, Path)):
            raise UserError(f"config: sources.{name}: expected a checkpoint directory or a Hub ID, got {ref!r}")
        try:
            resolved[name] = resolve(str(ref), (base_dir,))
        except UserError as e:
            raise UserError(f"config: sources.{name}: {e}") from None
    if isinstance(data.get("base"), str):
        check_adapters(resolved, data["base"])
    api = isinstance(data.get("fitness"), dict) and data["fitness"].get("backend") == "api"
    if not api and isinstance(data.get("holdout"), dict) and isinstance(data["holdout"].get("baselines"), dict):
        _resolve_baselines(data, base_dir, set(resolved))  # (an API run's baselines name the server's models)
    data["sources"] = {name: str(r.path) for name, r in resolved.items()}
    pinned = {n: r.pinned for n, r in resolved.items() if r.pinned != str(r.path)}
    if pinned:
        data["source_refs"] = {**pinned, **(data.get("source_refs") or {})}  # a resumed run keeps what it recorded


def _resolve_baselines(data: dict[str, Any], base_dir: Path, sources: set[str]) -> None:
    """A model a baseline names that is not a run source is a reference: resolved into holdout.sources."""
    from evomerge.merge.refs import resolve

    holdout = data["holdout"]
    known = dict(holdout.get("sources") or {})
    for row, recipe in holdout["baselines"].items():
        try:
            names = Recipe.from_dict(recipe).source_names()
        except UserError:
            continue  # HoldoutConfig reports it, naming the row
        for n in names:
            if n not in sources and n not in known:
                try:
                    known[n] = str(resolve(n, (base_dir,)).path)
                except UserError as e:
                    raise UserError(f"config: holdout.baselines.{row}: {e}") from None
    if known:
        data["holdout"] = {**holdout, "sources": known}


def load_config(path: str | Path) -> RunConfig:
    return parse_config(read_yaml_mapping(path, "config"), base_dir=Path(path).parent)

