"""A model handle backed by one running vLLM engine, whose weights are replaced in place for each candidate.

The engine starts once (from the base checkpoint: config, tokenizer, shapes) and lives for the whole
search. For each candidate the materializer builds the merged state dict in this process and
`collective_rpc` hands it to `WeightPushExtension.evomerge_push_weights` inside every vLLM worker, which
reloads it through the worker's own weight-reload entry point: the model's `load_weights` wrapped so
that the post-load processing (the CPU build's GEMM weight prepacking, quantization) runs again.
Calling `load_weights` alone fails on the CPU build (the prepacked parameters have no loader left).
The prefix cache is then reset, since its KV blocks were computed with the previous weights.

vLLM is imported lazily: this module imports (and the extension class resolves) without it.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from evomerge.recipe import Recipe
from evomerge.records import UserError
from fitness.handle import Prompt, Sampling, TokenScores, encode_prompt, truncate_at_stop

# vLLM resolves this qualified name inside each worker process and mixes the class into its worker.
WORKER_EXTENSION = "fitness.vllm_handle.WeightPushExtension"


class WeightPushExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); its methods run in the worker via
    `LLM.collective_rpc`. Names carry an `evomerge_` prefix: vLLM refuses names the worker already has."""

    def evomerge_push_weights(self, blobs: list[bytes]) -> int:
        """Load checkpoint-format (HF-named) tensors, as safetensors blobs, into the running model;
        return the push count."""
        from safetensors.torch import load

        weights = (item for blob in blobs for item in load(blob).items())
        reload = getattr(self, "reload_weights", None)
        if reload is not None:
            reload(weights_iterator=weights, is_checkpoint_format=True)
        else:  # vLLM releases before in-place reload: weights are used as loaded (GPU, unquantized)
            self.get_model().load_weights(weights)
        self.evomerge_pushes = getattr(self, "evomerge_pushes", 0) + 1
        return self.evomerge_pushes

    def evomerge_identity(self) -> tuple[int, int]:
        """(worker process id, weight pushes so far): the same pid and a growing count prove no restart."""
        return os.getpid(), getattr(self, "evomerge_pushes", 0)


_CHUNK_BYTES = 1 << 30


def _safetensors_chunks(weights: Mapping[str, torch.Tensor]) -> list[bytes]:
    from safetensors.torch import save

    chunks: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in weights.items():
        t = t.detach().to("cpu").contiguous()
        if chunks[-1] and size + t.nbytes > _CHUNK_BYTES:
            chunks.append({})
            size = 0
        chunks[-1][name] = t
        size += t.nbytes
    return [save(c) for c in chunks]


def _checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors checkpoint, from its headers alone."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"vLLM base model: no .safetensors weights in {model_dir}")
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return shapes


class Materializes(Protocol):
    def materialize(self, recipe: Recipe) -> Mapping[str, torch.Tensor]: ...


class VLLMHandle:
    """One vLLM engine per worker process for a whole search; `set_recipe` swaps the weights in place.

    `model` is the base checkpoint directory the engine starts from; every candidate's merged weights
    must have its shapes. Extra keyword arguments go to `vllm.LLM` (e.g. `tensor_parallel_size`,
    `gpu_memory_utilization`). On a machine without CUDA, vLLM's CPU build is used in eager mode.
    """

    def __init__(
        self,
        model: str | Path,
        materializer: Materializes | None = None,
        *,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        **engine_kwargs: Any,
    ) -> None:
        if not Path(model, "config.json").is_file():
            raise UserError(f"vLLM base model: no config.json in {model}")
        shapes = _checkpoint_shapes(Path(model))
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default reserves far more
        try:
            from vllm import LLM
        except ImportError as e:
            raise UserError(f"the vLLM scorer needs vllm (GPU) or vllm-cpu (scripts/setup-vllm): {e}") from e
        self.model_dir = Path(model)
        self.shapes = shapes
        self.materializer = materializer
        self.recipe: Recipe | None = None
        self.timings: dict[str, float] = {}
        start = time.perf_counter()
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

    # -- weights ---------------------------------------------------------------------------------------
    def set_recipe(self, recipe: Recipe) -> None:
        """Materialize `recipe` and push the merged weights into the running engine."""
        if self.materializer is None:
            raise UserError("this vLLM handle has no materializer; it cannot build a recipe")
        start = time.perf_counter()
        weights = self.materializer.materialize(recipe)
        mid = time.perf_counter()
        self.load_state_dict(weights)
        self.timings["materialize"] = mid - start
        self.timings["push"] = time.perf_counter() - mid
        self.timings["swap"] = time.perf_counter() - start
        self.recipe = recipe

    def load_state_dict(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load a full HF-named state dict into every worker of the engine, then drop stale cached KV.
        Checked against the base checkpoint first, so a bad state dict never half-loads."""
        missing = [k for k in self.shapes if k not in weights]
        if missing:
            raise UserError(f"state dict lacks {len(missing)} tensors of the model, e.g. {missing[0]!r}")
        for name, t in weights.items():
            if name not in self.shapes:
                raise UserError(f"state dict has tensor {name!r} the model does not")
            if tuple(t.shape) != self.shapes[name]:
                raise UserError(f"tensor {name!r}: shape {tuple(t.shape)} does not fit the model's {self.shapes[name]}")
        # vLLM's RPC carries plain msgpack types (tensors only inside its own typed messages, anything
        # else only with pickle switched on), so the weights travel as safetensors bytes, in chunks
        # below msgpack's 4 GiB limit for one binary value.
        self.llm.collective_rpc("evomerge_push_weights", args=(_safetensors_chunks(weights),))
        self.llm.reset_prefix_cache()
        self.recipe = None

    def identity(self) -> list[tuple[int, int]]:
        """Per worker: (process id, weight pushes so far)."""
        return [tuple(x) for x in self.llm.collective_rpc("evomerge_identity")]

    def close(self) -> None:
        """Stop the engine's processes (they also stop when this handle is garbage-collected)."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

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
