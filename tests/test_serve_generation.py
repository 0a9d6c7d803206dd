"""`evomerge serve` generation on a real uvicorn server on 127.0.0.1: streamed token by token (the stock openai
client), stopped at the compute limit, when its client goes away (a raw socket that hangs up) and on SIGTERM
(a real `evomerge serve` process); in each case the model is freed for the next request."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from evomerge.serve import ServeConfig, build
from tests.test_fitness_serve import BASE_ONLY, PROMPT, Running, chatty, free_port  # noqa: F401  (chatty: a fixture)

# 256 prompts x 250 tokens, one prompt a batch: 64,000 decoding steps of the tiny model, minutes on one core
HEAVY = {"prompt": ["ok"] * 256, "max_tokens": 250, "temperature": 1.0, "recipe": BASE_ONLY}
NORMAL = {"prompt": "ok", "max_tokens": 2, "recipe": BASE_ONLY}


@pytest.fixture(scope="module")
def stream_server(chatty):
    s = Running(build(ServeConfig(sources={"base": str(chatty[0])}, base="base", rate=1000, burst=1000)))
    yield s
    s.stop()


def pieces(chunks, chat: bool = False) -> dict[int, list[str]]:
    """Each choice's streamed text pieces, by index."""
    out: dict[int, list[str]] = {}
    for c in chunks:
        for ch in c.choices:
            out.setdefault(ch.index, []).append(ch.delta.content if chat else ch.text)
    return out


