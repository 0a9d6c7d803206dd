"""The API-only scorer against a real, deliberately flaky HTTP server on 127.0.0.1."""
from __future__ import annotations

import json
import logging
import socket

import pytest
from fitness_fixtures import FlakyServer

from evomerge.recipe import ModelRef, Recipe
from evomerge.records import Candidate, UserError
from evomerge.run.worker import Worker
from evomerge.fitness.api import APIError, APIHandle, retry_after
from evomerge.fitness.handle import Sampling
from evomerge.fitness.suite import TaskFitness

KEY = "sk-test-7f3a9c1e55d2b8406"
ENV = "EVOMERGE_TEST_API_KEY"
RECIPE = Recipe(merge_method="linear", models=[ModelRef("a", {"weight": 0.5}), ModelRef("b", {"weight": 0.5})])


@pytest.fixture(scope="module")
def server():
    s = FlakyServer(key=KEY).start()
    yield s
    s.stop()


@pytest.fixture
def api(server, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    server.reset()

    def make(**kw):
        opts = dict(base_url=server.url, model="m", api_key_env=ENV, timeout=0.5, max_retries=3, backoff=0.01)
        return APIHandle(**{**opts, **kw})

    return make


def tries(server, prompt):
    return [r for r in server.requests if (r["body"].get("prompt") or r["body"].get("messages", [{}])[-1].get("content")) == prompt]


def test_retries_through_every_fault(api, server):
    h = api()
    prompts = ["ok|ab", "500x2|cd", "429|ef", "stall|gh", "badjson|ij"]
    assert h.generate(prompts, Sampling(max_new_tokens=5)) == ["AB", "CD", "EF", "GH", "IJ"]
    assert [len(tries(server, p)) for p in prompts] == [1, 3, 2, 2, 2]
    first, second = tries(server, "429|ef")
    assert second["time"] - first["time"] >= 0.95  # Retry-After: 1 honoured although the backoff is 0.01 s
    assert all(r["auth"] == f"Bearer {KEY}" for r in server.requests)
    cost = h.pop_cost()
    assert cost["requests"] == 10 and cost["retries"] == 5 and "failures" not in cost
    assert cost["prompt_tokens"] == sum(map(len, prompts)) and cost["completion_tokens"] == 10
    assert h.pop_cost() == {}


def test_concurrency_is_limited(api, server):
    h = api(concurrency=2)
    assert h.generate([f"slow|{i}" for i in range(6)], Sampling(max_new_tokens=3)) == [str(i) for i in range(6)]
    assert server.max_inflight == 2


def task_file(tmp_path, prompts):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps({"prompt": p, "reference": p.split("|")[1].upper()}) + "\n" for p in prompts))
    return f


def test_failure_after_the_budget_is_recorded_and_the_run_goes_on(api, server, tmp_path):
    h = api(send_recipe=True, max_retries=2)
    bad = TaskFitness.from_config([{"name": "t", "path": str(task_file(tmp_path, ["ok|a", "always500|b"]))}])
    good = TaskFitness.from_config([{"name": "t", "path": str(task_file(tmp_path, ["ok|a", "ok|bb"]))}])
    failed = Worker(bad, handle=h, decode=lambda x: RECIPE).evaluate(Candidate(0, [0.5]))
    assert failed.status == "failed" and "failed after 3 tries: HTTP 500" in failed.error and "\n" not in failed.error
    assert len(tries(server, "always500|b")) == 3
    ok = Worker(good, handle=h, decode=lambda x: RECIPE).evaluate(Candidate(1, [0.5]))
    assert ok.status == "ok" and ok.objectives == {"acc/t": 1.0} and ok.per_example == [1.0, 1.0]
    assert server.requests[-1]["body"]["recipe"] == RECIPE.to_dict()  # the recipe travels with the request
    assert KEY not in json.dumps(failed.to_dict()) + json.dumps(ok.to_dict())


