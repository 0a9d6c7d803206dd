"""Loopback load (issue 23): how long a normal request takes on `evomerge serve` while another client keeps sending the
largest requests the server allows, against the same normal requests with no such client, in one run.

A real `evomerge serve` process over the zoo (BASE, MATH, LANG; 6 layers, a 64-token context) on 127.0.0.1. Normal:
one 4-token completion of a short prompt under a fixed TIES recipe, sent back to back for `--seconds`. Hostile: a
second client sending, back to back, the largest completion allowed (`max_prompts` 64 prompts, max_tokens filling
the context) under the longest data-flow path allowed (6 layers x 3 models x PATH_REPEATS = 72 steps), its scale
changed each time so every one is a new merge. The model serves one request at a time: a normal request waits for
the hostile one in front of it (at most request_timeout, then 503).

    python benchmarks/serve_load.py [--seconds 30] [--out benchmarks/results/serve_load.json]
Prints JSON: p50/p99/max latency and status counts of the normal requests, alone and beside the hostile client, the
ratios, and the hostile requests' own latencies.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ZOO = Path(__file__).resolve().parent.parent / "evomerge" / "zoo" / "models"
MODELS = ["base", "math", "lang"]
NORMAL = {"prompt": "12 plus 30 is ", "max_tokens": 4, "recipe": {
    "merge_method": "ties", "base_model": "base", "models": [{"model": "math", "parameters": {"weight": 1.0, "density": 0.2}},
                                                             {"model": "lang", "parameters": {"weight": 1.0, "density": 0.2}}]}}


def largest(k: int) -> dict:
    steps = [{"model": m, "layer": layer, "scale": 1.0 - 0.001 * (k % 100)} for layer in range(6) for m in MODELS] * 4
    return {"prompt": ["12 plus 30 is "] * 64, "max_tokens": 49, "recipe": {"merge_method": "passthrough", "models": MODELS, "path": steps}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int) -> subprocess.Popen:
    args = [a for m in MODELS for a in ("--model", f"{m}={ZOO / m}")]
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "serve", *args, "--port", str(port), "--rate", "100000",
                             "--burst", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start")


def timed(client: httpx.Client, body: dict) -> tuple[float, int]:
    t = time.perf_counter()
    code = client.post("/v1/completions", json=body).status_code
    return time.perf_counter() - t, code


def summary(runs: list[tuple[float, int]]) -> dict:
    ms = sorted(1000 * t for t, _ in runs)
    codes: dict[str, int] = {}
    for _, c in runs:
        codes[str(c)] = codes.get(str(c), 0) + 1
    return {"requests": len(ms), "p50_ms": round(statistics.median(ms), 1),
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1), "max_ms": round(ms[-1], 1), "status": codes}


def normal_for(url: str, seconds: float) -> list[tuple[float, int]]:
    with httpx.Client(base_url=url, timeout=120) as c:
        out, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            out.append(timed(c, NORMAL))
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    a = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(port)
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            assert timed(c, NORMAL)[1] == 200 and timed(c, largest(0))[1] == 200  # warm-up; the largest is allowed
        alone = normal_for(url, a.seconds)
        stop, hostile = threading.Event(), []

        def flood() -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                k = 1
                while not stop.is_set():
                    hostile.append(timed(c, largest(k)))
                    k += 1

        t = threading.Thread(target=flood)
        t.start()
        time.sleep(0.5)
        beside = normal_for(url, a.seconds)
        stop.set()
        t.join()
    finally:
        proc.terminate()
        proc.wait(30)
    result = {"benchmark": "serve_load", "seconds_per_phase": a.seconds, "cpu_threads": os.cpu_count(),
              "model": "zoo (6 layers, hidden 128, context 64), 3 models", "normal": NORMAL,
              "hostile": "64 prompts of 15 tokens x max_tokens 49 (the 64-token context), a 72-step data-flow path, a new merge each",
              "alone": summary(alone), "beside_hostile": summary(beside), "hostile_requests": summary(hostile)}
    result["p50_ratio"] = round(result["beside_hostile"]["p50_ms"] / result["alone"]["p50_ms"], 1)
    result["p99_ratio"] = round(result["beside_hostile"]["p99_ms"] / result["alone"]["p99_ms"], 1)
    text = json.dumps(result, indent=2)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
