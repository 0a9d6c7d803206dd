"""The materializer: recipes turned into weights straight from the sources, without touching a file.

Sources stay as they are stored: safetensors files memory-mapped in their own dtype (bfloat16 stays two
bytes a parameter), so their pages live in the page cache, shared by every process of the node that maps
them, and cost no private memory. Each output tensor is merged into its own freshly allocated buffer (or
straight into a module's parameter) by the method's kernel, which forms the deltas block by block; trims
keep a compact summary per (model, tensor), or per (model, stack) for experts stored apart but stacked in
memory (which trims read as one, as mergekit does), computed on first use (vectors.py). Beyond the output
a merge holds only per-thread blocks and one tensor's selection buffer (a DELLA trim of a stack member: its
ranks, 4 bytes an entry); methods outside the task-arithmetic family
(linear, slerp, model_stock, passthrough) hold float32 copies of one tensor's inputs while merging it.
Methods reading whole-tensor statistics (slerp's angle, sce's variance cut...) read a stack's as sums
over its members (stackwide.py), shared by the members' merges.
A recipe's `dtype` is mergekit's: the dtype its inputs are loaded and merged in. Merged in float32 (or with no
`dtype`, in a search), the fused kernels compute in float32 and round once; in bfloat16 or float16, or with
`compute="mergekit"` (`evomerge merge`: no `dtype` then means the sources' own), the task-arithmetic family
and linear run mergekit 0.1.5's own torch operations in that dtype (methods.py), so a replay is bit for bit;
other methods merge the inputs rounded to it in float32 and round the result to it.
Tensors are merged in parallel over `threads` (the kernels release the GIL); on CUDA each thread copies
and merges on a stream of its own, so one tensor's host-to-device copy overlaps another's merge. Nested
recipes are merged first into transient sources.
"""
from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

import torch

from evomerge.merge import methods as registry
from evomerge.merge.checks import check_compatible, check_parameters
from evomerge.merge.passes import Traffic
from evomerge.merge.methods import Entry, Group, Method, Whole
from evomerge.merge.params import resolve
from evomerge.merge.peers import Peers
from evomerge.merge.plan import Planned, entry_name, plan
from evomerge.merge.sources import Source, map_pages, open_sources
from evomerge.merge.sparsify import TIE_ORDERS
from evomerge.merge.stackwide import Stack
from evomerge.merge.vectors import Shared, StackVector, Summary, TaskVector
from evomerge.recipe import Recipe
from evomerge.records import UserError

SourceLike = str | Path | Mapping[str, torch.Tensor] | Source

