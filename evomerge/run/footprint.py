"""A run's memory plan, from the checkpoints' headers alone (the weights are never read): what each worker
holds on the host and on its device, per worker and per node, compared with what this machine has.

- sources: every checkpoint stays memory-mapped in its stored dtype: file-backed pages shared through the
  page cache by every process on a node, so a node holds them once; each process's RSS counts the pages it
  touched, which over a search is all of them.
- scoring model: its parameters x the dtype's bytes, private to the worker (on its GPU when it scores there).
- merge buffers: the materializer's own memory (experts, largest tensor, threads, method family).
- activations: the largest scoring batch, from the tasks tokenized as the handle batches them.
- runtime: python, torch, transformers (measured here: private heap + shared libraries).
A worker's predicted peak RSS = its private bytes + the shared bytes it touches. A run whose private memory
does not fit this machine is refused in one line naming what to change; sources that do not fit the page
cache are only slow (re-read from disk), so they are reported, not refused.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge import machine
from evomerge.machine import host_available
from evomerge.records import UserError

MIB, GIB = 1 << 20, 1 << 30
# Measured with torch 2.13 (CPU) and transformers 5: an `evomerge run` on a tiny model peaks at
# 0.36 GiB anonymous + 0.24 GiB of shared libraries; a local Ray's driver and daemons take ~0.9 GiB more.
RUNTIME_PRIVATE, RUNTIME_SHARED, RAY_NODE = 360 * MIB, 240 * MIB, 1 * GIB
# Estimates (no GPU was measured): a CUDA process's host libraries and context, and its device context.
CUDA_HOST, CUDA_CONTEXT = 1 * GIB, 512 * MIB
VLLM_ENGINE = 3 * GIB // 2  # estimate: the engine's own process
# The materializer's private memory (evomerge.merge), with K experts, one tensor in flight per thread (the
# largest first): per thread (K+3) blocks of 16 KiB; for trims a selection buffer of 8 bytes x 1% of the
# tensor and a summary of <= 0.3 MiB per (tensor, expert), kept; methods outside the task-arithmetic family
# (those whose kernels do not form deltas block by block) hold float32 copies of the tensor and its inputs.
BLOCK, SUMMARY = 16 << 10, int(0.3 * MIB)
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Checkpoint:
    """What a checkpoint's safetensors headers say."""

    bytes: int = 0
    sizes: list[int] = field(default_factory=list)  # elements per tensor
    dtypes: set[str] = field(default_factory=set)

    @property
    def params(self) -> int:
        return sum(self.sizes)

    def largest(self, n: int) -> int:
        """Elements of the n largest tensors together."""
        return sum(sorted(self.sizes, reverse=True)[:n])


def read_headers(name: str, path: str | Path) -> Checkpoint:
    """Sum the safetensors headers of source `name`'s checkpoint directory, the files the materializer opens."""
    from evomerge.merge.sources import read_header, weight_files

    p = Path(path)
    files = [f for f in weight_files(name, p) if f.suffix == ".safetensors"] if p.is_dir() else []
    if not files:
        raise UserError(f"model {name!r} (sources.{name}): no .safetensors weights in {p}")
    out = Checkpoint()
    for f in files:
        try:
            header = read_header(f)[0]
        except UserError as e:
            raise UserError(f"model {name!r} (sources.{name}): {e}") from None
        for t in header.values():
            out.sizes.append(math.prod(t["shape"]))
            out.bytes += t["data_offsets"][1] - t["data_offsets"][0]
            out.dtypes.add(t["dtype"])
    return out


@dataclass
class Part:
    """One thing a worker holds: host private (anonymous), host shared (file-backed, once per node), device."""

    name: str
    private: int = 0
    shared: int = 0
    device: int = 0
    note: str = ""


