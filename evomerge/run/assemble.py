"""Turning a validated RunConfig into the parts of a run: space, optimizer, fitness, worker factory, executor.

The worker factory is plain data (the config as a dict), so it ships to Ray actors, which build their
worker (loading the sources once) on their own machine.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.config import RunConfig, parse_config
from evomerge.recipe import Recipe
from evomerge.records import Objective, UserError

log = logging.getLogger("evomerge")


class BoxSpace:
    """A plain box of genomes (`space: {bounds: ...}`): for searches whose fitness reads `x` itself."""

    decode = None  # no recipe: the fitness function reads the genome

    def __init__(self, bounds: list[tuple[float, float]], names: list[str] | None = None):
        self.bounds = np.asarray(bounds, dtype=float)
        if self.bounds.ndim != 2 or self.bounds.shape[1] != 2 or len(self.bounds) == 0:
            raise UserError("config: space.bounds must be a list of [low, high] pairs")
        self.dim = len(self.bounds)
        self._names = names or [f"x{i}" for i in range(self.dim)]
        if len(self._names) != self.dim:
            raise UserError(f"config: space.names has {len(self._names)} names for {self.dim} bounds")

    def names(self) -> list[str]:
        return list(self._names)

    def initial(self) -> np.ndarray:
        return self.bounds.mean(axis=1)


class PointsSpace(BoxSpace):
    """A box around starting genomes from the user's function (`space: {points: module:function}`), e.g. the
    flattened parameters of trained models: the search runs over the parameters themselves."""

    def __init__(self, points: Any, bound: float | None = None):
        pts = np.asarray(points, dtype=float)
        pts = pts[None] if pts.ndim == 1 else pts
        if pts.ndim != 2 or not pts.size or not np.all(np.isfinite(pts)):
            raise UserError("config: space.points must return finite genomes, one row each")
        half = bound if bound is not None else 10.0 * float(np.abs(pts).max() or 1.0)
        super().__init__([(-half, half)] * pts.shape[1])
        self.points = pts

    def initial(self) -> np.ndarray:
        return self.points[0].copy()


def importable(cfg: RunConfig) -> None:
    """`module:function` names in a config resolve with the config's folder on the import path."""
    import sys

    if cfg.workdir is not None and str(cfg.workdir) not in sys.path:
        sys.path.insert(0, str(cfg.workdir))


def model_facts(cfg: RunConfig) -> dict[str, Any]:
    """What a search space may need to know about the sources: expert names, base name, and from the base
    checkpoint (config.json and safetensors headers) its architecture (evomerge/arch.py), layer count and
    whether its head is tied to the input embedding."""
    from evomerge import arch
    from evomerge.merge.sources import Source

    experts = [n for n in cfg.sources if n != cfg.base]
    facts: dict[str, Any] = {"sources": experts} if experts else {}
    if cfg.base is not None:
        facts["base"] = cfg.base
        conf = Path(cfg.sources[cfg.base]) / "config.json"
        if not conf.is_file():
            raise UserError(f"sources.{cfg.base}: {conf.parent} has no config.json (not a Hugging Face checkpoint)")
        config = json.loads(conf.read_text())
        family = arch.lookup(config)
        facts["architecture"] = family.name
        n = arch.depth(family, config)
        if n is not None:
            facts["num_layers"] = n
        facts["tied_embeddings"] = family.head not in Source.open(cfg.base, conf.parent).names()
    return facts


def decoder(cfg: RunConfig, space: Any):
    """The space's decode, its recipes carrying the run's tokenizer_source (so that what is journaled, exported
    and replayed merges with the rows the search scored)."""
    if cfg.tokenizer_source is None:
        return space.decode
    return lambda x: dataclasses.replace(space.decode(x), tokenizer_source=cfg.tokenizer_source)


def build_space(cfg: RunConfig):
    if cfg.space.bounds is not None:
        return BoxSpace(cfg.space.bounds, cfg.space.names)
    if cfg.space.points is not None:
        from evomerge.registry import load_callable

        importable(cfg)
        return PointsSpace(load_callable(cfg.space.points, "space.points")(), cfg.space.bound)
    from evomerge import search_spaces

    accepted = _space_params(cfg.space.name)
    facts = {k: v for k, v in model_facts(cfg).items() if k in accepted}
    with options_checked(f"space {cfg.space.name!r}"):
        return search_spaces.make(cfg.space.name, **{**facts, **cfg.space.options})