COMPUTE = ("float32", "mergekit")  # float32: the fast kernels unless a recipe's dtype is lower; mergekit: its ops always
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_threads() -> int:
    """The CPUs this process may use (Ray and other launchers say so through OMP_NUM_THREADS)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Materializer:
    """Memory-mapped sources; `materialize(recipe)`, `tensors(recipe)` and `load_into(recipe, module)`.
    `prefault`: map the sources' pages in the background from now (sources.map_pages); off for one that only
    plans. `tokenizer_source` (base, union or a source): the sources' embeddings and heads read in that
    vocabulary (evomerge.merge.vocab), with the filler rows mergekit gives each recipe (they depend on its
    models and base_model); every recipe merged then has this tokenizer_source or none. `compute`: see the module's docstring."""

    def __init__(
        self,
        sources: Mapping[str, SourceLike],
        *,
        base: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
        threads: int | None = None,
        tie_order: str = "index",
        prefault: bool = True,
        strict: bool = False,
        tokenizer_source: str | None = None,
        compute: str = "float32",
        peers: Peers | None = None,
    ):
        if not sources:
            raise UserError("the materializer needs at least one source")
        if tie_order not in TIE_ORDERS:
            raise UserError(f"tie_order {tie_order!r} is not one of {', '.join(TIE_ORDERS)}")
        if compute not in COMPUTE:
            raise UserError(f"compute {compute!r} is not one of {', '.join(COMPUTE)}")
        if threads is not None and threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        self.sources = open_sources(sources, allow_pickle=allow_pickle, base=base)
        self.reference = base if base is not None else next(iter(self.sources))
        if self.reference not in self.sources:
            raise UserError(f"base {self.reference!r} is not among the sources ({', '.join(self.sources)})")
        self.tokenizer_source = tokenizer_source
        self.tokenizer = None  # the output tokenizer (transformers) when the sources' vocabularies are aligned
        self._vocabulary = None  # the output vocabulary (evomerge.merge.vocab) when a tokenizer_source aligns them
        self._aligned: dict[tuple, dict] = {}  # (models, base) -> their rows in it, kept across candidates
        self._aligned_for: tuple | None = None  # the (models, base) whose rows the sources read now
        if tokenizer_source is not None:
            from evomerge.merge.vocab import vocabulary

            self._vocabulary = vocabulary(self.sources, self.reference, tokenizer_source)
            self.tokenizer = self._vocabulary.tokenizer
            self._align(tuple(self.sources), self.reference)
        check_compatible(self.sources, self.reference, tokens=tokenizer_source is None)
        self.mapping = map_pages(self.sources) if prefault else None  # the thread mapping them, if any
        self.device = torch.device(device)
        self.dtype = dtype
        self.threads = threads or default_threads()
        self.tie_order = tie_order
        self.strict = strict  # a parameter filter that matches no tensor is an error (evomerge.merge.plan)
        self.compute = compute
        self.names = self.sources[self.reference].names()
        self._transient: dict[str, dict[str, torch.Tensor] | None] = {}  # nested recipes' results during a merge (None: planning)
        self._summaries: dict[tuple, Summary] = {}  # per task vector (or stack), kept across candidates
        self._pool: ThreadPoolExecutor | None = None
        self.merged_bytes = Traffic()  # `read`: bytes of the inputs' entries merged (trims' summaries not counted)
        self.peers = peers  # the other tensor-parallel ranks merging each candidate with this one (tensors(spans=...))
        self._streams = threading.local()  # CUDA: each merge thread's stream

    # --- public -----------------------------------------------------------------------------------

    def materialize(self, recipe: Recipe, *, dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
        """The full merged state dict, in `dtype` (default: the recipe's dtype, else the compute dtype)."""
        return dict(self.tensors(recipe, dtype=dtype, progress=progress))

    def tensors(self, recipe: Recipe, *, dtype: torch.dtype | None = None, progress: bool = False,
                spans: Mapping[str, tuple[tuple[int, int], ...]] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Merged tensors one at a time, so a writer holds no more than one of them. `spans` (output name -> flat
        [start, end) ranges, e.g. a tensor-parallel rank's shard): of those tensors only these entries are wanted;
        the methods that can merge part of a tensor (methods.Group.spans) leave the rest of its buffer unset."""
        out_dtype = dtype or parse_dtype(recipe.out_dtype) or parse_dtype(recipe.dtype) or self.dtype
        from tqdm.auto import tqdm

        if self.peers is not None:
            self.peers.next()
        with self._nested(recipe) as flat:
            method, planned, _, seed = self._prepare(flat)
            if self.peers is not None:  # the task vectors' owners (TaskVector.cuts)
                self.peers.deal({_vector_key(p, i): _numel(self._shape(p)) for p in planned if p.base is not None
                                 for i in range(len(p.inputs)) if i != p.base})
            direct = method.any_out_dtype and out_dtype in (torch.float32, torch.bfloat16)
            merge = self._new_merge(method, planned, seed, flat)

            def one(p: Planned) -> torch.Tensor:
                low = self._low(merge, p)
                buffer = self._buffer(method, low) if low else (out_dtype if direct else self.dtype)
                out = torch.empty(self._shape(p), device=self.device, dtype=buffer)
                self._merge(merge, p, out, (spans or {}).get(p.name))
                out = out if low in (None, out.dtype) else out.to(low)  # mergekit rounds to its compute dtype, then to out_dtype
                return out if out.dtype == out_dtype else out.to(out_dtype)

            done = self._map(one, planned)
            for p in tqdm(planned, desc="merging", disable=not progress, unit="tensor"):
                yield p.name, next(done)

    def load_into(self, recipe: Recipe, module: torch.nn.Module, *,
                  targets: Callable[[list[Planned]], Mapping[str, torch.Tensor]] | None = None) -> None:
        """Write the merged weights into `module` in place: into its parameters and buffers by name, or into
        `targets(plan)` (checkpoint tensor name -> destination tensor, which may be a view into a parameter, for
        models whose loader renames or fuses checkpoint tensors; given the recipe's plan, it may first fit the
        module to it: its depth, its head)."""
        with self._nested(recipe) as flat:
            method, planned, _, seed = self._prepare(flat)
            merge = self._new_merge(method, planned, seed, flat)
            if targets is not None:
                targets = targets(planned)
                required = list(targets)
            else:
                targets = dict(module.named_parameters())
                targets.update(dict(module.named_buffers()))
                required = [n for n, _ in module.named_parameters()]
            missing = [p.name for p in planned if p.name not in targets]
            if missing:
                raise UserError(f"the module has no parameter {missing[0]!r} that the recipe produces")
            produced = {p.name for p in planned}
            stale = [n for n in required if n not in produced]
            if stale:  # e.g. a module deeper than a data-flow path: its extra layers would keep old weights
                raise UserError(f"the recipe does not produce the module's parameter {stale[0]!r} (check the model's depth)")
            for p in planned:
                if tuple(targets[p.name].shape) != self._shape(p):
                    raise UserError(f"parameter {p.name}: the module's shape {list(targets[p.name].shape)} differs from the merged {list(self._shape(p))}")

            def one(p: Planned) -> None:
                dest = targets[p.name]
                low = self._low(merge, p)
                buffer = self._buffer(method, low) if low else self.dtype
                kernel_dtype = dest.dtype == buffer or (not low and method.any_out_dtype and dest.dtype in (torch.float32, torch.bfloat16))
                direct = kernel_dtype and dest.device == self.device and dest.is_contiguous() and low in (None, buffer)
                out = dest.data if direct else torch.empty(self._shape(p), device=self.device, dtype=buffer)
                self._merge(merge, p, out)
                if not direct:
                    dest.data.copy_(out if low in (None, out.dtype) else out.to(low))

            with torch.no_grad():
                for _ in self._map(one, sorted(planned, key=lambda p: -_numel(self._shape(p)))):
                    pass

    def plan(self, recipe: Recipe) -> tuple[list[Planned], int]:
        """The recipe's plan (output tensors and their inputs) and its number of output layers."""
        with self._nested(recipe, shallow=True) as flat:
            _, planned, layers, _ = self._prepare(flat)
        return planned, layers

    @contextmanager
    def _nested(self, recipe: Recipe, shallow: bool = False) -> Iterator[Recipe]:
        """The recipe with each nested recipe merged into a transient source named as its entry
        (`shallow`: named only, for planning). The transient sources live for the enclosed merge.
        Every merge and plan starts here, so the recipe's parameters (nested ones too) are checked here."""
        check_parameters(recipe)
        nested = [r for r in recipe.models if isinstance(r.model, Recipe)]
        if not nested and not isinstance(recipe.base_model, Recipe):
            yield recipe
            return
        flat = copy.copy(recipe)
        flat.models = [copy.copy(r) for r in recipe.models]
        added = []
        try:
            for ref in flat.models:
                if isinstance(ref.model, Recipe):
                    name = entry_name(ref)
                    self._transient[name] = None if shallow else self.materialize(ref.model)
                    ref.model, ref.name = name, None
                    added.append(name)
            if isinstance(flat.base_model, Recipe):
                self._transient["<nested base>"] = None if shallow else self.materialize(flat.base_model)
                flat.base_model = "<nested base>"
                added.append("<nested base>")
            yield flat
        finally:
            for name in added:
                self._transient.pop(name, None)

    # --- internals --------------------------------------------------------------------------------

    def _prepare(self, recipe: Recipe) -> tuple[Method, list[Planned], int, int]:
        """The method, the plan, the number of output layers and the seed (0 when the recipe has none)."""
        if recipe.tokenizer_source not in (None, self.tokenizer_source):
            raise UserError(f"the recipe's tokenizer_source {recipe.tokenizer_source!r} is not the one the sources were "
                            f"opened with ({self.tokenizer_source!r})")
        self._align(tuple(n for n in recipe.source_names() if n in self.sources),
                    recipe.base_model if isinstance(recipe.base_model, str) else None)
        method = registry.get(recipe.merge_method)
        planned, layers = plan(recipe, self.names, config=self.sources[self.reference].config, strict=self.strict)
        self._validate(method, recipe, planned)
        return method, planned, layers, 0 if recipe.seed is None else recipe.seed

    def _align(self, models: tuple[str, ...], base: str | None) -> None:
        """The sources' embeddings and heads read with the filler rows of a merge of `models` with base model
        `base` (mergekit's depend on both)."""
        if self._vocabulary is None or not models or self._aligned_for == (models, base):
            return
        if (models, base) not in self._aligned:
            self._aligned[models, base] = self._vocabulary.rows(self.sources, models, base)
        for (source, tensor), rows in self._aligned[models, base].items():
            self.sources[source].realign(tensor, rows)
        self._aligned_for = (models, base)

    def _validate(self, method: Method, recipe: Recipe, planned: list[Planned]) -> None:
        first = planned[0] if planned else None
        if first is None:
            raise UserError("the recipe produces no tensors")
        for inp in first.inputs:
            if inp.model not in self.sources and inp.model not in self._transient:
                raise UserError(f"model {inp.model!r} is not a source (sources: {', '.join(self.sources)})")
        n = len(first.inputs)
        if method.needs_base and first.base is None:
            raise UserError(f"{method.name} needs a base_model among its inputs")
        if n < method.min_inputs or (method.max_inputs is not None and n > method.max_inputs):
            bound = f"{method.min_inputs}" + (f" to {method.max_inputs}" if method.max_inputs != method.min_inputs else "")
            if method.max_inputs is None:
                bound = f"at least {method.min_inputs}"
            raise UserError(f"{method.name} takes {bound} input models (base included), got {n}")
        for p in planned:
            for inp in p.inputs:
                if not self._has(inp.model, inp.tensor):
                    raise UserError(f"model {inp.model!r} has no tensor {inp.tensor} (check the slices' layer_range)")
            self._model_params(method, p)  # a parameter missing anywhere: said before any merge

    def _new_merge(self, method: Method, planned: list[Planned], seed: int, recipe: Recipe) -> _Merge:
        dtype = parse_dtype(recipe.dtype)
        merge = _Merge(method, planned, seed, dtype, self.compute == "mergekit" or dtype not in (None, torch.float32))
        merge.whole = self._whole(merge)
        return merge

    def _low(self, merge: _Merge, p: Planned) -> torch.dtype | None:
        """The dtype tensor p is merged in as mergekit merges it: the recipe's, else its inputs' stored dtypes
        promoted; None for the fast float32 path."""
        if not merge.mergekit:
            return None
        if merge.dtype is not None:
            return merge.dtype
        dtypes = [self._stored_dtype(x.model, x.tensor) for x in p.inputs]
        promoted = dtypes[0]
        for d in dtypes[1:]:
            promoted = torch.promote_types(promoted, d)
        return promoted

    def _buffer(self, method: Method, low: torch.dtype) -> torch.dtype:
        """What a merge in compute dtype `low` writes: mergekit's ops write it, other methods float32 (rounded after)."""
        return low if method.as_mergekit else self.dtype

    def _stored_dtype(self, model: str, tensor: str) -> torch.dtype:
        if model in self._transient:
            return self._transient[model][tensor].dtype
        return DTYPES.get(self.sources[model].dtype_name(tensor), torch.float32)

    def _shape(self, p: Planned) -> tuple[int, ...]:
        return self.sources[self.reference].shape(p.inputs[0].tensor)

    def _merge(self, merge: _Merge, p: Planned, out: torch.Tensor, spans: tuple[tuple[int, int], ...] | None = None) -> None:
        method, low = merge.method, self._low(merge, p)
        entries = [Entry(inp.model, params, self._full_fn(inp.model, inp.tensor, low, method.as_mergekit), self._vector_fn(merge, p, i),
                         self.sources[inp.model].path if inp.model in self.sources else None)
                   for i, (inp, params) in enumerate(zip(p.inputs, self._model_params(method, p)))]
        shared = self._shared_params(method, p)
        base = entries[p.base] if p.base is not None else None
        stack = None
        if p.stack is not None:
            members = p.stack.members
            read = lambda j: [self._stored(x.model, x.tensor) for x in merge.by_name[members[j]].inputs]  # noqa: E731
            stack = Stack(p.stack.name, p.stack.parts, members.index(p.name), len(members), read, self.dtype, merge.shared)
        group = Group(p.name, entries, base, shared, merge.seed, out, self.tie_order, stack, low if method.as_mergekit else None, spans,
                      peers=self.peers, whole=merge.whole)
        method.fn(group)
        merged = sum(e - s for s, e in spans) if group.merged_spans else out.numel()
        self.merged_bytes.add(merged * sum(self._stored_dtype(x.model, x.tensor).itemsize for x in p.inputs))

    def _model_params(self, method: Method, p: Planned) -> list[dict]:
        return [{s.name: resolve(s, inp.scopes, inp.tensor, p.t, f"model {inp.model!r} at {inp.tensor}") for s in method.model_params(i == p.base)}
                for i, inp in enumerate(p.inputs)]

    def _shared_params(self, method: Method, p: Planned) -> dict:
        return {s.name: resolve(s, p.shared_scopes, p.name, p.t, f"the recipe at {p.name}") for s in method.shared_params()}

    def _whole(self, merge: _Merge) -> Whole:
        def planned(name: str) -> Planned:
            if name not in merge.by_name:
                raise UserError(f"{merge.method.name} merges whole models: the recipe produces no tensor {name}")
            return merge.by_name[name]

        def read(name: str) -> list[torch.Tensor]:
            q = planned(name)
            low = self._low(merge, q)
            return [self._full_fn(x.model, x.tensor, low, merge.method.as_mergekit)() for x in q.inputs]

        return Whole(tuple(merge.by_name), read, lambda n: self._model_params(merge.method, planned(n)),
                     lambda n: self._shared_params(merge.method, planned(n)), merge.shared)

    def _has(self, model: str, tensor: str) -> bool:
        if model in self._transient:  # a nested recipe: only planned, it produces the reference's tensors
            return self._transient[model] is None or tensor in self._transient[model]
        return tensor in self.sources[model]

    def _stored(self, model: str, tensor: str) -> torch.Tensor:
        """An input as stored (a view of the memory map: never modify it), on the merge device."""
        t = self._transient[model][tensor] if model in self._transient else self.sources[model].get(tensor)
        return t.to(self.device)

    def _full_fn(self, model: str, tensor: str, low: torch.dtype | None, as_mergekit: bool):
        """An input as loaded: in the compute dtype for mergekit's ops, else rounded to it and merged in float32."""
        if low is None or as_mergekit:
            return lambda: self._stored(model, tensor).to(low or self.dtype)
        return lambda: self._stored(model, tensor).to(low).to(self.dtype)

    def _vector_fn(self, merge: _Merge, p: Planned, i: int):
        """Input i's task vector; a stack member's trims read the whole stack (its `unit`), as mergekit's."""

        def one(q: Planned, cached: bool = True) -> TaskVector:
            inp, base = q.inputs[i], q.inputs[q.base]
            key = (inp.model, inp.tensor, base.model, base.tensor)
            v = TaskVector(self._stored(base.model, base.tensor), self._stored(inp.model, inp.tensor),
                           self._cache(key, inp.model, base.model) if cached else None)
            if cached:
                v.peers, v.key = self.peers, _vector_key(q, i)
            return v

        def vector() -> TaskVector:
            if p.base is None:
                raise UserError("this merge method needs a base_model")
            if p.stack is None:
                return one(p)
            planned = [merge.by_name[n] for n in p.stack.members]
            inp, base = p.inputs[i], p.inputs[p.base]
            key = ("stack", inp.model, base.model, *(q.inputs[i].tensor for q in planned))
            members = [one(q, cached=False) for q in planned]  # the stack's summary is kept, not theirs
            index = p.stack.members.index(p.name)
            members[index].unit = StackVector(p.stack.name, members, p.stack.parts, index, merge.shared, key,
                                              self._cache(key, inp.model, base.model))
            return members[index]

        return vector

    def _cache(self, key: tuple, model: str, base: str):
        """The summary lookup of a task vector (or stack) kept across candidates; None for a nested
        recipe's result, which changes with every candidate."""
        if model in self._transient or base in self._transient:
            return None

        def summary(vec: TaskVector) -> Summary:
            s = self._summaries.get(key)
            if s is None:
                s = self._summaries[key] = vec.summarize()
            return s

        return summary

    @property
    def summaries(self) -> Mapping[tuple, Summary]:
        """The trims' summaries, kept across candidates per task vector (or stack); their memory is their nbytes."""
        return MappingProxyType(self._summaries)

    def _map(self, fn, items: list) -> Iterator:
        """fn over items in order, on the merge threads, with at most `threads` results ahead of the caller."""
        if self.threads == 1 or len(items) < 2:
            yield from map(fn, items)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="evomerge-merge")
        if self.device.type == "cuda":
            fn = self._on_own_stream(fn)
        pending = [self._pool.submit(fn, x) for x in items[: self.threads]]
        for i in range(len(items)):
            result = pending[i].result()
            if i + self.threads < len(items):
                pending.append(self._pool.submit(fn, items[i + self.threads]))
            pending[i] = None
            yield result

    def _on_own_stream(self, fn):
        """fn on this thread's CUDA stream, finished before its result is handed on (the default stream, which
        scores, reads it next): threads' copies from host memory and merges then overlap, not queue."""

        def run(x):
            stream = getattr(self._streams, "stream", None)
            if stream is None:
                stream = self._streams.stream = torch.cuda.Stream(self.device)
            default = torch.cuda.default_stream(self.device)
            stream.wait_stream(default)  # after the scoring that may still read the weights this overwrites
            with torch.cuda.stream(stream):
                result = fn(x)
            stream.synchronize()
            if isinstance(result, torch.Tensor):
                result.record_stream(default)  # its memory is not reused on this stream while the default reads it
            return result

        return run


class _Merge:
    """One merge: its method, seed, plan by output name (a stack's members) and the statistics its tensors'
    merges share."""

    def __init__(self, method: Method, planned: list[Planned], seed: int, dtype: torch.dtype | None, mergekit: bool):
        self.method, self.seed = method, seed
        self.dtype, self.mergekit = dtype, mergekit  # the recipe's dtype; whether mergekit's ops merge it
        self.by_name = {p.name: p for p in planned}
        self.shared = Shared()
        self.whole: Whole | None = None


def _vector_key(p: Planned, i: int) -> str:
    """Task vector i of planned tensor p, named alike on every tensor-parallel rank."""
    inp, base = p.inputs[i], p.inputs[p.base]
    return f"{p.name}: {inp.model} {inp.tensor} - {base.model} {base.tensor}"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
