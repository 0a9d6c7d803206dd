"""Merge-as-a-service: the host keeps a base model and its experts (full fine-tunes, or LoRA adapters of
the base, read as task vectors (alpha/r) B @ A) resident; a client sends a recipe and gets completions
(OpenAI-compatible) or a loss on a named dataset. The weights never leave the host.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (the usual body plus `recipe`),
`POST /v1/loss` (`{"recipe", "dataset", "limit"?}` -> mean token loss and per-example losses),
`GET /v1/models`, `GET /health`.

Safety: binds 127.0.0.1 unless a bearer token is configured; every request but /health needs that token
when one is; request bodies over `max_body` bytes get 413; each client (by token, else address) gets a
token bucket of `burst` requests refilled at `rate` per second, then 429 with Retry-After. Bad input is
a 4xx with a one-line `{"error": {"message": ...}}`, never a 500.

One resident HF model answers one request at a time (a lock); a request whose recipe equals the last
one reuses the weights already in place.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from evomerge.recipe import Recipe
from evomerge.records import UserError
from evomerge.fitness.handle import Completion, Prompt, Sampling, encode_prompt

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (n, user, ...)

    recipe: dict[str, Any]
    model: str | None = None
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Union[str, list[str], None] = None
    seed: int | None = None


class CompletionBody(_Body):
    prompt: Union[str, list[str]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)


class ChatBody(_Body):
    messages: list[dict[str, str]] = Field(min_length=1)


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


# -- the service ---------------------------------------------------------------------------------------
class MergeService:
    """The resident handle, the datasets and the lock; turns validated bodies into answers."""

    def __init__(self, handle: Any, sources: list[str], datasets: dict[str, Any], name: str = "evomerge") -> None:
        self.handle, self.sources, self.datasets, self.name = handle, sources, datasets, name
        self.lock = threading.Lock()
        self._current: str | None = None  # the recipe now in the weights, as canonical JSON

    def use(self, recipe_dict: dict[str, Any]) -> None:
        """Bring the recipe's weights in (caller holds the lock). Bad recipes are 400s."""
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

    def completions(self, body: CompletionBody, limits: ServeConfig) -> dict[str, Any]:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        self._check(len(prompts), body.max_tokens, limits)
        with self.lock:
            self.use(body.recipe)
            answers = self._generate(prompts, body)
            echo = [echo_logprobs(self.handle, p, body.logprobs or 0) for p in prompts] if body.echo and body.logprobs is not None else None
            usage = self._usage(prompts, answers)
        choices = []
        for i, (p, a) in enumerate(zip(prompts, answers)):
            c: dict[str, Any] = {"index": i, "text": p + a.text if body.echo else a.text, "finish_reason": a.finish_reason,
                                 "logprobs": None}
            if echo is not None:
                c["logprobs"] = echo[i]
            choices.append(c)
        return self._wrap("text_completion", choices, usage)

    def chat(self, body: ChatBody, limits: ServeConfig) -> dict[str, Any]:
        self._check(1, body.max_tokens, limits)
        with self.lock:
            self.use(body.recipe)
            answers = self._generate([body.messages], body)
            usage = self._usage([body.messages], answers)
        choice = {"index": 0, "message": {"role": "assistant", "content": answers[0].text}, "finish_reason": answers[0].finish_reason}
        return self._wrap("chat.completion", [choice], usage)

    def loss(self, body: LossBody) -> dict[str, Any]:
        task = self.datasets.get(body.dataset)
        if task is None:
            raise HTTPError(404, f"no dataset {body.dataset!r} (datasets: {', '.join(self.datasets) or 'none'})")
        examples = task.examples[: body.limit]
        with self.lock:
            self.use(body.recipe)
            scored = self.handle.score([(task.prompt(ex), ex.reference) for ex in examples])
        per = [s.loss for s in scored]
        return {"object": "loss", "dataset": body.dataset, "loss": sum(per) / len(per), "per_example": per,
                "examples": len(per)}

    def _generate(self, prompts: list[Prompt], body: _Body) -> list[Completion]:
        if not body.max_tokens:
            return [Completion("", "length", 0)] * len(prompts)
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        sampling = Sampling(body.max_tokens, body.temperature, body.top_p, stop, body.seed)
        try:
            return self.handle.complete(prompts, sampling)
        except UserError as e:  # e.g. a chat request to a model without a chat template
            raise HTTPError(400, str(e)) from None

    @staticmethod
    def _check(n: int, max_tokens: int, limits: ServeConfig) -> None:
        if n < 1 or n > limits.max_prompts:
            raise HTTPError(400, f"a request takes 1 to {limits.max_prompts} prompts, got {n}")
        if max_tokens > limits.max_tokens:
            raise HTTPError(400, f"max_tokens is at most {limits.max_tokens} here, got {max_tokens}")

    def _usage(self, prompts: list[Prompt], answers: list[Completion]) -> dict[str, int]:
        """Tokens as the model saw them: each prompt as encoded for generation (special tokens, a chat
        through its template), each answer's generated tokens. Under the lock: the tokenizer is shared."""
        try:
            p = sum(len(encode_prompt(self.handle.tokenizer, x)) for x in prompts)
        except UserError as e:  # a chat to a model without a chat template (max_tokens 0 generated nothing)
            raise HTTPError(400, str(e)) from None
        c = sum(a.tokens for a in answers)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _wrap(self, kind: str, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {"id": f"evm-{time.time_ns()}", "object": kind, "created": int(time.time()), "model": self.name,
                "choices": choices, "usage": usage}


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
        client = given or (request.client.host if request.client else "?")
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
    def completions(body: CompletionBody) -> dict[str, Any]:
        return service.completions(body, config)

    @app.post("/v1/chat/completions")
    def chat(body: ChatBody) -> dict[str, Any]:
        return service.chat(body, config)

    @app.post("/v1/loss")
    def loss(body: LossBody) -> dict[str, Any]:
        return service.loss(body)

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
    import uvicorn

    app = build(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