def _space_params(name: str) -> set[str]:
    """The options space `name` takes (model facts are offered only to spaces that take them)."""
    from evomerge import search_spaces

    if name not in search_spaces.names():
        return set()  # search_spaces.make names the valid spaces
    return set(search_spaces.REGISTRY.options(name))


def build_optimizer(cfg: RunConfig, space: Any, objectives: list[Objective]):
    from evomerge import optimizers

    x0 = space.initial() if cfg.optimizer.start == "space" else None
    options = dict(cfg.optimizer.options)
    points = getattr(space, "points", None)  # several starting genomes: for an optimizer that takes them (M2N2)
    if (points is not None and cfg.optimizer.start == "space" and "initial_points" not in options
            and "initial_points" in optimizers.REGISTRY.options(cfg.optimizer.name)):
        options["initial_points"] = points
    starts = start_genomes(cfg, space)
    with options_checked(f"optimizer {cfg.optimizer.name!r}"):
        return optimizers.make(cfg.optimizer.name, bounds=space.bounds, objectives=objectives, seed=cfg.seed, x0=x0,
                               starts=starts, **options)


def start_genomes(cfg: RunConfig, space: Any) -> list[np.ndarray]:
    """The user's starting recipes (optimizer.starts) as genomes of the space, each exactly a point of its box: a
    recipe the space cannot hold, or a value outside its range, is one line naming the file."""
    from evomerge.merge.mergekit_yaml import read_config

    out = []
    for given in cfg.optimizer.starts:
        path = _start_path(cfg, given)
        try:
            recipe = read_config(path)
            x = np.asarray(space.encode(recipe.renamed(_source_names(cfg, recipe, path.parent))), dtype=float)
        except UserError as e:
            raise UserError(f"optimizer.starts: {given}: {e}") from None
        lo, hi = space.bounds[:, 0], space.bounds[:, 1]
        outside = np.flatnonzero((x < lo - 1e-12) | (x > hi + 1e-12))
        if outside.size:
            i = int(outside[0])
            raise UserError(f"optimizer.starts: {given}: {space.names()[i]} is {x[i]:g}, outside the space's range "
                            f"[{lo[i]:g}, {hi[i]:g}]")
        out.append(x)
    return out


def _start_path(cfg: RunConfig, given: Path) -> Path:
    return given if given.is_absolute() or cfg.workdir is None else cfg.workdir / given


def _say_start_dtypes(cfg: RunConfig) -> None:
    """A start written for mergekit's bf16 or fp16 arithmetic is merged in float32, as every candidate is, so its
    score compares with the search's: said once, when the run is checked (the engine builds its optimizer anew)."""
    from evomerge.merge.mergekit_yaml import read_config

    for given in cfg.optimizer.starts:
        dtype = read_config(_start_path(cfg, given)).dtype
        if dtype not in (None, "float32"):
            log.warning("evomerge: optimizer.starts: %s: its dtype %s is not kept; it is merged as every candidate "
                        "is, in float32 arithmetic", given, dtype)


def _source_names(cfg: RunConfig, recipe: Recipe, folder: Path) -> dict[str, str]:
    """A start recipe's model references -> the run's source names: a source's name, its Hub ID, or a path to its
    folder (relative to the recipe's)."""
    names = {ref: name for name, ref in cfg.source_refs.items()}
    folders = {Path(where).resolve(): name for name, where in cfg.sources.items()}
    for model in recipe.source_names():
        if model not in cfg.sources and (folder / model).resolve() in folders:
            names[model] = folders[(folder / model).resolve()]
    return names


@contextmanager
def options_checked(what: str) -> Iterator[None]:
    """A free-form options mapping handed to an optimizer or a space: a value of the wrong type, out of range or too
    large to allocate is a config mistake naming the section, not a traceback from inside numpy."""
    try:
        yield
    except (TypeError, ValueError, OverflowError, MemoryError) as e:
        raise UserError(f"config: {what} options: {type(e).__name__}: {str(e)[:300]}") from None


