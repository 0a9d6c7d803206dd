"""Calibration statistics for the data-aware merges (fisher, regmean), computed once per (source, calibration set).

A calibration set is a JSONL file, one {"text": ...} a line. For a source checkpoint it yields, over those
examples, each parameter's diagonal Fisher (the squared gradient of the example's LM loss, averaged over the
examples) and, for every nn.Linear, the Gram matrix of its inputs X^T X / tokens (RegMean's, averaged over
tokens as fusion-bench 0.2.33 does). They are written as one safetensors file under
EVOMERGE_CACHE/calibration, named by the source's identity (the sha256 of its files, evomerge.merge.identity)
and the calibration file's sha256, so another checkpoint at the same path or an edited set is computed anew;
merges read it memory-mapped, one tensor at a time.

Cost (float32): Fisher is 4 bytes per parameter per model (7B: 28 GB, 70B: 280 GB per model). A Gram matrix
is in^2 floats per linear layer; Llama-2-7B's 32 layers (hidden 4096, MLP 11008; q,k,v,gate,up read the
hidden state, o the hidden, down the MLP's) hold 32 x (6 x 4096^2 + 11008^2) = 7.1e9 floats, 28 GB per
model; Llama-2-70B's 80 layers (hidden 8192, MLP 28672) 80 x (6 x 8192^2 + 28672^2) = 9.8e10, 393 GB, plus
the head's hidden^2. Computing them holds the model, its gradients and both accumulators (the model x 3 plus
the Grams) in memory at once.

RegMean++'s Gram matrices depend on the merge itself (each layer's inputs come from the merged layers before it),
so they are computed with each merge, a layer at a time, and never written (regmean_plus).
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.machine import cache_dir, write_whole
from evomerge.merge.identity import fingerprint
from evomerge.records import UserError

FISHER, GRAM = "fisher:", "gram:"  # key prefixes: fisher:<parameter>, gram:<linear module>
_COMPUTING = threading.Lock()  # a merge's threads ask at once: one computes, the rest then read its file


def read_examples(path: str | Path) -> list[str]:
    """The calibration texts of a JSONL file, or one line naming the file and the line at fault."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"calibration set {p}: no such file")
    texts = []
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"calibration set {p} line {n}: not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
            raise UserError(f"calibration set {p} line {n}: expected {{\"text\": \"...\"}}, a non-empty string")
        texts.append(row["text"])
    if not texts:
        raise UserError(f"calibration set {p}: no examples")
    return texts


def statistics_path(source: str | Path, calibration: str | Path) -> Path:
    ident = hashlib.sha256(json.dumps(fingerprint(source), sort_keys=True).encode()).hexdigest()[:24]
    calib = hashlib.sha256(Path(calibration).read_bytes()).hexdigest()[:24]
    return cache_dir("calibration", f"{ident}-{calib}.safetensors")


