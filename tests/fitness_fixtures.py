"""A deliberately flaky OpenAI-compatible HTTP server on 127.0.0.1, for the API scorer's tests.

A prompt picks its own fault with a prefix, `fault|rest`, so behaviour is deterministic under any
concurrency:
  ok        answer at once
  500x2     HTTP 500 twice, then answer
  429       HTTP 429 with Retry-After: 1 once, then answer
  stall     first request sleeps past the client's timeout, then answer
  badjson   first answer is a truncated JSON body, then answer
  always500 HTTP 500 forever; its body repeats the Authorization header (a hostile server)
  slow      sleep 0.2 s, then answer (to watch concurrency)
The completion text is the prompt's rest, upper-cased, cut to max_tokens. With echo + logprobs, every
prompt character is a token whose log-prob is -0.5 for a vowel (then the argmax) and -2 otherwise.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FlakyServer:
    def __init__(self, key: str | None = None) -> None:
        self.key = key
        self.requests: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> FlakyServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.counts.clear()
            self.max_inflight = 0


def _prompt_of(body: dict[str, Any]) -> str:
    if "messages" in body:
        return str(body["messages"][-1]["content"])
    return str(body.get("prompt", ""))


def _handler(server: FlakyServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            auth = self.headers.get("Authorization", "")
            prompt = _prompt_of(body)
            fault = prompt.split("|", 1)[0] if "|" in prompt else "ok"
            with server.lock:
                server.requests.append({"path": self.path, "body": body, "auth": auth, "time": time.monotonic()})
                n = server.counts[prompt] = server.counts.get(prompt, 0) + 1
            try:
                self._answer(body, auth, prompt, fault, n)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a stall past its timeout)

        def _answer(self, body: dict[str, Any], auth: str, prompt: str, fault: str, n: int) -> None:
            if server.key is not None and auth != f"Bearer {server.key}":
                given = auth.removeprefix("Bearer ")
                return self._send(401, json.dumps({"error": {"message": f"Incorrect API key provided: {given}"}}).encode())
            if fault == "500x2" and n <= 2 or fault == "always500":
                return self._send(500, json.dumps({"error": {"message": f"internal error for {auth}"}}).encode())
            if fault == "429" and n == 1:
                return self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "1"})
            if fault == "stall" and n == 1:
                time.sleep(2.0)
            if fault == "slow":  # counted in flight until just before the answer leaves
                with server.lock:
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                time.sleep(0.2)
                with server.lock:
                    server.inflight -= 1
            if fault == "badjson" and n == 1:
                return self._send(200, b'{"choices": [{"text": "trunc')
            self._send(200, json.dumps(_completion(body, prompt)).encode())

    return Handler


def _completion(body: dict[str, Any], prompt: str) -> dict[str, Any]:
    rest = prompt.split("|", 1)[-1]
    text = rest.upper()[: int(body.get("max_tokens", 16))]
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    if "messages" in body:
        choice["message"] = {"role": "assistant", "content": text}
    elif body.get("echo"):
        tokens = list(prompt) + list(text[:1])
        lps = [None] + [-0.5 if c in "aeiou" else -2.0 for c in tokens[1:]]
        choice.update(text=prompt + text[:1], logprobs={
            "tokens": tokens, "token_logprobs": lps, "text_offset": list(range(len(tokens))),
            "top_logprobs": [None] + [{c: lp, "#": -1.0} for c, lp in zip(tokens[1:], lps[1:])]})
    else:
        choice["text"] = text
    return {"id": "x", "object": "text_completion", "model": body.get("model"), "choices": [choice],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(text), "total_tokens": len(prompt) + len(text)}}