def build_fitness(cfg: RunConfig):
    if cfg.fitness.function is not None:
        from evomerge.run.worker import FunctionFitness

        importable(cfg)

        return FunctionFitness(cfg.fitness.function, [Objective(o.name, o.direction) for o in cfg.fitness.objectives])
    if cfg.fitness.remote_loss is not None:
        from evomerge.fitness.remote import RemoteLossFitness

        return RemoteLossFitness(**cfg.fitness.remote_loss.model_dump())
    if cfg.fitness.lm_eval is not None:
        from evomerge.fitness.lmeval import LMEvalFitness

        return LMEvalFitness.from_config(cfg.fitness.lm_eval.model_dump(), base_dir=cfg.workdir)
    from evomerge.fitness.suite import TaskFitness

    return TaskFitness.from_config(cfg.fitness.tasks, base_dir=cfg.workdir)


def build_handle(cfg: RunConfig):
    """The model handle with the sources resident (loaded once per worker); None for a run without models."""
    if cfg.fitness.backend == "api":
        from evomerge.fitness.api import APIHandle

        return APIHandle(**cfg.fitness.handle)
    if not cfg.sources:
        return None
    from evomerge.merge import Materializer

    sources = {k: str(v) for k, v in cfg.sources.items()}
    if cfg.fitness.backend == "vllm":
        from evomerge.fitness.vllm_handle import VLLMHandle

        options = {k: v for k, v in cfg.fitness.handle.items() if k != "device"}  # vLLM picks its own platform
        return VLLMHandle(sources[cfg.base], sources, base=cfg.base, **options)  # each vLLM worker opens them
    from evomerge.machine import resolve_device
    from evomerge.fitness.hf import HFHandle

    device = resolve_device(cfg.fitness.handle.get("device"))  # the materializer writes where the model lives
    return HFHandle(sources[cfg.base], Materializer(sources, base=cfg.base, device=device, tokenizer_source=cfg.tokenizer_source),
                    **{**cfg.fitness.handle, "device": str(device)})


@dataclass(frozen=True)
class WorkerFactory:
    """Builds a Worker from the run config wherever it is called (this process or a Ray actor)."""

    config: dict[str, Any]
    sources: dict[str, dict[str, str]] | None = None  # the identity recorded when the run started

    def __call__(self):
        from evomerge.run.worker import Worker

        cfg = parse_config(self.config)
        if self.sources and cfg.fitness.backend != "api":  # before anything loads: no score from other weights
            from evomerge.merge import identity

            identity.check(self.sources, cfg.sources)
        space = build_space(cfg)
        return Worker(build_fitness(cfg), handle=build_handle(cfg), decode=decoder(cfg, space), names=space.names())


def build_executor(cfg: RunConfig, *, address: str | None = None, sources: dict[str, dict[str, str]] | None = None):
    from evomerge.run.executors import LocalExecutor, RayExecutor

    factory = WorkerFactory(cfg.to_dict(), sources)
    ex = cfg.executor
    if ex.kind == "local" and address is None:
        return LocalExecutor(factory)
    return RayExecutor(factory, workers=ex.workers, cpus_per_worker=ex.cpus_per_worker,
                       gpus_per_worker=ex.gpus_per_worker, address=address or ex.address, max_retries=ex.max_retries,
                       placement_grace=ex.placement_grace, init_options={"runtime_env": ex.runtime_env} if ex.runtime_env else None)


def prepare(cfg: RunConfig, *, address: str | None = None):
    """What a run needs checked before anything loads: (space, objectives, memory plan); the optimizer's
    options are tried too. The plan's own check (`plan.check()`) is left to the caller."""
    from evomerge.run.footprint import plan_run

    space = build_space(cfg)
    fitness = build_fitness(cfg)
    if cfg.fitness.backend == "vllm" and cfg.sources:
        from evomerge.fitness.vllm_handle import check_supported

        check_supported(str(cfg.sources[cfg.base]))  # the engine starts from the base, in each worker
    objectives = list(fitness.objectives)
    if (cfg.fitness.racing or cfg.fitness.subset) and not getattr(fitness, "scores_subsets", True):
        raise UserError(f"config: fitness.racing and fitness.subset score subsets of the examples: the function "
                        f"{cfg.fitness.function} must take `examples` (indices) and return one per-example score each")
    build_optimizer(cfg, space, objectives)  # fail on bad options now, before a store exists
    _say_start_dtypes(cfg)
    if space.decode is not None and cfg.sources and cfg.fitness.backend != "api":
        from evomerge.merge import Materializer

        # a recipe the space cannot merge (a method's parameter it never sets) is a config mistake: one line now,
        # not a failed evaluation per candidate (headers only, nothing merged)
        sources = {k: str(v) for k, v in cfg.sources.items()}
        materializer = Materializer(sources, base=cfg.base, prefault=False, tokenizer_source=cfg.tokenizer_source)
        materializer.plan(decoder(cfg, space)(space.initial()))
    return space, objectives, plan_run(cfg, space, fitness, address=address)


