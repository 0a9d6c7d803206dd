"""lm-evaluation-harness's model interface (`lm_eval.api.model.LM`) over any evomerge model handle.

The handle already holds the candidate (HF: the resident module the materializer wrote in place; vLLM:
the running engine after the recipe push; an API: the recipe sent along), so lm-eval scores it without
loading anything. Requests go to the handle's two calls, `score` (teacher forcing) and `generate`, in
one batched call per request type (per distinct generation settings for `generate_until`); the handle
batches as it is configured to.

Where this differs from lm-eval's own HF model (documented, not hidden):
- A continuation is tokenized on its own and appended to the context's tokens (the handle contract),
  where `HFLM` tokenizes context + continuation together and splits; lm-eval's move of the context's
  trailing whitespace into the continuation is done here too, so for tokenizers that do not merge
  across that boundary (the zoo's, GPT-2-style BPE at a space) the tokens are the same.
- `loglikelihood_rolling` scores the whole text after the tokenizer's BOS in one pass (no windows): a
  document longer than the model's context is an error, not a strided perplexity.
- Generation honours `until`, `max_gen_toks`, `do_sample`, `temperature`, `top_p` and `seed` of the
  task's `generation_kwargs`; other keys (top_k, ...) are not part of the handle contract and are ignored.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import LM

from evomerge.records import UserError
from evomerge.fitness.handle import ModelHandle, Sampling

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF model default


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's convention: trailing whitespace of the context belongs to the continuation."""
    kept = context.rstrip()
    return kept, context[len(kept):] + continuation


def sampling_of(gen_kwargs: dict[str, Any]) -> Sampling:
    """A task's generation_kwargs as the handle's Sampling (greedy unless do_sample with temperature > 0)."""
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0) if gen_kwargs.get("do_sample", False) else 0.0
    return Sampling(max_new_tokens=int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), temperature=temperature,
                    top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0), stop=tuple(until), seed=gen_kwargs.get("seed"))


class HandleLM(LM):
    """An lm-eval model answering through an evomerge ModelHandle (built once per worker, reused)."""

    def __init__(self, handle: ModelHandle) -> None:
        super().__init__()
        self.handle = handle

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if not requests:
            return []
        scored = self.handle.score([split_pair(*r.args) for r in requests])
        return [(float(sum(s.logprobs)), bool(s.greedy) and all(s.greedy)) for s in scored]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        if not requests:
            return []
        scored = self.handle.score([("", r.args[0]) for r in requests])  # conditioned on the BOS the tokenizer adds
        return [float(sum(s.logprobs)) for s in scored]

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[Sampling, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(sampling_of(dict(r.args[1] or {})), []).append(i)
        for sampling, idx in groups.items():  # one batched call per distinct generation setting
            for i, text in zip(idx, self.handle.generate([requests[i].args[0] for i in idx], sampling)):
                out[i] = text
        return out  # type: ignore[return-value]

    # chat templates (apply_chat_template: true) need the handle's local tokenizer
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self._tokenizer(), "name_or_path", "")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self._tokenizer(), "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        tok = self._tokenizer()
        if not getattr(tok, "chat_template", None):
            raise UserError(f"lm_eval: apply_chat_template is set but the tokenizer of "
                            f"{getattr(tok, 'name_or_path', 'the model') or 'the model'} has no chat template; "
                            "set apply_chat_template: false")
        text = tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       continue_final_message=not add_generation_prompt)
        # the handle encodes a string prompt with the tokenizer's special tokens: drop a BOS the template wrote
        # when the tokenizer adds its own, so the model sees one (as lm-eval's HF model does)
        bos = getattr(tok, "bos_token", None)
        adds_bos = bos is not None and tok("", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]
        return text[len(bos):] if adds_bos and text.startswith(bos) else text

    def _tokenizer(self) -> Any:
        tok = getattr(self.handle, "tokenizer", None)
        if tok is None:
            raise UserError(f"lm_eval: apply_chat_template needs a handle with a local tokenizer; "
                            f"{type(self.handle).__name__} has none")
        return tok
