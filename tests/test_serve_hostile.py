"""Hostile clients against a real `evomerge serve` process on 127.0.0.1 (raw HTTP): every case is answered with its
status in the documented one-line {"error": ...} shape, then the server still answers a normal request and its
resident memory (VmRSS of the server process) is back within RSS_MARGIN of its baseline after a warm-up that ran
each endpoint once at its largest allowed size. A seeded fuzz of 2,000 mutated requests gives no 500."""
from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fuzz_fixtures import encode, mutate
from test_fitness_serve import DEEP, free_port, recipe

RSS_MARGIN_MB = 64  # the bound every case is held to, over the warmed-up baseline (README's serve section)
NORMAL = {"prompt": "ok", "max_tokens": 2, "recipe": recipe(1, 1).to_dict()}


class ServeProcess:
    """`evomerge serve` as its own process, as a user starts it."""

    def __init__(self, models: dict[str, Path], dataset: Path) -> None:
        self.port = free_port()
        args = [a for name, p in models.items() for a in ("--model", f"{name}={p}")]
        self.proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "serve", *args, "--dataset", f"sums={dataset}",
                                      "--port", str(self.port), "--rate", "100000", "--burst", "100000"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "server did not start"
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def post(self, path: str, body: Any = None, **kw) -> httpx.Response:
        if body is not None:
            kw["content"] = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return self.client.post(path, headers={"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)

    def stop(self) -> str:
        self.client.close()
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err


@pytest.fixture(scope="module")
def chat_models(tiny_models, tmp_path_factory):
    """The tiny host with a chat template on its base, so chat requests reach the model."""
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("hostile") / "base"
    shutil.copytree(tiny_models["base"], base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    tok.save_pretrained(base)
    return {"base": base, "a": tiny_models["a"], "b": tiny_models["b"]}


def longest_path() -> dict[str, Any]:
    """The longest recipe a data-flow search over the host makes (3 models x 4 layers, 3 repeats: 37 steps)."""
    import numpy as np

    from evomerge.search_spaces.data_flow import DataFlow

    space = DataFlow(["base", "a", "b"], 4)
    return space.decode(np.concatenate([np.full(space.num_slots, 0.5), np.ones(12 * 12)])).to_dict()


LARGEST = {"prompt": ["ok"] * 64, "max_tokens": 250, "recipe": longest_path()}  # 64 prompts x the context


@pytest.fixture(scope="module")
def served(chat_models, tmp_path_factory):
    dataset = tmp_path_factory.mktemp("hostile-data") / "sums.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"what is {a} plus {a}? answer ", "reference": str(2 * a)}) + "\n"
                               for a in range(10, 16)))
    s = ServeProcess(chat_models, dataset)
    for path, body in [("/v1/completions", NORMAL), ("/v1/completions", LARGEST),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "recipe": NORMAL["recipe"]}),
                       ("/v1/loss", {"dataset": "sums", "recipe": longest_path()}), ("/v1/completions", NORMAL)]:
        assert s.post(path, body).status_code == 200  # warm-up: every endpoint once, the largest allowed work once
    s.baseline = s.peak = s.rss_mb()
    yield s
    print(f"server RSS: baseline {s.baseline:.0f} MB, highest after a case {s.peak:.0f} MB")
    err = s.stop()
    assert "Traceback" not in err, err[-3000:]


def one_line_error(r: httpx.Response, status: int, needle: str = "") -> None:
    msg = r.json()["error"]["message"]
    assert (r.status_code, "\n" in msg, "Traceback" in r.text) == (status, False, False) and needle in msg, (r.status_code, r.text[:500])


def still_fine(s: ServeProcess, case: str) -> None:
    assert s.post("/v1/completions", NORMAL).status_code == 200, case
    rss = s.rss_mb()
    assert rss <= s.baseline + RSS_MARGIN_MB, f"{case}: RSS {rss:.0f} MB, baseline {s.baseline:.0f} MB + {RSS_MARGIN_MB}"
    s.peak = max(s.peak, rss)


def chunks(n: int):
    for _ in range(n // 65536):
        yield b"x" * 65536


CASES = [  # name, path, body, status, message
    ("990 KB prompt", "/v1/completions", {**NORMAL, "prompt": "x" * 990_000}, 400, "over the model's context of 256 tokens"),
    ("10 MB body", "/v1/completions", b"x" * 10_000_000, 413, "request body over 1000000 bytes"),
    ("5 MB chunked body", "/v1/completions", None, 413, "request body over 1000000 bytes"),
    ("over-long path", "/v1/completions", {**NORMAL, "recipe": {"merge_method": "passthrough", "path": [{"model": "a", "layer": 0}] * 2000}},
     400, "more than 48 data-flow path steps"),
    ("nested recipes", "/v1/completions", {**NORMAL, "recipe": DEEP}, 400, "more than 4 nested recipes"),
    ("JSON nested 5000 deep", "/v1/completions", '{"prompt": "ok", "recipe": {"parameters": {"w": ' + "[" * 5000 + "]" * 5000 + "}}}",
     400, "There was an error parsing the body"),
    ("slice of 1e9 layers", "/v1/loss", {"dataset": "sums", "recipe": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 10**9]}]}]}}, 400, "more than 48 slice layers"),
    ("seed 'abc'", "/v1/completions", {**NORMAL, "recipe": {**NORMAL["recipe"], "seed": "abc"}}, 400, "recipe.seed"),
    ("weight 1e308", "/v1/completions", {**NORMAL, "temperature": 0.8, "recipe": recipe(1e308, 1).to_dict()}, 400, "must be finite"),
    ("64 prompts x 512 tokens", "/v1/completions", {**LARGEST, "max_tokens": 512}, 400, "max_tokens 512 that is over"),
    ("chat n=16 near the context", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 40}], "n": 16,
                                                            "max_tokens": 100, "recipe": longest_path()}, 200, ""),
]  # the largest allowed request (LARGEST) is the warm-up's: the baseline is taken after it