def test_a_stream_comes_token_by_token_and_equals_the_plain_answer(stream_server):
    """Completions and chat, greedy, with a stop string, with echo, n > 1 and several prompts sampled with a
    seed: every choice arrives in several pieces whose concatenation is the non-streamed text."""
    client = openai.OpenAI(base_url=stream_server.url + "/v1", api_key="unused", max_retries=0)
    kw = {"model": "evomerge", "extra_body": {"recipe": BASE_ONLY}}
    cases = [dict(prompt="hi there", max_tokens=12), dict(prompt=PROMPT, max_tokens=12, echo=True),
             dict(prompt=[PROMPT, "hi there"], n=2, max_tokens=10, temperature=1.0, seed=5)]
    plain = client.completions.create(**cases[0], **kw).choices[0].text
    cases.append(dict(prompt="hi there", max_tokens=12, stop=[plain[-3:]]))  # cut inside the answer
    for case in cases:
        want = {c.index: c.text for c in client.completions.create(**case, **kw).choices}
        got = pieces(client.completions.create(**case, stream=True, **kw))
        assert {i: "".join(p) for i, p in got.items()} == want, case
        assert all(len([x for x in p if x]) >= 2 for p in got.values()), got  # several pieces, not one at the end
    assert len(want[0]) < len(plain)  # the stop string did cut

    messages = [{"role": "user", "content": "say something long"}]
    chat = client.chat.completions.create(messages=messages, max_tokens=12, n=2, **kw)
    chunks = list(client.chat.completions.create(messages=messages, max_tokens=12, n=2, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    streamed = pieces(chunks, chat=True)
    roles = {}  # as OpenAI streams: each choice names its role in its first delta only
    for c in chunks:
        for ch in c.choices:
            roles.setdefault(ch.index, []).append(ch.delta.role)
    assert all(r[0] == "assistant" and not any(r[1:]) for r in roles.values()) and len(roles) == 2, roles
    assert {i: "".join(p) for i, p in streamed.items()} == {c.index: c.message.content for c in chat.choices}
    assert all(len([x for x in p if x]) >= 2 for p in streamed.values()), streamed


def test_generation_stops_at_the_compute_limit_and_frees_the_model(tiny_models):
    """A request past `compute_timeout` is a one-line 504, streamed or not (a stream: the pieces made so far,
    then the error event the openai client raises); the next request is answered."""
    s = Running(build(ServeConfig(sources={"base": str(tiny_models["base"])}, base="base", batch_size=1,
                                  max_prompts=256, compute_timeout=0.5)))
    try:
        r = httpx.post(s.url + "/v1/completions", json=HEAVY, timeout=60)
        assert (r.status_code, r.json()["error"]["message"]) == (504, "generation stopped at the compute limit of 0.5 s")
        assert httpx.post(s.url + "/v1/completions", json=NORMAL, timeout=30).status_code == 200

        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        received = []
        with pytest.raises(openai.APIError, match="generation stopped at the compute limit of 0.5 s"):
            for chunk in client.completions.create(model="evomerge", stream=True, extra_body={"recipe": BASE_ONLY},
                                                   **{k: v for k, v in HEAVY.items() if k != "recipe"}):
                received.append(chunk)
        assert received and all(c.choices[0].finish_reason is None for c in received)  # pieces came before the end
        assert httpx.post(s.url + "/v1/completions", json=NORMAL, timeout=30).status_code == 200
    finally:
        s.stop()


def raw_request(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_frees_the_model(tiny_models, stream):
    """A raw-socket client sends a generation of minutes and hangs up (streamed: after its first piece, so it
    is mid-generation); a normal request waiting at most 5 s for the model is then answered, not refused (503)."""
    s = Running(build(ServeConfig(sources={"base": str(tiny_models["base"])}, base="base", batch_size=1,
                                  max_prompts=256, request_timeout=5)))
    try:
        sock = raw_request(s.port, {**HEAVY, "stream": stream})
        if stream:
            seen = b""
            while b"data: " not in seen:
                seen += sock.recv(4096)
            assert seen.startswith(b"HTTP/1.1 200")
        else:
            time.sleep(1)
        sock.close()
        r = httpx.post(s.url + "/v1/completions", json=NORMAL, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        s.stop()


def healthy(proc: subprocess.Popen, port: int) -> None:
    """Wait for a real `evomerge serve` process to answer /health."""
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "no start"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


def test_sigterm_stops_a_generation_in_flight_and_exits(tiny_models):
    """A real `evomerge serve` process with the CLI's limits: SIGTERM during a streamed generation of minutes
    (and with requests waiting for the model) ends the stream with a 503 event, refuses the waiting requests
    with 503, and the process exits by itself, long before the 30 s grace would abandon work."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "serve", "--model", f"base={tiny_models['base']}",
                             "--port", str(port), "--request-timeout", "50", "--compute-timeout", "100",
                             "--shutdown-grace", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        healthy(proc, port)
        heavy = {**HEAVY, "prompt": ["ok"] * 64}  # the CLI's default of 64 prompts a request: tens of seconds
        waiting: list[httpx.Response] = []
        waiters = [threading.Thread(target=lambda: waiting.append(
            httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=heavy, timeout=60))) for _ in range(3)]
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json={**heavy, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")  # generating, the model held
            for t in waiters:
                t.start()
            time.sleep(0.5)  # the waiters reach the model's lock
            proc.send_signal(signal.SIGTERM)
            events = [line for line in lines if line]
        proc.wait(timeout=30)
        for t in waiters:
            t.join(30)
        err = proc.stderr.read()
        last = json.loads(events[-1][6:])
        assert last["error"] == {"message": "the server is shutting down", "code": 503}, events[-3:]
        assert [(w.status_code, w.json()["error"]["message"]) for w in waiting] == [(503, "the server is shutting down")] * 3
        assert "abandoned" not in err and "Traceback" not in err, err
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("flag", ["--request-timeout", "--compute-timeout", "--shutdown-grace"])
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_serve_time_limits_must_be_positive(flag, value, tmp_path):
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", "serve", "--model", f"base={tmp_path}", flag, value],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (2, f"evomerge: error: {flag} must be a positive number of seconds, got {value}\n")


def test_sigterm_abandons_a_loss_still_running_after_the_grace(tiny_models, tmp_path):
    """A loss is not cut per token: SIGTERM while one runs over 40,000 examples (far more than the 1 s grace)
    ends the real `evomerge serve` process with the one-line notice, the loss never answered."""
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {a} plus {a}? " * 8, "reference": str(2 * a)}) + "\n"
                            for a in range(40_000)))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "serve", "--model", f"base={tiny_models['base']}",
                             "--dataset", f"big={data}", "--port", str(port), "--shutdown-grace", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        healthy(proc, port)
        answered: list[httpx.Response] = []

        def loss() -> None:
            try:
                answered.append(httpx.post(f"http://127.0.0.1:{port}/v1/loss", json={"dataset": "big", "recipe": BASE_ONLY},
                                           timeout=120))
            except httpx.TransportError:  # the process went away mid-request, as it should
                pass

        t = threading.Thread(target=loss, daemon=True)
        t.start()
        time.sleep(1)  # the loss holds the model
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        t.join(30)
        err = proc.stderr.read()
        assert not answered and "work still in flight 1 s after the stop signal is abandoned" in err, err
        assert "Traceback" not in err, err
    finally:
        proc.kill()
        proc.wait()