@dataclass
class Plan:
    parts: list[Part]  # per worker
    workers: int  # on one node
    here: bool  # the workers run on this machine: the plan is checked against it
    device: str  # where a worker scores
    dtype: str
    node_private: int = 0  # once per node (a local Ray's driver and daemons)
    workers_per_gpu: int = 1
    host_available: int | None = None
    device_free: int | None = None
    gpu_here: bool = False  # a refusal may suggest scoring there

    def total(self, kind: str) -> int:
        return sum(getattr(p, kind) for p in self.parts)

    def part(self, name: str) -> Part:
        return next((p for p in self.parts if p.name == name), Part(name))

    @property
    def peak_rss(self) -> int:
        return self.total("private") + self.total("shared")

    @property
    def loads(self) -> bool:
        """Whether a worker loads models at all (a plan worth showing at the start of a run)."""
        return any(p.name == "sources" for p in self.parts)

    def host_need(self, workers: int | None = None, private: int | None = None) -> int:
        """Private host memory a node needs: what no eviction can give back."""
        n = self.workers if workers is None else workers
        p = self.total("private") if private is None else private
        return n * p + self.node_private

    # -- text ------------------------------------------------------------------------------------------
    def summary(self) -> str:
        """Two lines for the start of a run."""
        dev = f"; device {_gib(self.total('device'))}" if self.total("device") else ""
        first = (f"evomerge: plan per worker (scoring on {self.device}, {self.dtype}): private {_gib(self.total('private'))}"
                 f" + shared {_gib(self.total('shared'))} (sources, libraries: once per node) = peak RSS "
                 f"{_gib(self.peak_rss)}{dev}")
        return first + "\n" + self._node_line()

    def describe(self) -> str:
        """The whole plan, for --dry-run."""
        rows = [f"{'':16}{'host private':>14}{'host shared':>14}{'device':>12}"]
        for p in self.parts:
            rows.append(f"{p.name:16}{_cell(p.private):>14}{_cell(p.shared):>14}{_cell(p.device):>12}   {p.note}")
        rows.append(f"{'per worker':16}{_cell(self.total('private')):>14}{_cell(self.total('shared')):>14}"
                    f"{_cell(self.total('device')):>12}   predicted peak RSS {_gib(self.peak_rss)}")
        head = (f"evomerge plan: scoring on {self.device} in {self.dtype}; {self.workers} "
                f"worker{'s' * (self.workers > 1)} per node")
        return "\n".join([head, *rows, self._node_line()])

    def _node_line(self) -> str:
        n = self.workers
        line = (f"this node: {n} worker{'s need' if n > 1 else ' needs'} {_gib(self.host_need())} private"
                f" + {_gib(self.total('shared'))} shared")
        if not self.here:
            return line + " (the workers run on the Ray cluster: not compared with this machine)"
        if self.host_available is not None:
            line += f"; {_gib(self.host_available)} available"
            if self.host_need() <= self.host_available < self.host_need() + self.total("shared"):
                line += " (the sources do not all fit the page cache: candidates will re-read them from disk)"
        if self.total("device") and self.device_free is not None:
            line += (f"; {self.device}: {self.workers_per_gpu} x {_gib(self.total('device'))} of "
                     f"{_gib(self.device_free)} free")
        return line

    # -- the check -------------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse, in one line naming what to change, a run whose private memory does not fit this machine."""
        if not self.here:
            return
        need, avail = self.host_need(), self.host_available
        if avail is not None and need > avail:
            raise UserError(f"will not fit: {self.workers} worker{'s need' if self.workers > 1 else ' needs'} {_gib(need)} of "
                            f"private host memory on this node ({self._breakdown('private')}) but {_gib(avail)} is "
                            f"available; {self._host_fix(avail)}")
        dev = self.workers_per_gpu * self.total("device")
        if self.device_free is not None and dev > self.device_free:
            share = (f"{self.workers_per_gpu} workers x " if self.workers_per_gpu > 1 else "")
            fixes = ["set executor.gpus_per_worker: 1 (one worker per GPU)"] if self.workers_per_gpu > 1 else []
            if self.dtype == "float32":
                fixes.append("set fitness.handle.dtype: bfloat16")
            fixes.append("set fitness.handle.device: cpu")
            raise UserError(f"will not fit: {self.device} needs {share}{_gib(self.total('device'))} "
                            f"({self._breakdown('device')}) but {_gib(self.device_free)} is free; "
                            + " or ".join(fixes))

    def _breakdown(self, kind: str) -> str:
        return ", ".join(f"{p.name} {_gib(getattr(p, kind))}" for p in self.parts if getattr(p, kind)) + " per worker"

    def _host_fix(self, avail: int) -> str:
        """What would make the host part fit, as settings to change."""
        fixes = []
        per = self.total("private")
        if self.workers > 1 and (avail - self.host_need(0)) // per >= 1:
            fixes.append(f"set executor.workers: {(avail - self.host_need(0)) // per} (workers per node)")
        model = self.part("scoring model").private
        if self.dtype == "float32" and model and self.host_need(private=per - model // 2) <= avail:
            fixes.append(f"set fitness.handle.dtype: bfloat16 (scoring model {_gib(model)} -> {_gib(model // 2)})")
        if self.gpu_here and self.device == "cpu":
            fixes.append("set fitness.handle.device: cuda (the scoring model on the GPU)")
        if self.part("activations").private > per // 4:
            fixes.append("lower fitness.handle.batch_size")
        return " or ".join(fixes) or "use a machine with more memory (or fewer workers per node)"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def _cell(n: int) -> str:
    return _gib(n) if n else "-"


# -- building the plan -----------------------------------------------------------------------------------
def plan_run(cfg: Any, space: Any, fitness: Any, *, address: str | None = None) -> Plan:
    """The plan of run config `cfg` (a RunConfig) with its built search space and fitness."""
    import torch

    ex, handle, backend = cfg.executor, cfg.fitness.handle, cfg.fitness.backend
    on_ray = ex.kind == "ray" or address is not None
    here = not on_ray or (address or ex.address) is None  # else the workers run on a Ray cluster's nodes
    gpus_here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if on_ray and here and ex.gpus_per_worker > 0 and ex.workers * ex.gpus_per_worker > gpus_here:
        raise UserError(f"will not fit: executor.workers {ex.workers} x gpus_per_worker {ex.gpus_per_worker:g} need "
                        f"{math.ceil(ex.workers * ex.gpus_per_worker)} GPU(s) but this machine has {gpus_here} (Ray "
                        "would wait for them forever); lower executor.workers or executor.gpus_per_worker")
    spec = handle.get("device", "auto")
    if not on_ray and spec != "auto":
        machine.resolve_device(spec)  # a GPU asked for where there is none: its one-line error now, not in the worker
    # a Ray actor sees only the GPUs it reserves; the local worker sees this machine's
    has_gpu = ex.gpus_per_worker > 0 if on_ray else gpus_here > 0
    device = "cpu" if backend == "api" else ("cuda:0" if has_gpu else "cpu") if spec == "auto" else spec
    gpu = device.startswith("cuda")
    plan = Plan([], workers=ex.workers if on_ray else 1, here=here, device=device, dtype="-",
                node_private=RAY_NODE if on_ray and here else 0, gpu_here=gpus_here > 0)
    if on_ray and 0 < ex.gpus_per_worker < 1:
        plan.workers_per_gpu = int(1 / ex.gpus_per_worker)
    if here:
        plan.host_available = host_available()
        if gpu and gpus_here:
            plan.device_free = torch.cuda.mem_get_info(min(machine.gpu_index(device) or 0, gpus_here - 1))[0]

    def held(name: str, size: int, note: str) -> Part:  # on the worker's GPU when it scores there
        return Part(name, device=size, note=note) if gpu else Part(name, private=size, note=note)

    runtime = Part("runtime", RUNTIME_PRIVATE, RUNTIME_SHARED, note="python, torch, transformers (measured)")
    if gpu:
        runtime = Part("runtime", RUNTIME_PRIVATE + CUDA_HOST, RUNTIME_SHARED, CUDA_CONTEXT,
                       "python, torch, transformers (measured) + CUDA (estimate)")
    if not cfg.sources or backend == "api":
        plan.parts = [runtime]
        return plan
    heads = {name: read_headers(name, p) for name, p in cfg.sources.items()}
    base, conf = heads[cfg.base], _model_config(cfg.sources[cfg.base])
    kinds = "/".join(sorted({d.lower() for h in heads.values() for d in h.dtypes}))
    plan.parts.append(Part("sources", shared=sum(h.bytes for h in heads.values()),
                           note=f"{len(heads)} checkpoints ({kinds}) memory-mapped: shared by a node's workers, counted once"))
    if backend == "vllm":
        plan.parts.append(_vllm_engine(plan, base, handle, gpu))
    else:
        plan.dtype = machine.dtype_name(handle.get("dtype"), gpu)
        nbytes = _TORCH_BYTES[plan.dtype]
        plan.parts.append(held("scoring model", base.params * nbytes, f"{base.params:,} params x {nbytes} bytes"))
    threads = max(1, int(ex.cpus_per_worker)) if on_ray else None  # Ray gives its actors OMP_NUM_THREADS
    plan.parts.append(_merge_buffers(space, len(cfg.sources) - 1, base, heads, gpu, threads=threads))
    if backend == "hf":
        act, note = activations(cfg, fitness, conf, _TORCH_BYTES[plan.dtype])
        if act:
            plan.parts.append(held("activations", act, note))
    plan.parts.append(runtime)
    return plan


def _model_config(path: str | Path) -> dict[str, Any]:
    conf = json.loads((Path(path) / "config.json").read_text())
    return conf.get("text_config", conf)  # multimodal checkpoints nest the language model's


# float32 copies of the largest tensor a method holds at once beyond its stored inputs, for k experts: the rest
# hold k + 2. Measured with 2 experts on a 16M-entry tensor (ru_maxrss: tsv_m 58 B and pcb 41 B per entry beyond
# the inputs), their growth in k from the operations: tsv_m's SVDs of the concatenated bases, pcb's per-task scores.
_FLOAT32_COPIES = {"tsv_m": lambda k: 4 * k + 8, "pcb": lambda k: 6 * k}


def _merge_buffers(space: Any, experts: int, base: Checkpoint, heads: dict[str, Checkpoint], gpu: bool, *,
                   threads: int | None) -> Part:
    """The materializer's own memory for the space's merge method (the recipe of its starting point)."""
    from evomerge.merge import methods
    from evomerge.merge.materializer import default_threads

    name = _method(space)
    blockwise = name in methods.names() and methods.get(name).any_out_dtype
    threads = threads or default_threads()
    k, flight = max(experts, 1), base.largest(threads)  # the tensors merged at once, one per thread
    if blockwise:
        size = threads * (k + 3) * BLOCK + k * (8 * math.ceil(flight / 100) + len(base.sizes) * SUMMARY)
        note = f"{name}: {k} expert(s), {threads} thread(s): blocks, selection buffers, trim summaries"
    else:
        copies = _FLOAT32_COPIES.get(name, lambda k: k + 2)(k)
        size = copies * flight * 4
        note = f"{name or 'method unknown, counted as linear'}: {copies} float32 copies of the tensor, {threads} thread(s)"
    if gpu:  # each input crosses to the device as its tensor is merged
        stored = max(_DTYPE_BYTES.get(d, 4) for h in heads.values() for d in h.dtypes)
        return Part("merge buffers", device=size + (k + 1) * flight * stored, note=note + " + inputs on the device")
    return Part("merge buffers", private=size, note=note)


def _method(space: Any) -> str | None:
    decode = getattr(space, "decode", None)
    if decode is None:
        return None
    try:
        return decode(space.initial()).merge_method
    except Exception:  # noqa: BLE001 - a space that cannot decode its start fails the run elsewhere, clearly
        return None


def activations(cfg: Any, fitness: Any, conf: dict[str, Any], nbytes: int) -> tuple[int, str]:
    """Transient memory of the largest batch the HF handle scores: the tasks tokenized and batched as it
    batches them (batch_size sequences, the longest first). Logits dominate; hidden states, attention
    scores and the KV cache of generation are counted too. Only evomerge's own task suites are sized (an
    lm-eval fitness batches as lm-eval builds its requests: not estimated)."""
    from evomerge.fitness.suite import TaskFitness

    if not isinstance(fitness, TaskFitness) or not fitness.tasks:
        return 0, ""
    tasks = fitness.tasks
    from transformers import AutoTokenizer

    from evomerge.fitness.handle import encode_prompt

    tok = AutoTokenizer.from_pretrained(str(cfg.sources[cfg.base]))
    batch = cfg.fitness.handle.get("batch_size", 16)
    if type(batch) is not int or batch < 1:
        raise UserError(f"config: fitness.handle.batch_size must be a positive integer, got {batch!r}")

    def first(*keys: str, default: int = 0) -> int:  # families name these differently (GPT-2: n_embd, n_head...)
        return int(next((conf[k] for k in keys if conf.get(k)), default))

    v, h = first("vocab_size"), first("hidden_size", "n_embd")
    i = first("intermediate_size", "n_inner", default=4 * h)
    heads, layers = first("num_attention_heads", "n_head", default=1), first("num_hidden_layers", "n_layer")
    kv = first("num_key_value_heads", default=heads) * first("head_dim", default=h // max(heads, 1))

    def length(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    worst, what = 0, ""
    for task in tasks:
        kinds = {m.kind for m in task.metrics}
        prompts = [len(encode_prompt(tok, task.prompt(ex))) for ex in task.examples]
        pairs = list(zip(prompts, task.examples))
        runs = []  # (kind, sequences, longest)
        if "teacher" in kinds:
            runs.append(("score", len(pairs), max(p + length(ex.reference) + 1 for p, ex in pairs)))
        if "choice" in kinds:
            runs.append(("score", sum(len(ex.choices or []) for ex in task.examples),
                         max(p + max(map(length, ex.choices or [""])) for p, ex in pairs)))
        if "generation" in kinds:
            runs.append(("generate", len(pairs), max(prompts) + task.spec.max_new_tokens))
        for kind, n, t in runs:
            b = min(batch, n)
            work = b * t * (4 * h + 3 * i) * nbytes + b * heads * t * t * 4
            if kind == "score":  # every position's logits, and one row's log-softmax at a time
                cost = work + b * t * v * nbytes + 2 * t * v * 4
            else:  # the KV cache, and the logits of the last position
                cost = work + b * t * layers * 2 * kv * nbytes + b * v * 4
            if cost > worst:
                worst, what = cost, f"{kind} batch {b} x {t} tokens (task {task.name})"
    return worst, what


def _vllm_engine(plan: Plan, base: Checkpoint, handle: dict[str, Any], gpu: bool) -> Part:
    """A vLLM engine (estimate): the weights in the checkpoint's dtype and its KV cache, in its own process."""
    nbytes = max(_DTYPE_BYTES.get(d, 2) for d in base.dtypes) if handle.get("dtype", "auto") == "auto" \
        else _TORCH_BYTES[handle["dtype"]]
    model = base.params * nbytes
    plan.dtype = handle.get("dtype", "auto")
    if gpu:
        import torch

        total = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else 0
        reserve = max(model, int(float(handle.get("gpu_memory_utilization", 0.9)) * total))
        return Part("vLLM engine", private=VLLM_ENGINE, device=reserve,
                    note="weights + KV cache: gpu_memory_utilization of the GPU (estimate)")
    kv = int(float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * GIB)
    return Part("vLLM engine", private=VLLM_ENGINE + model + kv,
                note=f"weights {nbytes} bytes/param + KV cache {_gib(kv)} (estimate)")