def open_engine(cfg: RunConfig | None, run_dir: str | Path, *, resume: bool, address: str | None = None,
                budget: dict[str, Any] | None = None, on_progress: Any = None, on_plan: Any = None,
                placement_grace: float | None = None):
    """An Engine over `run_dir`: a new run from `cfg`, or (resume) the stored run, whose config must match
    `cfg` when one is given; `budget` entries (evaluations, wall_time, cost) raise a resumed run's limits;
    `placement_grace` (--placement-grace) overrides executor.placement_grace for this session.
    Everything is validated and built before the store is created or written; a run whose memory plan does
    not fit this machine is refused (`on_plan` sees the plan first)."""
    from evomerge.run.engine import Budget, Engine
    from evomerge.run.store import RunStore, is_run_dir

    run_dir = Path(run_dir)
    if is_run_dir(run_dir):
        if not resume:
            raise UserError(f"{run_dir} already holds a run; pass --resume to continue it (or `evomerge resume {run_dir}`)")
        store = RunStore.open(run_dir)
        stored = parse_config(store.config)
        if cfg is not None and cfg.to_dict() != stored.to_dict():
            store.close()
            diff = sorted(k for k in set(cfg.to_dict()) | set(stored.to_dict()) if cfg.to_dict().get(k) != stored.to_dict().get(k))
            raise UserError(f"the config differs from the one {run_dir} was started with (key {diff[0]!r}); "
                            "resume without a config or start a new run directory")
        cfg = stored
        if budget:
            try:
                cfg = cfg.with_budget(**budget)  # the stored config names its optimizer: a resumed run keeps it
            except UserError:
                store.close()
                raise
    elif resume and cfg is None:
        raise UserError(f"{run_dir} is not an evomerge run directory (no run.sqlite)")
    else:
        store = None
    assert cfg is not None
    try:
        space, objectives, plan = prepare(cfg, address=address)
        if on_plan is not None:
            on_plan(plan)
        plan.check()
        sources = _source_identity(cfg, store)
    except UserError:
        if store is not None:
            store.close()
        raise
    executor = build_executor(cfg, address=address, sources=sources)
    if placement_grace is not None and hasattr(executor, "grace"):
        executor.grace = placement_grace
    raised = cfg.to_dict() if store is not None and budget else None  # stored when the resumed log has replayed
    if store is None:
        executor.start()  # workers that cannot start (bad sources, fitness) fail before the run is created
        store = RunStore.create(run_dir, cfg.to_dict(), objectives=objectives, space_names=space.names(), seed=cfg.seed,
                                sources=sources)
    b = cfg.budget
    budget = Budget(evaluations=b.evaluations, wall_time=b.wall_time, cost=b.cost, cost_key=b.cost_key,
                    examples=b.examples, tokens=b.tokens)
    return Engine(store, lambda: build_optimizer(cfg, space, objectives), executor, budget=budget, decode=decoder(cfg, space),
                  snapshot_every=cfg.snapshot_every, on_progress=on_progress, planner=build_planner(cfg),
                  config=raised)


def _source_identity(cfg: RunConfig, store: Any) -> dict[str, dict[str, str]] | None:
    """The sources' identity a run records when it starts; a resumed run's recorded one, checked here first."""
    from evomerge.merge import identity

    if not cfg.sources or cfg.fitness.backend == "api":
        return None
    if store is None:
        return identity.fingerprints(cfg.sources)
    recorded = store.sources
    if recorded:
        identity.check(recorded, cfg.sources)
    return recorded


def build_planner(cfg: RunConfig):
    """Racing or subset + estimate (evomerge/run/frugal.py) when the fitness config asks for one."""
    f = cfg.fitness
    if f.racing is None and f.subset is None:
        return None
    from evomerge.run.frugal import Planner

    return Planner(racing=f.racing, subset=f.subset, seed=cfg.seed)
