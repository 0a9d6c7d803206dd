"""Merge-as-a-service: the host keeps a base model and its experts (full fine-tunes, or LoRA adapters of
the base, read as task vectors (alpha/r) B @ A) resident; a client sends a recipe and gets completions
(OpenAI-compatible) or a loss on a named dataset. The weights never leave the host.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (the usual body plus `recipe`),
`POST /v1/loss` (`{"recipe", "dataset", "limit"?}` -> mean token loss and per-example losses),
`GET /v1/models`, `GET /health`.

Safety: binds 127.0.0.1 unless a bearer token is configured; every request but /health needs that token
when one is; request bodies over `max_body` bytes get 413; each client (the configured token when it
carries it, else its address: a made-up Authorization header is no new client) gets a token bucket of
`burst` requests refilled at `rate` per second, then 429 with Retry-After. Bad input is a 4xx with a
one-line `{"error": {"message": ...}}`, never a 500.

Bounded work: a request holds at most `max_prompts` prompts (times `n`) of at most the model's context
minus `max_tokens` tokens each; a recipe's data-flow path steps and passthrough slice layers are each at
most the model's depth x the models on the host x PATH_REPEATS, its nested recipes at most the model's
depth, every number in it finite and within +-PARAM_BOUND (so sampling never sees inf or nan from the
weights); a request waits at most `request_timeout` seconds for the model (then 503) and holds it at most
`compute_timeout` seconds (then 504). Generation checks that limit, its client and the server's stop at
every token (an O(1) check per decoding step), so the model is freed within one token step of the limit, of
the client going away, or of SIGTERM (then 503); a merge, an echo's or a loss's forward passes are not cut
(the bounds above size them). Work still running `shutdown_grace` seconds after SIGTERM is abandoned.

OpenAI options: `stream` (server-sent events as the tokens come: per choice its text in pieces no later
token can change, the last with its finish reason; a usage chunk when `stream_options.include_usage`; then
`[DONE]`; an error after the stream began, such as the compute limit, is a last `{"error": ...}` event),
`n`, `max_completion_tokens`, and `logprobs` on completions with `echo`; other log-prob requests are a 400
naming the field, unknown fields a 400.

One resident HF model answers one request at a time (a lock); a request whose recipe equals the last
one reuses the weights already in place.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from evomerge.recipe import Recipe
from evomerge.records import UserError
from evomerge.fitness.handle import Completion, Prompt, Sampling, encode_prompt, truncate_at_stop

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PATH_REPEATS = 4  # a data-flow path or passthrough stack: at most layers x models x this (the data-flow space's r = 3, pinned ends)
PARAM_BOUND = 1e4  # |a recipe number|; mergekit's parameters are weights and fractions, far below it


@dataclass
class ServeConfig:
    sources: dict[str, str]  # name -> model reference (evomerge.merge.refs): a checkpoint dir, Hub ID, adapter of the base, ...
    base: str
    datasets: dict[str, str] = field(default_factory=dict)  # dataset id -> JSONL task file
    host: str = "127.0.0.1"
    port: int = 8000
    token_env: str | None = None  # NAME of the environment variable holding the bearer token
    max_body: int = 1_000_000  # bytes
    rate: float = 50.0  # requests per second per client, sustained (a scorer sends one per prompt)
    burst: int = 200
    max_tokens: int = 512  # the most a request may generate
    max_prompts: int = 64  # prompts per completion request
    batch_size: int = 16
    request_timeout: float = 60.0  # seconds a request may wait for the model (then 503)
    compute_timeout: float = 120.0  # seconds a request may hold the model (then 504), checked at every generated token
    shutdown_grace: float = 5.0  # seconds after SIGTERM before in-flight work is abandoned and the process exits

    def token(self) -> str | None:
        """The bearer token, checked against where the server binds: a non-loopback bind needs one."""
        token = None
        if self.token_env:
            token = os.environ.get(self.token_env)
            if not token:
                raise UserError(f"environment variable {self.token_env} (the bearer token) is not set")
        if token is None and not is_loopback(self.host):
            raise UserError(f"refusing to serve on {self.host} without a bearer token: set --token-env, or bind 127.0.0.1")
        return token


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- request bodies ------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an option we do not implement is a 400 naming it, never ignored

    recipe: dict[str, Any]
    model: str | None = None
    user: str | None = None  # OpenAI's end-user id: informational
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name; wins over max_tokens
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, lt=2**63)  # what torch.manual_seed takes, as the CLI's seeds (>= 0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_Body":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def tokens(self) -> int:
        """The most tokens to generate per choice."""
        for given in (self.max_completion_tokens, self.max_tokens):
            if given is not None:
                return given
        return 16


class CompletionBody(_Body):
    prompt: Union[str, list[str]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)


class ChatBody(_Body):
    messages: list[dict[str, str]] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class LossBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: dict[str, Any]
    dataset: str
    limit: int | None = Field(None, ge=1)
    model: str | None = None


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message), status, headers=headers)


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": " ".join(message.split()), "code": status}}


class Job:
    """One request's work: its deadline (set once it holds the model), whether its client went away, the
    server's stop, and where a stream's choices go as they are made (`emit`, None when not streaming)."""

    def __init__(self, stopping: threading.Event, chat: bool = False,
                 emit: Callable[[tuple[str, Any]], None] | None = None) -> None:
        self.stopping, self.chat, self.emit = stopping, chat, emit
        self.cancelled = threading.Event()
        self.deadline, self.limit = math.inf, math.inf
        self.id, self.created = f"evm-{time.time_ns()}", int(time.time())
        self.began: set[int] = set()  # streamed chat choices whose first piece (the one naming the role) went out

    def start(self, limit: float) -> None:
        self.deadline, self.limit = time.monotonic() + limit, limit
        self.check()

    def check(self) -> None:
        """Raise when the work must stop: O(1), called at every generated token."""
        if self.stopping.is_set():
            raise HTTPError(503, "the server is shutting down", {"Retry-After": "1"})
        if self.cancelled.is_set():
            raise HTTPError(499, "the client went away")  # never seen: nobody is left to read it
        if time.monotonic() > self.deadline:
            raise HTTPError(504, f"generation stopped at the compute limit of {self.limit:g} s")

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: Any = None) -> None:
        """A piece of a streamed choice (OpenAI's chunk choice for chat or completions)."""
        if self.emit is None:
            return
        if self.chat:  # as OpenAI streams: the role in a choice's first delta only
            delta = {"content": text} if index in self.began else {"role": "assistant", "content": text}
            self.began.add(index)
        self.emit(("choice", {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason} if self.chat else
                   {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}))


class Deltas:
    """Each choice's text as its tokens come, handed out in pieces no later token can change: short of a
    partial character or a possible stop string's start, and cut at a stop string. Decoding a choice's
    tokens so far costs O(its length) a step (at most max_tokens), next to a forward pass of the model."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], choices: int) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[list[int]] = [[] for _ in range(choices)]
        self.sent, self.ended = [""] * choices, [False] * choices

    def step(self, rows: list[int], tokens: list[int]) -> Iterator[tuple[int, str]]:
        for i, t in zip(rows, tokens):
            if self.ended[i]:
                continue
            self.ended[i] = t == self.tokenizer.eos_token_id
            self.tokens[i].append(t)
            text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            safe = truncate_at_stop(text, self.stop)
            if len(safe) < len(text):
                self.ended[i] = True
            else:
                safe = text[: len(text) - self.hold].rstrip("\ufffd")  # a stop string may start in the held tail
            if len(safe) > len(self.sent[i]) and safe.startswith(self.sent[i]):
                yield i, safe[len(self.sent[i]):]
                self.sent[i] = safe

    def rest(self, i: int, final: str) -> str:
        """What of the finished text was not handed out yet."""
        return final[len(self.sent[i]):]


# -- recipe bounds ---------------------------------------------------------------------------------------
def check_recipe(recipe: Any, layers: int, models: int) -> None:
    """A recipe's shape, size and numbers, checked before anything is built from it (a 400 naming the field):
    its path steps and passthrough slice layers each at most layers * models * PATH_REPEATS (every layer of
    every model PATH_REPEATS times), its nested recipes at most `layers`, every number finite and within
    +-PARAM_BOUND."""
    stack = layers * models * PATH_REPEATS
    bounds = {"nested recipes": (layers, f"the model's {layers} layers"),
              "data-flow path steps": (stack, f"the model's {layers} layers x {models} models x {PATH_REPEATS}"),
              "slice layers": (stack, f"the model's {layers} layers x {models} models x {PATH_REPEATS}")}
    counts = {"nested recipes": -1, "data-flow path steps": 0, "slice layers": 0}  # -1: the top recipe is not nested

    def fail(where: str, what: str) -> None:
        raise HTTPError(400, f"recipe{where}: {what}")

    def count(what: str, n: int) -> None:
        counts[what] += n
        bound, why = bounds[what]
        if counts[what] > bound:
            fail("", f"more than {bound} {what} ({why})")

    def numbers(v: Any, where: str) -> None:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v) or abs(v) > PARAM_BOUND:
                fail(where, f"must be finite and within +-{PARAM_BOUND:g}, got {v!r}")
        elif isinstance(v, (list, dict)):
            for k, x in enumerate(v) if isinstance(v, list) else v.items():
                numbers(x, f"{where}[{k!r}]" if isinstance(v, list) else f"{where}.{k}")

    def mapping(v: Any, where: str) -> dict[str, Any]:
        if v is not None and not isinstance(v, dict):
            fail(where, f"must be a mapping, got {type(v).__name__}")
        return v or {}

    def listing(v: Any, where: str) -> list[Any]:
        if v is not None and not isinstance(v, list):
            fail(where, f"must be a list, got {type(v).__name__}")
        return v or []

    def model(m: Any, where: str) -> None:
        if isinstance(m, dict):
            walk(m, where)
        elif m is not None and not isinstance(m, str):
            fail(where, f"must be a model name or a recipe, got {type(m).__name__}")

    def walk(r: Any, where: str) -> None:
        count("nested recipes", 1)
        r = mapping(r, where)
        for key in ("merge_method", "dtype", "tokenizer_source"):
            if r.get(key) is not None and not isinstance(r[key], str):
                fail(f"{where}.{key}", f"must be a string, got {type(r[key]).__name__}")
        seed = r.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            fail(f"{where}.seed", f"must be an integer, got {seed!r}")
        numbers(mapping(r.get("parameters"), f"{where}.parameters"), f"{where}.parameters")
        model(r.get("base_model"), f"{where}.base_model")
        for i, m in enumerate(listing(r.get("models"), f"{where}.models")):
            if isinstance(m, dict):
                model(m.get("model"), f"{where}.models[{i}].model")
                numbers(mapping(m.get("parameters"), f"{where}.models[{i}].parameters"), f"{where}.models[{i}].parameters")
            else:
                model(m, f"{where}.models[{i}]")
        path = listing(r.get("path"), f"{where}.path")
        count("data-flow path steps", len(path))
        numbers(path, f"{where}.path")
        for i, s in enumerate(listing(r.get("slices"), f"{where}.slices")):
            if not isinstance(s, dict):
                fail(f"{where}.slices[{i}]", f"must be a mapping, got {type(s).__name__}")
            for j, src in enumerate(listing(s.get("sources"), f"{where}.slices[{i}].sources")):
                at = f"{where}.slices[{i}].sources[{j}]"
                span = mapping(src, at).get("layer_range")
                if not (isinstance(span, list) and len(span) == 2 and all(type(x) is int for x in span)):
                    fail(f"{at}.layer_range", f"must be [first, end] layer numbers, got {span!r}")
                count("slice layers", max(0, span[1] - span[0]))
                numbers(mapping(src.get("parameters"), f"{at}.parameters"), f"{at}.parameters")

    walk(recipe, "")


# -- the service ---------------------------------------------------------------------------------------
class MergeService:
    """The resident handle, the datasets and the lock; turns validated bodies into answers."""

    def __init__(self, handle: Any, sources: list[str], datasets: dict[str, Any], name: str = "evomerge") -> None:
        self.handle, self.sources, self.datasets, self.name = handle, sources, datasets, name
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # set on SIGTERM: generation in flight stops at its next token
        self._current: str | None = None  # the recipe now in the weights, as canonical JSON
        config = handle.model.config
        self.layers: int = config.num_hidden_layers
        self.context: int | None = getattr(config, "max_position_embeddings", None)
        # no token covers more characters than its vocabulary entry has (x2 for normalizers that merge characters):
        # a prompt longer than this is over the context without tokenizing it (990 KB of text took 190 MB to tokenize)
        self.max_chars = None if self.context is None else self.context * 2 * max(map(len, handle.tokenizer.get_vocab()))

    def use(self, recipe_dict: dict[str, Any]) -> None:
        """Bring the recipe's weights in (caller holds the lock). Bad recipes are 400s."""
        check_recipe(recipe_dict, self.layers, len(self.sources))
        try:
            recipe = Recipe.from_dict(recipe_dict)
        except UserError as e:
            raise HTTPError(400, f"recipe: {e}") from None
        unknown = [n for n in recipe.source_names() if n not in self.sources]
        if unknown:
            raise HTTPError(400, f"recipe: model {unknown[0]!r} is not on this host (models: {', '.join(self.sources)})")
        key = json.dumps(recipe.to_dict(), sort_keys=True)
        if key == self._current:
            return
        self._current = None  # a failed build leaves the weights half-written
        try:
            self.handle.set_recipe(recipe)
        except UserError as e:
            raise HTTPError(400, f"recipe: {e}") from None
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:  # a value the merge cannot use
            raise HTTPError(400, f"recipe cannot be built: {type(e).__name__}: {e}") from None
        self._current = key

    def job(self, chat: bool = False, emit: Callable[[tuple[str, Any]], None] | None = None) -> Job:
        return Job(self.stopping, chat, emit)

    @contextmanager
    def _model(self, limits: ServeConfig, job: Job) -> Iterator[None]:
        """The model to this request alone, waiting at most `request_timeout` seconds for it, then holding it
        until the job's `compute_timeout` deadline at most."""
        if not self.lock.acquire(timeout=limits.request_timeout):
            raise HTTPError(503, f"the model is busy: waited {limits.request_timeout:g} s", {"Retry-After": "1"})
        try:
            job.start(limits.compute_timeout)
            yield
        finally:
            self.lock.release()

    def completions(self, body: CompletionBody, limits: ServeConfig, job: Job) -> dict[str, Any]:
        if body.logprobs is not None and not body.echo:
            raise HTTPError(400, "logprobs: only with echo: true here (the prompt's log-probs); "
                                 "log-probs of generated tokens are not supported")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self._check(len(prompts) * body.n, body.tokens, limits)
        with self._model(limits, job):
            usage = self._prompt_usage(prompts, body.tokens)
            self.use(body.recipe)
            echo = [echo_logprobs(self.handle, p, body.logprobs or 0) for p in prompts] if body.echo and body.logprobs is not None else None
            if body.echo:  # a stream's first piece of each choice is its prompt
                for i in range(len(prompts) * body.n):
                    job.choice(i, prompts[i // body.n], None, None if echo is None else echo[i // body.n])
            answers = self._generate([p for p in prompts for _ in range(body.n)], body, job)
        choices = []
        for i, a in enumerate(answers):
            p = prompts[i // body.n]
            choices.append({"index": i, "text": p + a.text if body.echo else a.text, "finish_reason": a.finish_reason,
                            "logprobs": None if echo is None else echo[i // body.n]})
        return self._wrap("text_completion", choices, usage, answers, job)

    def chat(self, body: ChatBody, limits: ServeConfig, job: Job) -> dict[str, Any]:
        if body.logprobs or body.top_logprobs is not None:
            raise HTTPError(400, f"{'logprobs' if body.logprobs else 'top_logprobs'}: log-probs are not supported on chat completions")
        if not getattr(self.handle.tokenizer, "chat_template", None):
            raise HTTPError(400, "this model has no chat template: send a plain prompt to /v1/completions")
        self._check(body.n, body.tokens, limits)
        with self._model(limits, job):
            usage = self._prompt_usage([body.messages], body.tokens)
            self.use(body.recipe)
            answers = self._generate([body.messages] * body.n, body, job)
        choices = [{"index": i, "message": {"role": "assistant", "content": a.text}, "finish_reason": a.finish_reason}
                   for i, a in enumerate(answers)]
        return self._wrap("chat.completion", choices, usage, answers, job)

    def loss(self, body: LossBody, limits: ServeConfig) -> dict[str, Any]:
        task = self.datasets.get(body.dataset)
        if task is None:
            raise HTTPError(404, f"no dataset {body.dataset!r} (datasets: {', '.join(self.datasets) or 'none'})")
        examples = task.examples[: body.limit]
        with self._model(limits, self.job()):
            self.use(body.recipe)
            scored = self.handle.score([(task.prompt(ex), ex.reference) for ex in examples])
        per = [s.loss for s in scored]
        if not all(math.isfinite(x) for x in per):  # JSON has no inf or nan; a client would read null
            raise HTTPError(400, "recipe: the merged model's loss is not finite; its parameters are too large")
        return {"object": "loss", "dataset": body.dataset, "loss": sum(per) / len(per), "per_example": per,
                "examples": len(per)}

    def _generate(self, prompts: list[Prompt], body: _Body, job: Job) -> list[Completion]:
        """The answers, the job checked at every token; a stream gets each choice's text as it grows."""
        deltas = None
        if not body.tokens:
            answers = [Completion("", "length", 0)] * len(prompts)
        else:
            stop = [body.stop] if isinstance(body.stop, str) else body.stop
            sampling = Sampling(body.tokens, body.temperature, body.top_p, stop, body.seed)
            deltas = Deltas(self.handle.tokenizer, sampling.stop, len(prompts)) if job.emit is not None else None

            def step(rows: list[int], tokens: list[int]) -> None:
                job.check()
                for i, text in deltas.step(rows, tokens) if deltas is not None else ():
                    job.choice(i, text, None)

            try:
                answers = self.handle.complete(prompts, sampling, step=step)
            except UserError as e:  # e.g. an empty prompt to a tokenizer without BOS
                raise HTTPError(400, str(e)) from None
        for i, a in enumerate(answers):
            job.choice(i, a.text if deltas is None else deltas.rest(i, a.text), a.finish_reason)
        return answers

    @staticmethod
    def _check(n: int, max_tokens: int, limits: ServeConfig) -> None:
        if n < 1 or n > limits.max_prompts:
            raise HTTPError(400, f"a request takes 1 to {limits.max_prompts} prompts (times n), got {n}")
        if max_tokens > limits.max_tokens:
            raise HTTPError(400, f"max_tokens is at most {limits.max_tokens} here, got {max_tokens}")

    def _prompt_usage(self, prompts: list[Prompt], max_tokens: int) -> dict[str, int]:
        """Prompt tokens as the model sees them (special tokens, a chat through its template), each prompt
        with `max_tokens` within the model's context. Under the lock: the tokenizer is shared."""
        total = 0
        for i, p in enumerate(prompts):
            chars = len(p) if isinstance(p, str) else sum(len(str(m.get("content", ""))) for m in p)
            if self.max_chars is not None and chars > self.max_chars:
                raise HTTPError(400, f"prompt {i} is {chars} characters, surely over the model's context of {self.context} "
                                     f"tokens (at most {self.max_chars} characters are tokenized)")
            n = len(encode_prompt(self.handle.tokenizer, p))
            if self.context is not None and n + max_tokens > self.context:
                raise HTTPError(400, f"prompt {i} is {n} tokens; with max_tokens {max_tokens} that is over the model's "
                                     f"context of {self.context} tokens")
            total += n
        return {"prompt_tokens": total}

    def _wrap(self, kind: str, choices: list[dict[str, Any]], usage: dict[str, int], answers: list[Completion],
              job: Job) -> dict[str, Any]:
        c = sum(a.tokens for a in answers)
        usage = {**usage, "completion_tokens": c, "total_tokens": usage["prompt_tokens"] + c}
        return {"id": job.id, "object": kind, "created": job.created, "model": self.name, "choices": choices, "usage": usage}


async def respond(request: Request, body: _Body, work: Callable[[Job], dict[str, Any]], service: MergeService) -> Any:
    """`work` run in a worker thread as a job cancelled when the client goes away. A stream begins with the
    first choice piece (so a refusal before it is still a plain 4xx/5xx), then server-sent events as they come."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    job = service.job(isinstance(body, ChatBody), (lambda e: loop.call_soon_threadsafe(events.put_nowait, e)) if body.stream else None)
    watcher = asyncio.create_task(_watch(request, job))
    if not body.stream:
        try:
            return await run_in_threadpool(work, job)
        finally:
            watcher.cancel()

    def run() -> None:
        try:
            job.emit(("done", work(job)))
        except Exception as e:  # an HTTPError, or a bug (500)
            job.emit(("error", e))

    runner = asyncio.create_task(run_in_threadpool(run))
    first = await events.get()
    if first[0] == "error":
        watcher.cancel()
        raise first[1]
    head = {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created, "model": service.name}
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return StreamingResponse(_sse(first, events, job, head, include_usage, (watcher, runner)), media_type="text/event-stream")


async def _sse(event: tuple[str, Any], events: asyncio.Queue, job: Job, head: dict[str, Any], include_usage: bool,
               tasks: tuple[asyncio.Task, asyncio.Task]) -> AsyncIterator[str]:
    """OpenAI's server-sent events: a chunk per choice piece, the usage chunk when asked, then [DONE]; an error
    after the stream began is a last `{"error": ...}` event (the openai client raises it). `tasks` (the
    disconnect watcher, the worker) are held here: the loop keeps only weak references to tasks."""
    try:
        while True:
            kind, value = event
            if kind == "choice":
                yield f"data: {json.dumps({**head, 'choices': [value]})}\n\n"
            elif kind == "done":
                if include_usage:
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': value['usage']})}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                e = value if isinstance(value, HTTPError) else HTTPError(500, f"internal error ({type(value).__name__})")
                yield f"data: {json.dumps(_error_body(e.status, e.message))}\n\n"
                return
            event = await events.get()
    finally:
        job.cancelled.set()  # finished, or the client left mid-stream: either way nothing more to make
        tasks[0].cancel()


async def _watch(request: Request, job: Job) -> None:
    """Cancel the job when its client disconnects (the body is read by now: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()


def echo_logprobs(handle: Any, text: str, top: int) -> dict[str, Any]:
    """OpenAI's echoed-prompt logprobs: per text token its string, character offset, log-prob given what
    precedes it (None for the very first) and the `top` likeliest alternatives (always the argmax)."""
    import torch

    tok = handle.tokenizer
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not ids:  # nothing to score (an empty prompt to a tokenizer without BOS)
        raise HTTPError(400, "echo with logprobs: the prompt is empty")
    with torch.no_grad():
        logits = handle.model(input_ids=torch.tensor([ids], device=handle.device)).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    special = set(tok.all_special_ids)
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, (t, (start, end)) in enumerate(zip(ids, offsets)):
        if t in special and start == end:
            continue  # BOS and friends are not text
        out["tokens"].append(text[start:end])
        out["text_offset"].append(start)
        if i == 0:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        row = logp[i - 1]
        out["token_logprobs"].append(float(row[t]))
        best = torch.topk(row, max(1, top))
        out["top_logprobs"].append({tok.decode([int(j)]): float(v) for v, j in zip(best.values, best.indices)})
    return out


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, by its Content-Length or as it streams in. The
    body (small by then) is read here in full and replayed to the app."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _error(413, f"request body over {self.max_bytes} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(scope, receive, send)
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await too_large(scope, receive, send)
            more = msg.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RateLimit:
    """A token bucket per client: `burst` requests at once, refilled at `rate` per second."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def wait_for(self, client: str) -> float:
        """0 when the request may go now (and takes a token), else the seconds until it may."""
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1:
                self.buckets[client] = (tokens - 1, now)
                return 0.0
            self.buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate


def create_app(service: MergeService, config: ServeConfig, token: str | None) -> FastAPI:
    app = FastAPI(title="evomerge serve", docs_url=None, redoc_url=None, openapi_url=None)
    limiter = RateLimit(config.rate, config.burst)

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError) -> JSONResponse:
        return _error(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, e: StarletteHTTPException) -> JSONResponse:  # unknown path, wrong method, unparsable body
        return _error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return _error(400, f"request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where or 'request body'}: {first.get('msg')}")

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:  # a bug on our side, not the client's input
        return _error(500, f"internal error ({type(e).__name__})")

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Any:
        if request.url.path == "/health":
            return await call_next(request)
        given = request.headers.get("authorization", "")
        if token is not None and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(401, "missing or wrong bearer token")
        client = "token" if token is not None else (request.client.host if request.client else "?")  # never a header the client makes up
        wait = limiter.wait_for(client)
        if wait > 0:
            return _error(429, "rate limit exceeded", {"Retry-After": str(max(1, int(wait + 0.999)))})
        return await call_next(request)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model"}],
                "sources": service.sources, "datasets": sorted(service.datasets)}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        return await respond(request, body, lambda job: service.completions(body, config, job), service)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Any:
        return await respond(request, body, lambda job: service.chat(body, config, job), service)

    @app.post("/v1/loss")
    def loss(body: LossBody) -> dict[str, Any]:
        return service.loss(body, config)

    return BodyLimit(app, config.max_body)  # type: ignore[return-value]


def build(config: ServeConfig) -> Any:
    """Everything validated and loaded: the ASGI app, ready for uvicorn."""
    service, token = load(config)
    return create_app(service, config, token)


def load(config: ServeConfig) -> tuple[MergeService, str | None]:
    """The service with its models and datasets loaded, and the bearer token; the config validated first."""
    from evomerge.merge import Materializer
    from evomerge.merge.refs import check_adapters, resolve
    from evomerge.merge.sources import ADAPTER_CONFIG
    from evomerge.fitness.hf import HFHandle
    from evomerge.fitness.tasks import load_task

    token = config.token()  # refuse a bad bind before loading anything
    if config.base not in config.sources:
        raise UserError(f"base {config.base!r} is not among the models ({', '.join(config.sources)})")
    resolved = {name: resolve(ref, (Path.cwd(),)) for name, ref in config.sources.items()}
    check_adapters(resolved, config.base)
    sources = {name: str(r.path) for name, r in resolved.items()}
    for name, path in sources.items():
        if not (Path(path, "config.json").is_file() or Path(path, ADAPTER_CONFIG).is_file()):
            raise UserError(f"model {name!r}: no config.json (or LoRA adapter_config.json) in {path}")
    datasets = {d: load_task({"name": d, "path": p, "metrics": ["loss"]}) for d, p in config.datasets.items()}
    from evomerge.machine import resolve_device

    device = resolve_device("auto")  # the materializer writes where the model lives
    handle = HFHandle(sources[config.base], Materializer(sources, base=config.base, device=device),
                      batch_size=config.batch_size, device=str(device))
    return MergeService(handle, list(config.sources), datasets), token


def serve(config: ServeConfig) -> None:
    """Serve until SIGTERM or Ctrl-C: uvicorn stops taking requests, generation in flight stops at its next
    token (503), requests waiting for the model are refused; work still running `shutdown_grace` seconds later
    (a merge, a loss) is abandoned and the process exits."""
    import uvicorn

    grace = config.shutdown_grace
    service, token = load(config)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            service.stopping.set()
            timer = threading.Timer(grace, _abandon, (grace,))
            timer.daemon = True
            timer.start()
            super().handle_exit(sig, frame)

    app = create_app(service, config, token)
    Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=grace)).run()


def _abandon(grace: float) -> None:
    print(f"evomerge serve: work still in flight {grace:g} s after the stop signal is abandoned", file=sys.stderr, flush=True)
    os._exit(0)
