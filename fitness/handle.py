"""The model handle: what a scorer talks to. A handle owns how a candidate's weights arrive.

Every back end (HF transformers in this process, a vLLM engine, an OpenAI-compatible API, a remote
`evomerge serve`) implements the same three calls, so a task suite runs unchanged on any of them:

- `set_recipe(recipe)`: make the handle answer as the model `recipe` builds (HF: the materializer
  writes into the resident module in place; vLLM: push the merged weights into the running engine;
  remote: send the recipe with every request).
- `generate(prompts, sampling=Sampling()) -> list[str]`: one completion per prompt, the stop string
  (if any) removed and everything after it; temperature 0 means greedy.
- `score(pairs, *, eos=False) -> list[TokenScores]`: teacher forcing. For each (prompt, continuation),
  the log-probability of every continuation token given everything before it, and whether that token
  was the argmax. With `eos`, the end-of-sequence token is scored after the continuation as one more
  token (so "all greedy" means greedy decoding reproduces the continuation exactly and then stops);
  a handle that cannot see EOS (an API) raises UserError.

A prompt is a plain string or a chat (a list of {"role", "content"} messages). Handles with a local
tokenizer turn both into token ids with `encode_prompt` below (a chat through the tokenizer's chat
template); an API handle sends a chat to the chat-completions endpoint. Continuations are tokenized
on their own, without special tokens, and appended to the prompt's ids, so the continuation's tokens
are known exactly even where a tokenizer would merge across the boundary.

Optional: `pop_cost() -> dict[str, float]`, usage since the last call (tokens, money, cache hits); a
handle without it costs nothing.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Union, runtime_checkable

from evomerge.recipe import Recipe
from evomerge.records import UserError

Message = dict[str, str]
Prompt = Union[str, list[Message]]


@dataclass(frozen=True)
class Sampling:
    """How `generate` decodes: temperature 0 is greedy (top_p and seed then unused); generation ends at
    `max_new_tokens` or the first of the `stop` strings; a seed makes sampling repeatable."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop or ()))  # a list from YAML or JSON; frozen stays hashable


@dataclass
class TokenScores:
    """Teacher-forced scores of one continuation: per token, log p and whether it was the argmax."""

    logprobs: list[float]
    greedy: list[bool]
    cost: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per token (nats)."""
        return -sum(self.logprobs) / max(1, len(self.logprobs))

    @property
    def token_accuracy(self) -> float:
        return sum(self.greedy) / max(1, len(self.greedy))

    @property
    def probability(self) -> float:
        """Geometric mean token probability: exp(-loss), in [0, 1], a smooth partial credit."""
        return math.exp(-self.loss)

    @property
    def exact(self) -> bool:
        return bool(self.greedy) and all(self.greedy)


@runtime_checkable
class ModelHandle(Protocol):
    def set_recipe(self, recipe: Recipe) -> None: ...

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling = Sampling()) -> list[str]: ...

    def score(self, pairs: Sequence[tuple[Prompt, str]], *, eos: bool = False) -> list[TokenScores]: ...


def is_chat(prompt: Prompt) -> bool:
    return not isinstance(prompt, str)


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: a string with the tokenizer's special tokens (BOS), a chat through its
    chat template (which writes its own special tokens). A missing chat template is a UserError."""
    if not is_chat(prompt):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise UserError(f"tokenizer of {name} has no chat template; use template: plain for this task")
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Completion:
    """One generated answer as a server reports it: the text (cut at a stop string), why generation ended
    ("stop": the end-of-sequence token or a stop string; "length": max_new_tokens) and how many tokens
    were generated up to there (the end-of-sequence token included)."""

    text: str
    finish_reason: str
    tokens: int


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Cut a completion at the earliest stop string, as OpenAI-compatible servers do."""
    cut = len(text)
    for s in stop or ():
        i = text.find(s)
        if s and 0 <= i < cut:
            cut = i
    return text[:cut]