@pytest.mark.parametrize("name, path, body, status, message", CASES, ids=[c[0] for c in CASES])
def test_each_hostile_case_is_answered_and_leaves_the_server_answering_within_its_memory_bound(served, name, path, body,
                                                                                             status, message):
    r = served.post(path, content=chunks(5_000_000)) if body is None else served.post(path, body)
    if status == 200:
        assert r.status_code == 200, r.text[:500]
    else:
        one_line_error(r, status, message)
    still_fine(served, name)



def test_the_stock_openai_client_gets_what_it_asks_or_a_400_naming_it(served):
    """The issue's openai-client cases against the real process, each followed by a normal request and the RSS bound."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="unused", max_retries=0)
    extra = {"recipe": NORMAL["recipe"]}
    pieces = list(client.completions.create(model="evomerge", prompt="ok", max_tokens=6, stream=True, extra_body=extra))
    plain = client.completions.create(model="evomerge", prompt="ok", max_tokens=6, extra_body=extra).choices[0].text
    assert "".join(c.choices[0].text for c in pieces if c.choices) == plain and len(pieces) >= 2
    still_fine(served, "stream=True")
    assert len(client.completions.create(model="evomerge", prompt="ok", max_tokens=2, n=3, extra_body=extra).choices) == 3
    still_fine(served, "n=3")
    chat = client.chat.completions.create(model="evomerge", messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=3, extra_body=extra)
    assert chat.usage.completion_tokens <= 3
    still_fine(served, "max_completion_tokens")
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="evomerge", prompt="ok", max_tokens=2, logprobs=2, extra_body=extra)
    still_fine(served, "logprobs without echo")


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_mid_generation_leaves_the_server_within_its_bound(served, stream):
    from test_serve_generation import raw_request

    sock = raw_request(served.port, {**LARGEST, "max_tokens": 100, "stream": stream})
    if stream:
        seen = b""
        while b"data: " not in seen:
            seen += sock.recv(4096)
    else:
        time.sleep(0.5)
    sock.close()
    still_fine(served, f"hang-up (stream={stream})")


# -- the fuzz --------------------------------------------------------------------------------------------------
EXTRA = ["extra", "n", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "seed", "stop", "user", "suffix",
         "best_of", "tools", "slices", "path", "base_model", "parameters", "dtype", "tokenizer_source", "models", ""]
RECIPES = [
    {"merge_method": "ties", "base_model": "base", "parameters": {"density": [0.2, 0.8], "normalize": True},
     "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}]},
    {"merge_method": "passthrough", "path": [{"model": "a", "layer": 0}, {"model": "b", "layer": 1, "scale": 0.5}, {"model": "base", "layer": 3}]},
    {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}, {"sources": [{"model": "b", "layer_range": [2, 4]}]}]},
    {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.3}, "models": ["a", "b"]},
    {"merge_method": "linear", "models": [{"model": {"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.5}}]}, "name": "inner", "parameters": {"weight": 1.0}}]},
    recipe(0.7, 0.3).to_dict(),
]


def valid(rng: random.Random) -> tuple[str, dict[str, Any]]:
    r = rng.choice(RECIPES)
    return rng.choice([
        ("/v1/completions", {"prompt": rng.choice(["ok", ["ok", "hi"]]), "max_tokens": 2, "n": 1, "echo": False, "temperature": 0.5,
                             "top_p": 0.9, "stop": ["\n"], "seed": 3, "recipe": r}),
        ("/v1/completions", {"prompt": "ok", "max_tokens": 1, "echo": True, "logprobs": 2, "recipe": r}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2, "stream": True,
                                  "stream_options": {"include_usage": True}, "recipe": r}),
        ("/v1/loss", {"dataset": "sums", "limit": 1, "recipe": r}),
    ])


def test_fuzz_of_2000_mutated_requests_is_never_a_500(served):
    """2,000 seeded mutations of valid completion, chat (streamed), loss and recipe bodies: no 500, every non-200 the
    one-line {"error": {"message", "code"}} shape, and the server answers normally within its memory bound after."""
    rng = random.Random(23)
    codes: dict[int, int] = {}
    for i in range(2000):
        path, body = valid(rng)
        for _ in range(rng.choice([1, 1, 2, 3])):
            body = mutate(body, rng, EXTRA)
        r = served.post(path, encode(json.dumps(body), rng))
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        assert r.status_code in (200, 400, 404, 413), (i, r.status_code, r.text[:500])
        if r.status_code != 200:
            err = r.json()["error"]
            assert err["code"] == r.status_code and "\n" not in err["message"] and "Traceback" not in r.text, r.text[:500]
        if i % 500 == 499:
            still_fine(served, f"after {i + 1} mutations")
    print(f"fuzz status counts: {codes}")
    assert codes[400] > 1000 and codes.get(200, 0) > 50, codes  # most are bad input, enough stay valid to reach the model
