"""Tokenizers that differ: mergekit 0.1.5's `tokenizer_source: base | union | <model>`.

The output vocabulary is the tokenizer source's (`base`: the base model's; `union`: the base's plus every
token another model adds, built as mergekit builds it). Each source's vocabulary-indexed tensors (the
input embedding and the output head of the family) are read in the output vocabulary: output row i is the
source's row for the token with id i. A token the source lacks gets mergekit's row: the one model's that
has it when only one does, the base's when the base has it, else the mean of those that have it (zero when
none does). Rows past a model's vocabulary (padding up to its config's vocab_size or a multiple) are never
read. A source reads such a tensor as one row gather by an index fixed when the sources open, plus its few
filler rows (precomputed here from the other sources): every method merges aligned inputs and other
tensors cost nothing. Per candidate: one gather of each source's embedding and head, a transient copy of
it (7B, 32k x 4096 bf16: 0.26 GB, 0.24 s on one core here, about what its float32 conversion takes anyway;
70B, 128k x 8192: 2.1 GB, ~2 s), against the 14 / 140 GB each source's merge reads.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from evomerge import arch
from evomerge.merge.sources import Source
from evomerge.records import UserError


@dataclass(frozen=True)
class Rows:
    """One source tensor as read in the output vocabulary: row i is the stored row `index[i]`, except rows
    `filled`, which are `fillers`. In `dtype` (all sources' stored dtypes promoted, as mergekit reads them)."""

    index: torch.Tensor  # int64 (output vocabulary,)
    filled: torch.Tensor  # int64: the output rows this source lacks
    fillers: torch.Tensor  # (len(filled), *row shape)
    dtype: torch.dtype

    def apply(self, stored: torch.Tensor) -> torch.Tensor:
        out = stored.index_select(0, self.index.to(stored.device)).to(self.dtype)
        if len(self.filled):
            out[self.filled.to(out.device)] = self.fillers.to(out.device, self.dtype)
        return out


Aligned = dict[tuple[str, str], Rows]  # (source, tensor) -> its rows in the output vocabulary


@dataclass(frozen=True)
class Vocabulary:
    """The output vocabulary: its tokenizer (transformers), each source's row of every output token (-1: it
    lacks it) and the tensors indexed by token (the family's input embedding and head)."""

    tokenizer: Any
    ids: Mapping[str, torch.Tensor]
    tensors: tuple[str, ...]

    def rows(self, sources: Mapping[str, Source], models: tuple[str, ...], base: str | None) -> Aligned:
        """How `models` read each tensor in this vocabulary when they merge with base model `base` (None: the
        recipe has none). The filler rows, as mergekit's: a token only one of them has, its row; else the base's
        when it has it; else the mean of theirs; zero when none has it. Already aligned sources are not listed."""
        out: Aligned = {}
        for tensor in self.tensors:
            out.update(self._rows(sources, models, base, tensor))
        return out

    def _rows(self, sources: Mapping[str, Source], models: tuple[str, ...], base: str | None, tensor: str) -> Aligned:
        stored = {n: sources[n].stored(tensor) for n in models}
        for n in models:
            if stored[n].shape[1:] != stored[models[0]].shape[1:]:
                raise UserError(f"tensor {tensor} has shape {list(stored[models[0]].shape)} in {models[0]!r} "
                                f"but {list(stored[n].shape)} in {n!r}")
        dtype = stored[models[0]].dtype
        for t in stored.values():
            dtype = torch.promote_types(dtype, t.dtype)
        present = torch.stack([self.ids[n] >= 0 for n in models])  # (models, vocabulary)
        missing = (~present).any(0).nonzero().flatten()  # output rows some model lacks: they get filler rows
        have = present[:, missing]
        count = have.sum(0)

        def rows(n: str, where: torch.Tensor) -> torch.Tensor:
            return stored[n].index_select(0, self.ids[n][missing[where]]).to(dtype)

        fill = torch.zeros((len(missing), *stored[models[0]].shape[1:]), dtype=dtype)
        base_has = have[models.index(base)] & (count > 1) if base in models else torch.zeros_like(count, dtype=torch.bool)
        mean = (count > 1) & ~base_has
        total = fill[mean]
        for i, n in enumerate(models):
            only = have[i] & (count == 1)
            fill[only] = rows(n, only)
            total[have[i][mean]] = total[have[i][mean]] + rows(n, mean & have[i])
        if base in models:
            fill[base_has] = rows(base, base_has)
        fill[mean] = total / count[mean].to(dtype).view(-1, *[1] * (fill.dim() - 1))
        out: Aligned = {}
        for i, n in enumerate(models):
            lacks = ~have[i]
            index = self.ids[n].clamp(min=0)
            if len(index) == stored[n].shape[0] and not lacks.any() and bool((index == torch.arange(len(index))).all()):
                continue  # already in the output vocabulary
            out[n, tensor] = Rows(index, missing[lacks], fill[lacks].clone(), dtype)
        return out


def check_source(tokenizer_source: str | None, models: list[str] | Mapping[str, Any]) -> None:
    """`tokenizer_source` is base, union or one of `models`: else one line naming it."""
    if tokenizer_source not in (None, "base", "union") and tokenizer_source not in models:
        raise UserError(f"tokenizer_source {tokenizer_source!r} names no model of the merge "
                        f"(use base, union or one of {', '.join(models)})")


def vocabulary(sources: Mapping[str, Source], base: str, tokenizer_source: str) -> Vocabulary:
    """The output vocabulary of `tokenizer_source` over `sources` (`base`: the base model, else the first)."""
    check_source(tokenizer_source, sources)
    tokenizers = {name: _tokenizer(src) for name, src in sources.items()}
    if tokenizers[base] is None:
        raise UserError(f"tokenizer_source needs the base model's tokenizer; {base!r} has none")
    tokenizers = {n: t if t is not None else tokenizers[base] for n, t in tokenizers.items()}  # as mergekit assumes
    vocabs = {n: _vocabulary(sources[n], tokenizers[n]) for n in sources}
    if len(vocabs[base]) != len(tokenizers[base].get_vocab()):
        raise UserError(f"the tokenizer of {base!r} has tokens past its vocab_size; tokenizer_source cannot use it")
    if tokenizer_source == "union":
        out = _union(tokenizers, vocabs, base)
    else:
        out = tokenizers[base if tokenizer_source == "base" else tokenizer_source]
    vocab = out.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise UserError(f"the tokenizer of {tokenizer_source!r} does not number its tokens 0..{len(vocab) - 1}")
    tokens = sorted(vocab, key=vocab.get)
    ids = {n: torch.tensor([v.get(t, -1) for t in tokens], dtype=torch.long) for n, v in vocabs.items()}
    ref = sources[base]
    family = arch.lookup(ref.config, ref.names())
    return Vocabulary(out, ids, tuple(dict.fromkeys(t for t in (*family.pre[:1], family.head) if t in ref)))


def _tokenizer(src: Source) -> Any:
    """The source's tokenizer (transformers, fast), or None when its directory has none (a LoRA adapter)."""
    from transformers import AutoTokenizer

    if src.path is None or not any((src.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(src.path), use_fast=True)
    except Exception as e:  # noqa: BLE001 - any loader failure is the user's file
        raise UserError(f"model {src.name!r}: its tokenizer in {src.path} does not load ({str(e).splitlines()[0]})") from None


def _vocabulary(src: Source, tokenizer: Any) -> dict[str, int]:
    """token -> row of the source, the tokens numbered past its vocab_size left out (mergekit's rule)."""
    family = arch.lookup(src.config, src.names())
    size = arch.text_config(family, src.config).get("vocab_size")
    if size is None and family.pre and family.pre[0] in src:
        size = src.shape(family.pre[0])[0]
    vocab = tokenizer.get_vocab()
    return {t: i for t, i in vocab.items() if size is None or i < size}


def _union(tokenizers: Mapping[str, Any], vocabs: Mapping[str, dict[str, int]], base: str) -> Any:
    """mergekit's union tokenizer: the base's, plus each other model's tokens in model order (their
    special added tokens last, with their settings as the first model to add them had them)."""
    import tempfile

    from transformers import AutoTokenizer

    vocab: dict[str, None] = {}
    added: dict[str, Any] = {}
    for name in (base, *(n for n in tokenizers if n != base)):
        tok, own = tokenizers[name], vocabs[name]
        vocab.update(dict.fromkeys(sorted(own, key=own.get)))
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if info.content in own and own[info.content] == i:
                added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as d:  # a copy: the base's tokenizer object stays as it was
        tokenizers[base].save_pretrained(d)
        out = AutoTokenizer.from_pretrained(d, use_fast=True)
    known = out.get_vocab()
    for tok in vocab:
        if tok not in added and tok not in known:
            out.add_tokens(tok)
    for info in added.values():
        out.add_tokens(info)
    return out
