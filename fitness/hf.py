"""The HF transformers handle (the CPU default): one resident model per worker, whose parameters are
overwritten in place for each candidate; batched greedy generation with left padding and batched
teacher-forced scoring with right padding."""
from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from evomerge import arch
from evomerge.fitness.model_surgery import is_tied, layer_list, module_targets, untie_head
from evomerge.recipe import Recipe
from evomerge.records import UserError
from evomerge.fitness.handle import Completion, Prompt, Sampling, TokenScores, encode_prompt, truncate_at_stop


class LoadsInto(Protocol):
    def plan(self, recipe: Recipe) -> tuple[list[Any], int]: ...

    def load_into(self, recipe: Recipe, module: torch.nn.Module, *, targets: Mapping[str, torch.Tensor] | None = None) -> Any: ...


class HFHandle:
    """`model_dir` is the checkpoint the resident module is built from (the base: config, tokenizer,
    shapes). `materializer` (evomerge.merge.Materializer) writes each recipe's merged weights into it."""

    def __init__(
        self,
        model_dir: str | Path,
        materializer: LoadsInto | None = None,
        *,
        batch_size: int = 16,
        threads: int | None = None,
        dtype: str = "auto",
        device: str = "auto",
    ) -> None:
        """`device` (auto|cpu|cuda|cuda:N) and `dtype` (auto|float32|bfloat16|float16): see evomerge.machine;
        the materializer must write on the same device."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.machine import resolve_device, resolve_dtype

        if not Path(model_dir, "config.json").is_file():
            raise UserError(f"HF model: no config.json in {model_dir}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        on_gpu = {"device_map": str(self.device)} if self.device.type == "cuda" else {}  # straight to the GPU
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=resolve_dtype(dtype, self.device), **on_gpu).eval()
        _own_memory(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        merged = getattr(materializer, "tokenizer", None)  # sources aligned to another vocabulary (tokenizer_source)
        if merged is not None:
            self.model.resize_token_embeddings(len(merged.get_vocab()), mean_resizing=False)  # the merge fills the rows
            self.tokenizer = copy.deepcopy(merged)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.materializer = materializer
        self.batch_size = batch_size
        self.recipe: Recipe | None = None
        self.timings: dict[str, float] = {}

    # -- weights ---------------------------------------------------------------------------------------
    def set_recipe(self, recipe: Recipe) -> None:
        if self.materializer is None:
            raise UserError("this HF handle has no materializer; it cannot build a recipe")
        start = time.perf_counter()
        self.recipe = None  # a failed write leaves the weights matching no recipe
        resident = self._resident
        if recipe.path is not None:
            arch.check_reorderable(resident.layout.family, resident.base_config)

        def fit(planned) -> dict[str, torch.Tensor]:
            """The resident model fitted to the recipe's plan (its depth, its own head), and where each tensor goes."""
            self._fit_depth(resident.layout.source_layers(planned))
            names = [p.name for p in planned]
            if resident.layout.family.head in names and is_tied(self.model):  # an expert stores its own head
                untie_head(self.model)
            return module_targets(self.model, names, resident.layout.family)

        self.materializer.load_into(recipe, self.model, targets=fit)
        self.timings["swap"] = time.perf_counter() - start
        self.recipe = recipe

    @functools.cached_property
    def _resident(self) -> _Resident:
        layout = arch.layout_for(self.model.config)
        n = arch.depth(layout.family, self.model.config) or len(layer_list(self.model, layout.family))
        return _Resident(layout, self.model.config.to_dict(), list(range(n)))

    def _fit_depth(self, src: list[int]) -> None:
        """Output layer k of the recipe is base layer src[k] (data-flow paths and passthrough slices change
        the stack): set the config's depth and depth-indexed fields (`layer_types`, ...) and grow or shrink
        the resident layer list, so no candidate reloads the model. A layer is rebuilt where its per-layer
        settings change, from its class on the meta device with uninitialised storage (the merge writes
        every weight next); the others stay."""
        resident = self._resident
        if src == resident.current:
            return
        family, base = resident.layout.family, resident.base_config
        arch.apply_config(family, self.model.config, arch.resize_config(family, base, src))
        layers = layer_list(self.model, family)
        kind = lambda s: arch.resize_config(family, base, [s])  # noqa: E731 - a layer's own settings
        proto = next(layers[0].parameters())
        for k, s in enumerate(src):
            if k < len(layers) and k < len(resident.current) and kind(resident.current[k]) == kind(s):
                continue
            with torch.device("meta"):
                layer = type(layers[0])(arch.text_config(family, self.model.config), layer_idx=k)
            layer = layer.to(dtype=proto.dtype).to_empty(device=proto.device).train(self.model.training)
            if k < len(layers):
                layers[k] = layer
            else:
                layers.append(layer)
        del layers[len(src):]
        resident.current = list(src)

    @torch.no_grad()
    def load_state_dict(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Copy a full state dict into the resident parameters in place (no re-instantiation)."""
        own = self.model.state_dict()
        missing = [k for k in own if k not in weights and not _tied(self.model, k)]
        if missing:
            raise UserError(f"state dict lacks {len(missing)} tensors of the model, e.g. {missing[0]!r}")
        for name, t in weights.items():
            if name not in own:
                raise UserError(f"state dict has tensor {name!r} the model does not")
            if own[name].shape != t.shape:
                raise UserError(f"tensor {name!r}: shape {tuple(t.shape)} does not fit the model's {tuple(own[name].shape)}")
            own[name].copy_(t)
        self.recipe = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    # -- scoring ---------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], sampling: Sampling = Sampling()) -> list[str]:
        return [c.text for c in self.complete(prompts, sampling)]

    @torch.no_grad()
    def complete(self, prompts: Sequence[Prompt], sampling: Sampling = Sampling(), *,
                 step: Callable[[list[int], list[int]], None] | None = None) -> list[Completion]:
        """`generate`, with each answer's finish reason and token count (what `evomerge serve` reports).
        `step`, when given, is called after every decoding step with the batch's prompt indices and the token
        each just got (a finished row gets padding); what it raises stops generation and leaves here."""
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        if not all(ids):
            raise UserError("generation needs a non-empty prompt (this tokenizer adds no BOS)")
        sample: dict[str, Any] = {"do_sample": False}
        if sampling.temperature > 0:
            torch.manual_seed(0 if sampling.seed is None else sampling.seed)
            sample = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
        out: list[Completion] = [Completion("", "length", 0)] * len(ids)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        for batch in self._batches(ids):
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
                input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            gen = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=sampling.max_new_tokens,
                pad_token_id=pad, eos_token_id=eos, streamer=None if step is None else _Steps(batch, step), **sample,
            )
            for row, i in enumerate(batch):
                out[i] = self._completion(gen[row, width:].tolist(), sampling.stop)
        return out

    def _completion(self, tokens: list[int], stop: Sequence[str]) -> Completion:
        """A row of generated ids (padded after an early end) as text, finish reason and token count."""
        eos = self.tokenizer.eos_token_id
        ended = eos is not None and eos in tokens
        if ended:
            tokens = tokens[: tokens.index(eos) + 1]

        def stopped(n: int) -> bool:  # do the first n tokens hold a stop string?
            text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
            return len(truncate_at_stop(text, stop)) < len(text)

        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if stop and stopped(len(tokens)):  # count the tokens up to the one that completed the stop string
            lo, hi = 1, len(tokens)
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if stopped(mid) else (mid + 1, hi)
            return Completion(truncate_at_stop(text, stop), "stop", lo)
        return Completion(text, "stop" if ended else "length", len(tokens))

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[Prompt, str]], *, eos: bool = False) -> list[TokenScores]:
        seqs: list[list[int]] = []
        starts: list[int] = []
        for prompt, continuation in pairs:
            ctx = encode_prompt(self.tokenizer, prompt)
            if not ctx:
                raise UserError("teacher-forced scoring needs a non-empty prompt")
            cont = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
            if eos:
                cont.append(self.tokenizer.eos_token_id)
            seqs.append(ctx + cont)
            starts.append(len(ctx))
        out: list[TokenScores | None] = [None] * len(seqs)
        for batch in self._batches(seqs):
            width = max(len(seqs[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # right padding: positions are plain 0..n-1, the causal mask hides the pad
                input_ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, : len(seqs[i])] = 1
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            for row, i in enumerate(batch):
                pos = torch.arange(starts[i] - 1, len(seqs[i]) - 1, device=logits.device)  # rows predicting the continuation
                target = torch.tensor(seqs[i][starts[i]:], dtype=torch.long, device=logits.device)
                rows = logits[row, pos].float()
                logp = torch.log_softmax(rows, -1).gather(1, target[:, None])[:, 0]
                greedy = rows.argmax(-1) == target
                out[i] = TokenScores(logprobs=logp.tolist(), greedy=greedy.tolist())
            del logits, rows  # freed before the next batch's forward: one batch's logits live, not two
        return out  # type: ignore[return-value]

    def _batches(self, seqs: list[list[int]]) -> list[list[int]]:
        """Indices grouped into batches of similar length (less padding), covering every sequence once."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        return [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]


class _Steps:
    """transformers' streamer protocol (put, end) as a per-step call: `generate` puts the prompts (2-D) first,
    then each step's new tokens (1-D, one per row)."""

    def __init__(self, rows: list[int], step: Callable[[list[int], list[int]], None]) -> None:
        self.rows, self.step = rows, step

    def put(self, tokens: torch.Tensor) -> None:
        if tokens.dim() == 1:
            self.step(self.rows, tokens.tolist())

    def end(self) -> None:
        pass


@dataclass
class _Resident:
    """The resident model's architecture, its base config and which base layer each resident layer runs."""

    layout: arch.Layout
    base_config: dict[str, Any]
    current: list[int]


def _own_memory(model: torch.nn.Module) -> None:
    """transformers 5 hands back CPU tensors that are views of the checkpoint's copy-on-write memory map
    when their dtype needs no conversion. Every candidate is written into them in place: on mapped pages
    each first write faults and copies a page, and the model counts as file-backed memory until then.
    Such tensors get their own anonymous memory here, once (tied tensors stay one tensor)."""
    mapped = _file_mappings()
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and (mapped is None or _inside(t.data_ptr(), mapped)):
            t.data = t.data.clone()


def _file_mappings() -> list[tuple[int, int]] | None:
    """Sorted address ranges of this process that map a file (Linux); None where that cannot be read."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    out = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            lo, hi = fields[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return sorted(out)


def _inside(ptr: int, ranges: list[tuple[int, int]]) -> bool:
    import bisect

    i = bisect.bisect_right(ranges, (ptr, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= ptr < ranges[i][1]


def _tied(model: torch.nn.Module, name: str) -> bool:
    """A tied output embedding is the input embedding's tensor: a state dict may omit it."""
    return bool(getattr(model.config, "tie_word_embeddings", False)) and name == "lm_head.weight"
