"""The API-only handle: any OpenAI-compatible endpoint (completions or chat completions).

Requests run concurrently (asyncio, at most `concurrency` in flight). 429, 5xx, timeouts, connection
errors and malformed JSON are retried with exponential backoff and full jitter, honouring Retry-After;
after `max_retries` retries the request fails with a one-line `APIError`, which the worker records as
the candidate's failure while the run goes on. 401/403 is a `UserError` at once: a wrong key does not
get better with retries. Every successful response goes to the on-disk cache first, so nothing is paid
twice. The key is read from the environment variable named in the config, sent only in the
Authorization header, and scrubbed from every message this module writes.

With `send_recipe`, each request carries the candidate's recipe (`"recipe": {...}` in the body), the
protocol of `evomerge serve`: that is how an API-only search reaches models it never sees.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from evomerge.recipe import Recipe
from evomerge.records import UserError
from evomerge.fitness.cache import ResponseCache, request_key
from evomerge.fitness.handle import Prompt, Sampling, TokenScores, is_chat

log = logging.getLogger(__name__)
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class APIError(RuntimeError):
    """A request that still failed after the retry budget. One line, no key."""


@dataclass
class APIConfig:
    base_url: str  # e.g. https://api.example.com/v1
    model: str
    api_key_env: str | None = None  # NAME of the environment variable holding the key, never the key
    mode: Literal["completions", "chat"] = "completions"
    concurrency: int = 8
    batch_prompts: int = 1  # prompts per completions request (a list prompt); evomerge serve batches them
    timeout: float = 60.0
    max_retries: int = 5
    backoff: float = 0.5  # first retry waits up to this many seconds, doubling each time
    max_backoff: float = 30.0
    cache: str | None = None  # SQLite file; None: no cache
    price_prompt: float = 0.0  # USD per million prompt tokens
    price_completion: float = 0.0  # USD per million completion tokens
    send_recipe: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("completions", "chat"):
            raise UserError(f"api mode must be completions or chat, got {self.mode!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise UserError(f"api base_url must start with http:// or https://, got {self.base_url!r}")
        if self.concurrency < 1 or self.batch_prompts < 1 or self.max_retries < 0 or self.timeout <= 0:
            raise UserError("api: concurrency >= 1, batch_prompts >= 1, max_retries >= 0 and timeout > 0 are required")
        self.base_url = self.base_url.rstrip("/")


class APIHandle:
    def __init__(self, config: APIConfig | None = None, **options: Any) -> None:
        self.config = config or APIConfig(**options)
        c = self.config
        self._key: str | None = None
        if c.api_key_env:
            self._key = os.environ.get(c.api_key_env)
            if not self._key:
                raise UserError(f"environment variable {c.api_key_env} (the API key) is not set")
        self.cache = ResponseCache(c.cache) if c.cache else None
        self.recipe: dict[str, Any] | None = None
        self._cost: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"APIHandle({self.config.base_url!r}, model={self.config.model!r})"

    # -- protocol --------------------------------------------------------------------------------------
    def set_recipe(self, recipe: Recipe) -> None:
        if not self.config.send_recipe:
            raise UserError(f"the API at {self.config.base_url} serves a fixed model; set send_recipe: true "
                            "for a service that builds recipes (evomerge serve)")
        self.recipe = recipe.to_dict()

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling = Sampling()) -> list[str]:
        s = sampling
        settings: dict[str, Any] = {"max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p}
        if s.stop:
            settings["stop"] = list(s.stop)
        if s.seed is not None:
            settings["seed"] = s.seed
        if self.config.mode == "chat":
            bodies = [{"messages": [{"role": "user", "content": p}] if isinstance(p, str) else p, **settings}
                      for p in prompts]
            responses = self._run_all("/chat/completions", bodies)
            return [_text(r, chat=True) for r in responses]
        if any(is_chat(p) for p in prompts):
            raise UserError("a chat-template task needs the API in mode: chat")
        return [_text(r, chat=False) for r in self._run_all("/completions", [{"prompt": p, **settings} for p in prompts])]

    def score(self, pairs: Sequence[tuple[Prompt, str]], *, eos: bool = False) -> list[TokenScores]:
        """Teacher forcing through the completions endpoint's echo: the prompt's own token log-probs."""
        if eos:
            raise UserError("an API cannot score the end-of-sequence token; use exact_match instead of teacher_exact")
        if self.config.mode != "completions" or any(is_chat(p) for p, _ in pairs):
            raise UserError("teacher-forced and multiple-choice metrics need the API in mode: completions with a plain template")
        bodies = [{"prompt": p + c, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}  # type: ignore[operator]
                  for p, c in pairs]
        responses = self._run_all("/completions", bodies)
        return [_echo_scores(r, len(p), len(p) + len(c)) for r, (p, c) in zip(responses, pairs)]  # type: ignore[arg-type]

    def loss(self, dataset: str, limit: int | None = None) -> dict[str, Any]:
        """`evomerge serve`'s loss endpoint: the recipe's mean token loss on a dataset the host keeps,
        with per-example losses. Only the numbers come back, never the weights or the data."""
        if self.recipe is None:
            raise UserError("set_recipe first: the loss is the loss of a recipe")
        body: dict[str, Any] = {"dataset": dataset, **({"limit": limit} if limit else {})}
        return self._run_all("/loss", [body], expect="loss")[0]

    def pop_cost(self) -> dict[str, float]:
        cost, self._cost = self._cost, {}
        return cost

    def check(self) -> None:
        """One tiny request: an unreachable endpoint or a refused key become a one-line UserError now."""
        old = self.config.max_retries
        self.config.max_retries = 0
        try:
            body = {"max_tokens": 1, "temperature": 0.0}
            if self.config.mode == "chat":
                self._run_all("/chat/completions", [{"messages": [{"role": "user", "content": "hi"}], **body}], use_cache=False)
            else:
                self._run_all("/completions", [{"prompt": "hi", **body}], use_cache=False)
        except APIError as e:
            raise UserError(str(e)) from None
        finally:
            self.config.max_retries = old

    # -- transport -------------------------------------------------------------------------------------
    def _run_all(self, path: str, bodies: list[dict[str, Any]], use_cache: bool = True,
                 expect: str = "choices") -> list[dict[str, Any]]:
        """POST every body (the model, extra_body and recipe added) and return the answers in order;
        `expect` is the key a well-formed answer has."""
        full = [{"model": self.config.model, **self.config.extra_body, **b,
                 **({"recipe": self.recipe} if self.config.send_recipe and self.recipe is not None else {})}
                for b in bodies]
        coro = self._gather(path, full, use_cache, expect)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # called from inside an event loop (a notebook)
            return pool.submit(asyncio.run, coro).result()

    async def _gather(self, path: str, bodies: list[dict[str, Any]], use_cache: bool, expect: str) -> list[dict[str, Any]]:
        sem = asyncio.Semaphore(self.config.concurrency)
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        limits = httpx.Limits(max_connections=self.config.concurrency)
        async with httpx.AsyncClient(headers=headers, timeout=self.config.timeout, limits=limits) as client:

            async def one(body: dict[str, Any], cached: bool) -> dict[str, Any]:
                async with sem:
                    return await self._request(client, path, body, cached, expect)

            if self.config.batch_prompts > 1 and path == "/completions":
                return await self._batched(one, path, bodies, use_cache)
            return list(await asyncio.gather(*(one(b, use_cache) for b in bodies)))

    async def _batched(self, one: Any, path: str, bodies: list[dict[str, Any]], use_cache: bool) -> list[dict[str, Any]]:
        """Bodies that differ only in their prompt, sent `batch_prompts` to a request as a prompt list.
        Each answer is cached under its own single-prompt key, so the batch size never changes a key."""
        url = self.config.base_url + path
        keys = [request_key(url, b) for b in bodies]
        out: list[dict[str, Any] | None] = [self.cache.get(k) if use_cache and self.cache else None for k in keys]
        if any(o is not None for o in out):
            self._add("cached", sum(o is not None for o in out))
        todo = [i for i, o in enumerate(out) if o is None]
        n = self.config.batch_prompts

        async def send(chunk: list[int]) -> None:
            data = await one({**bodies[chunk[0]], "prompt": [bodies[i]["prompt"] for i in chunk]}, False)
            choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
            if len(choices) != len(chunk):
                raise APIError(f"{url} answered {len(choices)} choices for {len(chunk)} prompts; set batch_prompts: 1")
            for i, c in zip(chunk, choices):
                out[i] = {"choices": [{**c, "index": 0}]}
                if self.cache is not None:
                    self.cache.put(keys[i], out[i])

        await asyncio.gather(*(send(todo[k:k + n]) for k in range(0, len(todo), n)))
        return out  # type: ignore[return-value]

    async def _request(self, client: httpx.AsyncClient, path: str, body: dict[str, Any], use_cache: bool,
                       expect: str) -> dict[str, Any]:
        url = self.config.base_url + path
        key = request_key(url, body)
        if use_cache and self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self._add("cached", 1)
                return hit
        where = f"{self.config.model} at {url}"
        for attempt in range(self.config.max_retries + 1):
            wait: float | None = None
            try:
                self._add("requests", 1)  # attempts: a request that timed out may still be billed
                r = await client.post(url, json=body)
                if r.status_code in (401, 403):
                    raise UserError(self._scrub(f"{where} refused the API key"
                                                f"{' in $' + self.config.api_key_env if self.config.api_key_env else ''}"
                                                f" (HTTP {r.status_code})"))
                if r.status_code in RETRY_STATUS:
                    reason, wait = f"HTTP {r.status_code}", retry_after(r.headers.get("retry-after"))
                elif r.status_code >= 400:
                    raise APIError(self._scrub(f"{where} answered HTTP {r.status_code}: {_error_message(r)}"))
                else:
                    try:
                        data = r.json()
                        if not isinstance(data, dict) or not data.get(expect):
                            raise ValueError(f"no {expect}")
                    except ValueError as e:
                        reason = f"malformed response ({type(e).__name__})"
                    else:
                        self._account(data)
                        if self.cache is not None:
                            self.cache.put(key, data)
                        return data
            except httpx.TimeoutException:
                reason = f"no answer within {self.config.timeout:g} s"
            except httpx.TransportError as e:
                lost = "cannot connect" if isinstance(e, httpx.ConnectError) else "connection lost"
                reason = f"{lost} ({type(e).__name__})"
            self._add("retries" if attempt < self.config.max_retries else "failures", 1)
            if attempt == self.config.max_retries:
                raise APIError(self._scrub(f"{where} failed after {attempt + 1} tries: {reason}"))
            backoff = random.uniform(0, min(self.config.max_backoff, self.config.backoff * 2**attempt))
            delay = max(backoff, wait or 0.0)
            log.info(self._scrub(f"{where}: {reason}; retry {attempt + 1}/{self.config.max_retries} in {delay:.2f} s"))
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _account(self, data: dict[str, Any]) -> None:
        usage = data.get("usage") or {}
        p, c = float(usage.get("prompt_tokens") or 0), float(usage.get("completion_tokens") or 0)
        self._add("prompt_tokens", p)
        self._add("completion_tokens", c)
        self._add("usd", (p * self.config.price_prompt + c * self.config.price_completion) / 1e6)

    def _add(self, k: str, v: float) -> None:
        self._cost[k] = self._cost.get(k, 0.0) + v

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _error_message(r: httpx.Response) -> str:
    """The server's own error message, on one line and short (the status code says the rest)."""
    try:
        err = r.json().get("error")
        msg = err.get("message") if isinstance(err, dict) else (err or r.json().get("detail"))
    except (ValueError, AttributeError):
        msg = r.text
    return " ".join(str(msg or "").split())[:200]


def _text(data: dict[str, Any], *, chat: bool) -> str:
    choice = data["choices"][0]
    return (choice.get("message") or {}).get("content") or "" if chat else choice.get("text") or ""


def _echo_scores(data: dict[str, Any], start: int, end: int) -> TokenScores:
    """From an echoed completion's logprobs: the tokens whose text starts within [start, end)."""
    lp = data["choices"][0].get("logprobs") or {}
    offsets, tokens, logprobs, tops = (lp.get(k) or [] for k in ("text_offset", "tokens", "token_logprobs", "top_logprobs"))
    if not offsets or len(offsets) != len(tokens):
        raise APIError("the API returned no prompt log-probabilities (it needs echo and logprobs on completions)")
    out = TokenScores(logprobs=[], greedy=[])
    for i, off in enumerate(offsets):
        if start <= off < end:
            out.logprobs.append(float(logprobs[i]))
            top = tops[i] if i < len(tops) and tops[i] else {tokens[i]: logprobs[i]}
            out.greedy.append(float(logprobs[i]) >= max(float(v) for v in top.values()) - 1e-6)
    return out
