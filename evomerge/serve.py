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
weights); a request waits at most `request_timeout` seconds for the model (then 503); SIGTERM stops
within `shutdown_grace` seconds, abandoning work still in flight.

OpenAI options: `stream` (server-sent events: one chunk per choice with its whole text, a usage chunk when
`stream_options.include_usage`, then `[DONE]`), `n`, `max_completion_tokens`, and `logprobs` on completions
with `echo`; other log-prob requests are a 400 naming the field, unknown fields a 400.

One resident HF model answers one request at a time (a lock); a request whose recipe equals the last
one reuses the weights already in place.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from evomerge.recipe import Recipe
from evomerge.records import UserError
from evomerge.fitness.handle import Completion, Prompt, Sampling, encode_prompt

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
    return JSONResponse({"error": {"message": " ".join(message.split()), "code": status}}, status, headers=headers)


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

    @contextmanager
    def _model(self, limits: ServeConfig) -> Iterator[None]:
        """The model to this request alone, waiting at most `request_timeout` seconds for it."""
        if not self.lock.acquire(timeout=limits.request_timeout):
            raise HTTPError(503, f"the model is busy: waited {limits.request_timeout:g} s", {"Retry-After": "1"})
        try:
            yield
        finally:
            self.lock.release()

    def completions(self, body: CompletionBody, limits: ServeConfig) -> dict[str, Any]:
        if body.logprobs is not None and not body.echo:
            raise HTTPError(400, "logprobs: only with echo: true here (the prompt's log-probs); "
                                 "log-probs of generated tokens are not supported")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self._check(len(prompts) * body.n, body.tokens, limits)
        with self._model(limits):
            usage = self._prompt_usage(prompts, body.tokens)
            self.use(body.recipe)
            answers = self._generate([p for p in prompts for _ in range(body.n)], body)
            echo = [echo_logprobs(self.handle, p, body.logprobs or 0) for p in prompts] if body.echo and body.logprobs is not None else None
        choices = []
        for i, a in enumerate(answers):
            p = prompts[i // body.n]
            choices.append({"index": i, "text": p + a.text if body.echo else a.text, "finish_reason": a.finish_reason,
                            "logprobs": None if echo is None else echo[i // body.n]})
        return self._wrap("text_completion", choices, usage, answers)

    def chat(self, body: ChatBody, limits: ServeConfig) -> dict[str, Any]:
        if body.logprobs or body.top_logprobs is not None:
            raise HTTPError(400, f"{'logprobs' if body.logprobs else 'top_logprobs'}: log-probs are not supported on chat completions")
        if not getattr(self.handle.tokenizer, "chat_template", None):
            raise HTTPError(400, "this model has no chat template: send a plain prompt to /v1/completions")
        self._check(body.n, body.tokens, limits)
        with self._model(limits):
            usage = self._prompt_usage([body.messages], body.tokens)
            self.use(body.recipe)
            answers = self._generate([body.messages] * body.n, body)
        choices = [{"index": i, "message": {"role": "assistant", "content": a.text}, "finish_reason": a.finish_reason}
                   for i, a in enumerate(answers)]
        return self._wrap("chat.completion", choices, usage, answers)

    def loss(self, body: LossBody, limits: ServeConfig) -> dict[str, Any]:
        task = self.datasets.get(body.dataset)
        if task is None:
            raise HTTPError(404, f"no dataset {body.dataset!r} (datasets: {', '.join(self.datasets) or 'none'})")
        examples = task.examples[: body.limit]
        with self._model(limits):
            self.use(body.recipe)
            scored = self.handle.score([(task.prompt(ex), ex.reference) for ex in examples])
        per = [s.loss for s in scored]
        if not all(math.isfinite(x) for x in per):  # JSON has no inf or nan; a client would read null
            raise HTTPError(400, "recipe: the merged model's loss is not finite; its parameters are too large")
        return {"object": "loss", "dataset": body.dataset, "loss": sum(per) / len(per), "per_example": per,
                "examples": len(per)}

    def _generate(self, prompts: list[Prompt], body: _Body) -> list[Completion]:
        if not body.tokens:
            return [Completion("", "length", 0)] * len(prompts)
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        sampling = Sampling(body.tokens, body.temperature, body.top_p, stop, body.seed)
        try:
            return self.handle.complete(prompts, sampling)
        except UserError as e:  # e.g. an empty prompt to a tokenizer without BOS
            raise HTTPError(400, str(e)) from None

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

    def _wrap(self, kind: str, choices: list[dict[str, Any]], usage: dict[str, int], answers: list[Completion]) -> dict[str, Any]:
        c = sum(a.tokens for a in answers)
        usage = {**usage, "completion_tokens": c, "total_tokens": usage["prompt_tokens"] + c}
        return {"id": f"evm-{time.time_ns()}", "object": kind, "created": int(time.time()), "model": self.name,
                "choices": choices, "usage": usage}


def stream(answer: dict[str, Any], include_usage: bool) -> StreamingResponse:
    """A finished answer as OpenAI's server-sent events: a chunk per choice (its whole text and finish
    reason), a usage chunk when asked, then [DONE]. Generation is not incremental: the chunks come at once."""
    chat = answer["object"] == "chat.completion"
    head = {"id": answer["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": answer["created"], "model": answer["model"]}
    chunks = [{**head, "choices": [{"index": c["index"], "delta": c["message"], "logprobs": None,
                                    "finish_reason": c["finish_reason"]} if chat else c]} for c in answer["choices"]]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": answer["usage"]})
    events = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
    return StreamingResponse(iter(events), media_type="text/event-stream")


def answer(result: dict[str, Any], body: _Body) -> Any:
    return stream(result, body.stream_options is not None and body.stream_options.include_usage) if body.stream else result


def echo_logprobs(handle: Any, text: str, top: int) -> dict[str, Any]:
    """OpenAI's echoed-prompt logprobs: per text token its string, character offset, log-prob given what
    precedes it (None for the very first) and the `top` likeliest alternatives (always the argmax)."""
    import torch

    tok = handle.tokenizer
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
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
    def completions(body: CompletionBody) -> Any:
        return answer(service.completions(body, config), body)

    @app.post("/v1/chat/completions")
    def chat(body: ChatBody) -> Any:
        return answer(service.chat(body, config), body)

    @app.post("/v1/loss")
    def loss(body: LossBody) -> dict[str, Any]:
        return service.loss(body, config)

    return BodyLimit(app, config.max_body)  # type: ignore[return-value]


def build(config: ServeConfig) -> Any:
    """Everything validated and loaded: the ASGI app, ready for uvicorn."""
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
    from evomerge.placement import resolve_device

    device = resolve_device("auto")  # the materializer writes where the model lives
    handle = HFHandle(sources[config.base], Materializer(sources, base=config.base, device=device),
                      batch_size=config.batch_size, device=str(device))
    service = MergeService(handle, list(config.sources), datasets)
    return create_app(service, config, token)


def serve(config: ServeConfig) -> None:
    """Serve until SIGTERM or Ctrl-C: uvicorn stops taking requests and waits for those in flight; work still
    running `shutdown_grace` seconds later is abandoned (a model call cannot be interrupted) and the process exits."""
    import uvicorn

    grace = config.shutdown_grace

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            timer = threading.Timer(grace, _abandon, (grace,))
            timer.daemon = True
            timer.start()
            super().handle_exit(sig, frame)

    app = build(config)
    Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=grace)).run()


def _abandon(grace: float) -> None:
    print(f"evomerge serve: work still in flight {grace:g} s after the stop signal is abandoned", file=sys.stderr, flush=True)
    os._exit(0)