def _load(source: str | Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(source)


def _token_ids(tok, texts: list[str]) -> list[torch.Tensor]:
    ids = [tok(t, return_tensors="pt").input_ids for t in texts]
    short = next((t for t, i in zip(texts, ids) if i.shape[1] < 2), None)
    if short is not None:
        raise UserError(f"calibration example {short[:40]!r} is under 2 tokens: it has no LM loss")
    return ids


class _Grams:
    """X^T X / tokens of the inputs of the given linear modules, accumulated over forward passes."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None  # the last input and its X^T X
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def record(_module, inputs, _output):
            if self.last is None or self.last[0] is not inputs[0]:  # q, k, v (gate, up) read one tensor: one product
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                self.last = (inputs[0], x.T @ x)
            n = inputs[0].numel() // inputs[0].shape[-1]
            self.sums[name] = self.sums[name] + self.last[1] if name in self.sums else self.last[1]
            self.tokens[name] = self.tokens.get(name, 0) + n
        return record

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        self.last = None
        return {n: g / self.tokens[n] for n, g in self.sums.items()}


def _linears(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.nn.Module]:
    return {prefix + n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def compute(source: str | Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """Fisher and Gram statistics of the checkpoint at `source` over `texts`, in float32."""
    model, tok = _load(source)
    grams = _Grams(_linears(model))
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    try:  # gradients on even where the merge runs under no_grad (a run's worker loads a recipe's weights so)
        for ids in _token_ids(tok, texts):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                model(input_ids=ids, labels=ids).loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n].addcmul_(p.grad, p.grad)
    finally:
        out = {GRAM + n: g for n, g in grams.close().items()}
    out.update({FISHER + n: f / len(texts) for n, f in fisher.items()})
    return out


def regmean_solve(grams: list[torch.Tensor], tensors: list[torch.Tensor], alpha: float, weights: list[float]) -> torch.Tensor:
    """RegMean's merged linear weight (out x in): (sum_i w_i G_i')^-1 sum_i w_i G_i' W_i^T transposed back, G_i' the
    Gram matrix with its off-diagonal entries scaled by alpha; solved in float64 (a Gram sum's condition number
    reaches 1e5 on few tokens)."""
    scaled = [(x.double() * alpha + torch.diag(torch.diagonal(x.double())) * (1 - alpha)) * w for x, w in zip(grams, weights)]
    rhs = sum(x @ t.double().T for x, t in zip(scaled, tensors))
    return torch.linalg.solve(sum(scaled), rhs).T


class _Stop(Exception):
    pass


def _layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    n = model.config.num_hidden_layers
    found = next(((name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n), None)
    if found is None:
        raise UserError(f"regmean_plus: no list of {n} decoder layers in {type(model).__name__}")
    return found


def regmean_plus(source: str | Path, texts: list[str], count: int, read: Callable[[str], list[torch.Tensor]],
                 weights: Callable[[str], list[float]], alphas: Callable[[str], float],
                 grams: dict[tuple[int, str], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """RegMean++ (Nguyen et al. 2025), every tensor of a merge of `count` models at once: layer l's Gram matrices
    for model i are taken with layer l's inputs from the merged model's own layers < l (merged by RegMean as they
    go) and the inside of layer l from model i's own layer l, as fusion-bench 0.2.33's RegMeanAlgorithmPlusPlus;
    every tensor outside the decoder layers is the models' weighted mean, but a linear head, solved on the merged
    stack's final hidden states. `read(name)` is tensor `name`'s inputs as stored, `weights(name)` and
    `alphas(name)` its parameters: a weight scales model i's term of the least-squares objective, so each candidate
    of a search merges anew (its Grams depend on its own earlier layers). The examples' hidden states are carried
    from layer to layer, as fusion-bench carries them: one pass of one layer per model per layer, a layer's Grams at
    a time. Holds the merged model in float32 (4 bytes per parameter: 28 GB at 7B, 280 GB at 70B) and the examples'
    hidden states; `grams` (when given) receives every Gram matrix, keyed (model, linear module)."""
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = _token_ids(transformers.AutoTokenizer.from_pretrained(source), texts)
    prefix, layers = _layers(merged)

    def solve(name: str, found: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        module, tensors, w = name.removesuffix(".weight"), read(name), weights(name)
        if not any(w):
            raise UserError(f"{name}: regmean_plus needs a weight above 0 for at least one model")
        if name.endswith(".weight") and module in found[0]:
            if grams is not None:
                grams.update({(i, module): g[module] for i, g in enumerate(found)})
            return regmean_solve([g[module] for g in found], tensors, alphas(name), w)
        return sum(x * t.float() for x, t in zip(w, tensors)) / sum(w)

    outside = {n: p for n, p in merged.named_parameters() if not n.startswith(prefix + ".")}
    with torch.no_grad():
        for name, p in outside.items():
            p.copy_(solve(name, [{}]))
    calls = []  # each example's call of layer 0 (hidden states, then the layer's other arguments)

    def first(_module, args, kwargs):
        calls.append((args, kwargs))
        raise _Stop()

    handle = layers[0].register_forward_pre_hook(first, with_kwargs=True)
    with torch.no_grad():
        for x in ids:
            try:
                merged(input_ids=x, use_cache=False)  # a cache in the captured arguments would grow with every call
            except _Stop:
                pass
    handle.remove()

    def forward(layer: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        h = layer(*args, **kwargs)
        return h[0] if isinstance(h, tuple) else h

    with torch.no_grad():
        for l, layer in enumerate(layers):
            params = {f"{prefix}.{l}.{n}": p for n, p in layer.named_parameters()}
            found = []
            for i in range(count):
                for n, p in params.items():
                    p.copy_(read(n)[i])
                acc = _Grams(_linears(layer, f"{prefix}.{l}."))
                for args, kwargs in calls:
                    forward(layer, args, kwargs)
                found.append(acc.close())
            for n, p in params.items():
                p.copy_(solve(n, found))
            calls = [_with_hidden(args, kwargs, forward(layer, args, kwargs)) for args, kwargs in calls]
        # a head of its own (not tied to the embedding) is solved; its inputs are the same for every model
        heads = {n: m for n, m in _linears(merged).items() if m.weight is outside.get(n + ".weight")}
        if heads:
            acc = _Grams(heads)
            for x in ids:
                merged(input_ids=x)
            head = acc.close()
            for n, m in heads.items():
                m.weight.copy_(solve(n + ".weight", [head] * count))
    return dict(merged.named_parameters())


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    """A layer call's arguments with its hidden states replaced by `h` (the previous layer's output)."""
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _write(path: Path, stats: dict[str, torch.Tensor], **metadata: str) -> None:
    write_whole(path, lambda scratch: save_file({k: v.contiguous() for k, v in stats.items()}, str(scratch), metadata=metadata))


@lru_cache(maxsize=64)
def statistics(source: str, calibration: str):
    """The statistics file of (source, calibration), computed and written on first use; an open safe_open handle
    (one per process: every tensor of a merge reads it)."""
    texts = read_examples(calibration)
    path = statistics_path(source, calibration)
    with _COMPUTING:
        if not path.is_file():
            _write(path, compute(source, texts), source=str(source))
    return safe_open(str(path), framework="pt")