def test_cache_never_pays_twice(api, server, tmp_path):
    cache = tmp_path / "cache.sqlite"
    fit = TaskFitness.from_config([{"name": "t", "path": str(task_file(tmp_path, ["ok|a", "500x2|b", "ok|c"]))}])
    h = api(send_recipe=True, cache=str(cache))
    h.set_recipe(RECIPE)
    first = fit.evaluate(h)
    assert first.objectives["acc/t"] == 1.0 and first.cost["requests"] == 5 and first.cost["prompt_tokens"] == 15
    n = len(server.requests)
    again = api(send_recipe=True, cache=str(cache))  # a resumed run: a new process, the same cache file
    again.set_recipe(RECIPE)
    second = fit.evaluate(again)
    assert len(server.requests) == n and second.objectives == first.objectives
    assert second.cost == {"cached": 3.0}
    other = Recipe(merge_method="linear", models=[ModelRef("a", {"weight": 0.9}), ModelRef("b", {"weight": 0.1})])
    again.set_recipe(other)  # another recipe is another request
    assert fit.evaluate(again).cost["requests"] == 3 and len(server.requests) == n + 3
    assert KEY.encode() not in cache.read_bytes()


def test_key_never_leaks(api, server, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    h = api(max_retries=2)
    texts = []
    with pytest.raises(APIError) as e:
        h.generate(["always500|x"])  # the hostile server echoes the Authorization header in its error body
    texts.append(str(e.value))
    monkeypatch.setenv(ENV, KEY + "-wrong")
    with pytest.raises(UserError) as e:
        api().generate(["ok|x"])
    texts += [str(e.value), repr(h), caplog.text, json.dumps(h.pop_cost())]
    assert caplog.text  # the retries were logged
    assert all(KEY not in t for t in texts), texts


def test_wrong_key_is_one_line_and_not_retried(api, server, monkeypatch):
    monkeypatch.setenv(ENV, "sk-wrong")
    with pytest.raises(UserError) as e:
        api().generate(["ok|x"])
    assert str(e.value) == f"m at {server.url}/completions refused the API key in ${ENV} (HTTP 401)"
    assert len(server.requests) == 1
    monkeypatch.delenv(ENV)
    with pytest.raises(UserError, match=f"environment variable {ENV} .* is not set"):
        api()


def test_unreachable_endpoint_is_one_line():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    h = APIHandle(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout=1, max_retries=1, backoff=0.01)
    with pytest.raises(UserError) as e:
        h.check()
    assert str(e.value) == f"m at http://127.0.0.1:{port}/v1/completions failed after 1 tries: cannot connect (ConnectError)"
    with pytest.raises(APIError, match="failed after 2 tries: cannot connect"):
        h.generate(["x"])


def test_teacher_forced_scores_from_echo(api, server):
    h = api()
    prompt, cont = "ok|hello ", "aeb xo"
    (s,) = h.score([(prompt, cont)])
    assert s.logprobs == [-0.5, -0.5, -2.0, -2.0, -2.0, -0.5] and s.greedy == [True, True, False, False, False, True]
    body = server.requests[-1]["body"]
    assert body["echo"] and body["prompt"] == prompt + cont
    with pytest.raises(UserError, match="end-of-sequence"):
        h.score([(prompt, cont)], eos=True)


def test_chat_mode(api, server):
    h = api(mode="chat")
    assert h.generate([[{"role": "system", "content": "s"}, {"role": "user", "content": "ok|hey"}], "ok|yo"]) == ["HEY", "YO"]
    assert server.requests[-1]["path"] == "/v1/chat/completions"
    with pytest.raises(UserError, match="mode: chat"):
        api().generate([[{"role": "user", "content": "x"}]])
    with pytest.raises(UserError, match="send_recipe: true"):
        api().set_recipe(RECIPE)


def test_retry_after_header_forms():
    assert retry_after("2") == 2.0 and retry_after(None) is None and retry_after("soon") is None
    assert 0 <= retry_after("Wed, 21 Oct 2015 07:28:00 GMT") < 1  # a date in the past: no wait
