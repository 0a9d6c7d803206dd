"""`evomerge serve` for real on 127.0.0.1: answers equal a local HF handle holding the same merge, bad
input is a one-line 4xx, limits hold, and an API-only client searches through it."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from evomerge.merge import Materializer
from evomerge.recipe import ModelRef, Recipe
from evomerge.records import Candidate, UserError
from evomerge.serve import ServeConfig, build
from evomerge.run.worker import Worker
from evomerge.fitness.api import APIHandle
from evomerge.fitness.handle import Sampling
from evomerge.fitness.hf import HFHandle
from evomerge.fitness.remote import RemoteLossFitness
from evomerge.fitness.suite import TaskFitness

TOKEN = "serve-token-93ac1f0e"


def recipe(wa: float, wb: float) -> Recipe:
    return Recipe(merge_method="task_arithmetic", base_model="base",
                  models=[ModelRef("a", {"weight": wa}), ModelRef("b", {"weight": wb})])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server in a thread of this process."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    f = tmp_path_factory.mktemp("serve") / "sums.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"what is {a} plus {a}? answer ", "reference": str(2 * a)}) + "\n"
                         for a in range(10, 16)))
    return f


@pytest.fixture(scope="module")
def server(tiny_models, dataset):
    os.environ["EVOMERGE_TEST_SERVE_TOKEN"] = TOKEN
    cfg = ServeConfig(sources={k: str(v) for k, v in tiny_models.items()}, base="base", datasets={"sums": str(dataset)},
                      token_env="EVOMERGE_TEST_SERVE_TOKEN", max_body=20_000, rate=1000, burst=1000)
    s = Running(build(cfg))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(tiny_models):
    return HFHandle(tiny_models["base"], Materializer(dict(tiny_models)), batch_size=4)


@pytest.fixture
def remote(server, monkeypatch):
    monkeypatch.setenv("EVOMERGE_TEST_SERVE_TOKEN", TOKEN)

    def make(**kw):
        return APIHandle(base_url=server.url + "/v1", model="evomerge", api_key_env="EVOMERGE_TEST_SERVE_TOKEN",
                         send_recipe=True, timeout=30, max_retries=0, **kw)

    return make


PROMPTS = ["what is 12 plus 30? answer ", "hi there", "copy 11 22? answer "]


def test_completions_equal_a_local_handle_with_the_same_merge(remote, local):
    h = remote()
    for r in (recipe(1.0, 0.0), recipe(2.0, 3.0)):
        h.set_recipe(r)
        local.set_recipe(r)
        assert h.generate(PROMPTS, Sampling(max_new_tokens=6)) == local.generate(PROMPTS, Sampling(max_new_tokens=6))
        pairs = [(p, "42 ok") for p in PROMPTS]
        for got, want in zip(h.score(pairs), local.score(pairs)):
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4) and got.greedy == want.greedy


def test_prompts_batched_per_request_are_answered_and_cached_one_by_one(remote, local, tmp_path):
    prompts = [f"what is {a} plus 1? answer " for a in range(10, 17)]
    h = remote(batch_prompts=3, cache=str(tmp_path / "c.sqlite"))
    r = recipe(0.5, 1.5)
    h.set_recipe(r)
    local.set_recipe(r)
    want = local.generate(prompts, Sampling(max_new_tokens=4))
    assert h.generate(prompts, Sampling(max_new_tokens=4)) == want and h.pop_cost()["requests"] == 3  # 3 + 3 + 1 prompts
    pairs = [(p, "11") for p in prompts]
    flat = [lp for s in h.score(pairs) for lp in s.logprobs]
    assert flat == pytest.approx([lp for s in local.score(pairs) for lp in s.logprobs], abs=1e-4)
    h.pop_cost()
    one_by_one = remote(cache=str(tmp_path / "c.sqlite"))  # same cache keys whatever the batch size
    one_by_one.set_recipe(r)
    assert one_by_one.generate(prompts, Sampling(max_new_tokens=4)) == want and one_by_one.pop_cost() == {"cached": 7.0}


def test_loss_endpoint_equals_the_local_loss(remote, local, dataset):
    h = remote()
    r = recipe(1.5, 0.5)
    h.set_recipe(r)
    local.set_recipe(r)
    res = RemoteLossFitness("sums").evaluate(h)
    want = TaskFitness.from_config([{"name": "sums", "path": str(dataset), "metrics": ["loss"]}]).evaluate(local)
    assert res.objectives["loss/sums"] == pytest.approx(want.objectives["loss/sums"], abs=1e-5)
    assert res.per_example == pytest.approx(want.per_example, abs=1e-5)
    assert res.cost["requests"] == 1


def test_chat_without_a_template_is_a_400(remote):
    h = remote(mode="chat")
    h.set_recipe(recipe(1, 1))
    with pytest.raises(Exception, match="HTTP 400: this model has no chat template: send a plain prompt to /v1/completions$"):
        h.generate([[{"role": "user", "content": "hi"}]])  # and no server path in it


def post(server, path, body, token=TOKEN, headers=None, **kw):
    headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    return httpx.post(server.url + path, headers=headers, timeout=30, **({"json": body} if body is not None else {}), **kw)


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/completions", {"prompt": "x"}, 400, "recipe: Field required"),
    ("/v1/completions", {"prompt": "x", "recipe": {"merge_method": "linear", "models": ["zzz", "a"]}}, 400,
     "recipe: model 'zzz' is not on this host (models: base, a, b)"),
    ("/v1/completions", {"prompt": "x", "recipe": {"merge_method": "nope", "models": ["a", "b"]}}, 400, "recipe: "),
    ("/v1/completions", {"prompt": "x", "recipe": {"merge_methd": "linear"}}, 400, "recipe: unknown recipe key 'merge_methd'"),
    ("/v1/completions", {"prompt": "x", "recipe": {"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": "heavy"}}, "b"]}}, 400, "recipe"),
    ("/v1/completions", {"prompt": "x", "recipe": {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 1.0, "density": 1.7}}]}}, 400,
     "recipe: parameter 'density' for model 'a' must be in [0, 1], got 1.7"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many", "recipe": {}}, 400, "max_tokens: "),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000, "recipe": recipe(1, 1).to_dict()}, 400, "max_tokens is at most 512"),
    ("/v1/completions", {"prompt": [], "recipe": recipe(1, 1).to_dict()}, 400, "1 to 64 prompts"),
    ("/v1/loss", {"dataset": "nope", "recipe": recipe(1, 1).to_dict()}, 404, "no dataset 'nope' (datasets: sums)"),
    ("/v1/loss", {"dataset": "sums", "recipe": recipe(1, 1).to_dict(), "extra": 1}, 400, "extra: Extra inputs"),
])
def test_bad_input_is_a_one_line_4xx(server, path, body, status, message):
    r = post(server, path, body)
    msg = r.json()["error"]["message"]
    assert r.status_code == status and message in msg and "\n" not in msg, (r.status_code, msg)


def test_malformed_json_too_large_and_auth(server):
    r = post(server, "/v1/completions", None, content=b'{"prompt": "x", "reci', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"prompt": "x" * 30_000, "recipe": {}})
    assert r.status_code == 413 and r.json()["error"]["message"] == "request body over 20000 bytes"
    assert post(server, "/v1/completions", {"prompt": "x"}, token=None).status_code == 401
    assert post(server, "/v1/completions", {"prompt": "x"}, token="wrong").status_code == 401
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert post(server, "/v1/completions", {"prompt": "ok", "max_tokens": 2, "recipe": recipe(1, 1).to_dict()}).status_code == 200


def test_rate_limit_answers_429_with_retry_after(tiny_models):
    cfg = ServeConfig(sources={k: str(v) for k, v in tiny_models.items()}, base="base", rate=0.5, burst=2)
    s = Running(build(cfg))
    try:
        codes = [httpx.get(s.url + "/v1/models").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    finally:
        s.stop()


def test_refuses_a_public_bind_without_a_token(tiny_models, monkeypatch):
    cfg = ServeConfig(sources={k: str(v) for k, v in tiny_models.items()}, base="base", host="0.0.0.0")
    with pytest.raises(UserError, match="refusing to serve on 0.0.0.0 without a bearer token"):
        build(cfg)
    monkeypatch.setenv("EVOMERGE_TEST_SERVE_TOKEN", TOKEN)
    cfg.token_env = "EVOMERGE_TEST_SERVE_TOKEN"
    assert cfg.token() == TOKEN  # with a token the bind is allowed
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "serve", "--model", f"base={tiny_models['base']}",
                          "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "refusing to serve on 0.0.0.0 without a bearer token" in out.stderr


def test_api_only_search_end_to_end(remote, local, dataset, tmp_path):
    """A search whose only access to the models is HTTP: an optimizer's candidates decoded to recipes,
    scored through the service, and the best candidate's score reproduced by a local handle."""
    from evomerge import optimizers
    from evomerge.records import Objective

    h = remote(cache=str(tmp_path / "cache.sqlite"))
    fit = RemoteLossFitness("sums")
    worker = Worker(fit, handle=h, decode=lambda x: recipe(float(x[0]), float(x[1])))
    opt = optimizers.make("cmaes", bounds=[[0.0, 2.0], [0.0, 2.0]], objectives=[Objective("loss/sums", "min")], seed=0)
    xs, evals = {}, []
    while len(evals) < 8:
        for cand in opt.ask(4):
            xs[cand.id] = cand.x
            evals.append(worker.evaluate(cand))
        opt.tell(evals[-4:])
    assert all(e.status == "ok" for e in evals), [e.error for e in evals if e.error]
    assert len({e.objectives["loss/sums"] for e in evals}) > 1  # the recipes made a difference
    best = min(evals, key=lambda e: e.objectives["loss/sums"])
    local.set_recipe(recipe(*xs[best.candidate_id]))
    want = TaskFitness.from_config([{"name": "sums", "path": str(dataset), "metrics": ["loss"]}]).evaluate(local)
    assert best.objectives["loss/sums"] == pytest.approx(want.objectives["loss/sums"], abs=1e-5)
    assert best.cost["requests"] == 1 and best.per_example == pytest.approx(want.per_example, abs=1e-5)


def test_a_lora_expert_on_the_host_answers_as_its_merged_delta(tiny_models, tmp_path, monkeypatch):
    """An expert given as a PEFT-format LoRA adapter: the host answers a recipe over it exactly as a local
    handle over a full checkpoint holding base + (alpha/r) B @ A, computed here directly."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    base = load_file(tiny_models["base"] / "model.safetensors")
    gen = torch.Generator().manual_seed(5)
    factors, merged = {}, dict(base)
    for layer in range(4):
        for mod in ("self_attn.q_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{mod}"
            out_dim, in_dim = base[f"{name}.weight"].shape
            a, b = torch.randn(4, in_dim, generator=gen) * 0.3, torch.randn(out_dim, 4, generator=gen) * 0.3
            factors[f"base_model.model.{name}.lora_A.weight"], factors[f"base_model.model.{name}.lora_B.weight"] = a, b
            merged[f"{name}.weight"] = base[f"{name}.weight"] + (16 / 4) * b @ a
    adapter = tmp_path / "lora"
    adapter.mkdir()
    save_file(factors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 16,
                                                             "target_modules": ["q_proj", "down_proj"]}))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["base"]))
    model.load_state_dict(merged)
    model.save_pretrained(tmp_path / "full")

    monkeypatch.setenv("EVOMERGE_TEST_SERVE_TOKEN", TOKEN)
    s = Running(build(ServeConfig(sources={"base": str(tiny_models["base"]), "a": str(tiny_models["a"]), "lora": str(adapter)},
                                  base="base", rate=1000, burst=1000)))
    try:
        local = HFHandle(tiny_models["base"], Materializer({"base": tiny_models["base"], "a": tiny_models["a"],
                                                            "lora": tmp_path / "full"}), batch_size=4)
        h = APIHandle(base_url=s.url + "/v1", model="evomerge", api_key_env="EVOMERGE_TEST_SERVE_TOKEN",
                      send_recipe=True, timeout=30, max_retries=0)
        outputs = []
        for wl in (0.0, 1.0):
            r = Recipe(merge_method="task_arithmetic", base_model="base",
                       models=[ModelRef("a", {"weight": 0.5}), ModelRef("lora", {"weight": wl})])
            h.set_recipe(r)
            local.set_recipe(r)
            outputs.append(h.generate(PROMPTS, Sampling(max_new_tokens=6)))
            assert outputs[-1] == local.generate(PROMPTS, Sampling(max_new_tokens=6))
            pairs = [(p, "42 ok") for p in PROMPTS]
            for got, want in zip(h.score(pairs), local.score(pairs)):
                assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
        assert outputs[0] != outputs[1]  # the adapter's delta changes the answers
    finally:
        s.stop()


def test_remote_loss_from_a_run_config(server, local, dataset, tmp_path, monkeypatch):
    """`fitness.remote_loss` in a run config: the engine searches through the service's loss endpoint, and
    every stored loss is the local loss of the recipe stored beside it."""
    from evomerge.run.assemble import open_engine
    from evomerge.config import parse_config
    from evomerge.results.journal import open_run

    monkeypatch.setenv("EVOMERGE_TEST_SERVE_TOKEN", TOKEN)
    handle = {"base_url": server.url + "/v1", "model": "evomerge", "api_key_env": "EVOMERGE_TEST_SERVE_TOKEN",
              "send_recipe": True, "max_retries": 0}
    cfg = {"space": {"name": "layer_weights", "options": {"sources": ["a", "b"], "base": "base", "num_layers": 4,
                                                          "method": "task_arithmetic", "normalize": False}},
           "optimizer": {"name": "random"}, "budget": {"evaluations": 3}, "seed": 1,
           "fitness": {"backend": "api", "handle": handle, "remote_loss": {"dataset": "sums"}}}
    open_engine(parse_config(cfg), tmp_path / "run", resume=False).run()
    run = open_run(tmp_path / "run")
    try:
        df = run.frame()
        assert list(df.status) == ["ok"] * 3 and df["loss/sums"].nunique() == 3
        want = TaskFitness.from_config([{"name": "sums", "path": str(dataset), "metrics": ["loss"]}])
        for cid, loss in zip(df["id"], df["loss/sums"]):
            local.set_recipe(run.recipe(int(cid)))
            assert loss == pytest.approx(want.evaluate(local).objectives["loss/sums"], abs=1e-5)
    finally:
        run.close()


@pytest.mark.parametrize("fitness, needle", [
    ({"backend": "hf", "remote_loss": {"dataset": "sums"}}, "fitness.remote_loss needs backend: api"),
    ({"backend": "api", "remote_loss": {"dataset": "sums"}, "tasks": []}, "give exactly one of fitness.tasks"),
    ({"backend": "api", "remote_loss": {"datset": "sums"}}, "fitness.remote_loss.dataset is required"),
])
def test_remote_loss_config_mistakes_are_one_line(fitness, needle):
    from evomerge.config import parse_config

    with pytest.raises(UserError, match=needle):
        parse_config({"space": {"bounds": [[0, 1]]}, "fitness": fitness})


def test_lm_eval_loglikelihood_task_through_the_api_equals_the_local_handle(remote, local, dataset, tmp_path):
    """An lm-eval loglikelihood task scored through an OpenAI-compatible API (`evomerge serve`'s echoed
    log-probs, the recipe sent with each request) gives what the same merge scores in process."""
    pytest.importorskip("lm_eval")
    from evomerge.fitness.lmeval import LMEvalFitness

    (tmp_path / "sums.yaml").write_text(
        "task: serve_sums\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{validation: {dataset}}}}}\nvalidation_split: validation\n"
        "output_type: loglikelihood\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{reference}}\"\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    fitness = LMEvalFitness(["serve_sums"], include_path=tmp_path)
    api = remote()
    seen = []
    for r in (recipe(0.4, 0.6), recipe(1.2, -0.3)):
        api.set_recipe(r)
        local.set_recipe(r)
        out_api, out_local = fitness.run(api), fitness.run(local)
        assert fitness.result_of(out_api).objectives == fitness.result_of(out_local).objectives
        ll = [[s["resps"][0][0][0] for s in out["samples"]["serve_sums"]] for out in (out_api, out_local)]
        assert ll[0] == pytest.approx(ll[1], rel=1e-4)
        assert all(isinstance(x, float) and x < 0 for x in ll[1])
        seen.append(ll[1])
    assert seen[0] != pytest.approx(seen[1], rel=1e-3)  # the two recipes really are two models


@pytest.fixture(scope="module")
def chatty(tiny_models, tmp_path_factory):
    """The tiny base with a chat template and, as its end-of-sequence token, a character it generates
    greedily after PROMPT (first at position `at`); with the greedy continuation `chars` (before that end)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("chatty") / "base"
    shutil.copytree(tiny_models["base"], d)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    gen = model.generate(tok(PROMPT, return_tensors="pt").input_ids, max_new_tokens=16, do_sample=False,
                         eos_token_id=None, pad_token_id=tok.pad_token_id)[0, len(tok(PROMPT).input_ids):].tolist()
    at = next(i for i in range(3, len(gen)) if gen[i] not in gen[:i] and tok.convert_ids_to_tokens(gen[i]) is not None)
    tok.eos_token = tok.convert_ids_to_tokens(gen[at])
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    tok.save_pretrained(d)
    return d, at, gen[:at]


PROMPT = "what is 12 plus 30? answer "
BASE_ONLY = {"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 1.0}}]}


def test_finish_reason_and_usage_are_what_the_model_did(chatty):
    """"stop" when the end-of-sequence token or a stop string ended the answer, "length" when max_tokens did;
    usage counts the prompt as the model saw it (a chat through its template) and the tokens generated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, at, gen = chatty
    tok = AutoTokenizer.from_pretrained(d)
    chars = tok.decode(gen, skip_special_tokens=True)
    s = Running(build(ServeConfig(sources={"base": str(d)}, base="base")))
    try:
        def complete(**body):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": PROMPT, "recipe": BASE_ONLY, **body}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0], r.json()["usage"]

        prompt_tokens = len(PROMPT)  # one token per character, no BOS
        choice, usage = complete(max_tokens=at + 4)  # the end-of-sequence token comes at position `at`
        assert (choice["text"], choice["finish_reason"]) == (chars, "stop")
        assert usage == {"prompt_tokens": prompt_tokens, "completion_tokens": at + 1, "total_tokens": prompt_tokens + at + 1}
        choice, usage = complete(max_tokens=at)  # cut just before it
        assert (choice["text"], choice["finish_reason"], usage["completion_tokens"]) == (chars, "length", at)
        stop = chars[-2:]
        choice, usage = complete(max_tokens=at + 4, stop=[stop])
        upto = next(k for k in range(1, at + 1) if stop in tok.decode(gen[:k], skip_special_tokens=True))
        assert (choice["text"], choice["finish_reason"], usage["completion_tokens"]) == (chars[:chars.find(stop)], "stop", upto)

        messages = [{"role": "user", "content": "hi"}]
        templated = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
        model = AutoModelForCausalLM.from_pretrained(d)
        gen = model.generate(torch.tensor([templated]), max_new_tokens=5, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(templated):].tolist()
        ended = tok.eos_token_id in gen
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 5, "recipe": BASE_ONLY}, timeout=60)
        body = r.json()
        assert r.status_code == 200 and body["usage"]["prompt_tokens"] == len(templated) != len(json.dumps(messages))
        assert body["usage"]["completion_tokens"] == (gen.index(tok.eos_token_id) + 1 if ended else 5)
        assert body["choices"][0]["finish_reason"] == ("stop" if ended else "length")
        assert body["choices"][0]["message"]["content"] == tok.decode(gen, skip_special_tokens=True)
    finally:
        s.stop()


# -- hostile clients: the stock openai client, malformed recipes, oversized work, made-up tokens, SIGTERM -----------
def one_line_400(r: httpx.Response, needle: str) -> None:
    msg = r.json()["error"]["message"]
    assert (r.status_code, "\n" in msg, "Traceback" in r.text) == (400, False, False) and needle in msg, (r.status_code, r.text)


@pytest.fixture(scope="module")
def chat_server(chatty):
    s = Running(build(ServeConfig(sources={"base": str(chatty[0])}, base="base", rate=1000, burst=1000)))
    yield s
    s.stop()


def test_the_openai_client_streams_and_gets_n_and_max_completion_tokens(chat_server, chatty):
    """`stream=True` yields server-sent chunks equal to the plain answer, the usage chunk when asked; `n` gives n
    choices (distinct when sampled); `max_completion_tokens` caps generation; what is not supported is a 400."""
    import openai

    _, at, _ = chatty
    client = openai.OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0)
    kw = {"model": "evomerge", "extra_body": {"recipe": BASE_ONLY}}
    plain = client.completions.create(prompt=PROMPT, max_tokens=at + 4, **kw)
    chunks = list(client.completions.create(prompt=PROMPT, max_tokens=at + 4, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text != ""
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]  # token by token: tests/test_serve_generation.py
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None} and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in client.completions.create(prompt=PROMPT, max_tokens=3, stream=True, **kw))

    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(messages=messages, max_completion_tokens=3, **kw)
    assert chat.usage.completion_tokens <= 3 and (chat.usage.completion_tokens == 3) == (chat.choices[0].finish_reason == "length")
    streamed = list(client.chat.completions.create(messages=messages, max_completion_tokens=3, stream=True,
                                                   stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content for c in streamed if c.choices) == chat.choices[0].message.content
    assert streamed[-1].usage == chat.usage

    many = client.completions.create(prompt=[PROMPT, "hi there"], n=3, max_tokens=6, temperature=1.5, seed=3, **kw)
    assert [c.index for c in many.choices] == list(range(6)) and len({c.text for c in many.choices[:3]}) > 1
    assert many.usage.prompt_tokens == len(PROMPT) + len("hi there")  # prompts counted once, not per choice
    greedy = client.chat.completions.create(messages=messages, n=2, max_tokens=4, **kw)
    assert len(greedy.choices) == 2 and greedy.choices[0].message.content == greedy.choices[1].message.content

    for call, needle in [
        (lambda: client.completions.create(prompt=PROMPT, logprobs=2, **kw), "logprobs: only with echo"),
        (lambda: client.chat.completions.create(messages=messages, logprobs=True, **kw), "logprobs: log-probs are not supported"),
        (lambda: client.chat.completions.create(messages=messages, top_logprobs=2, **kw), "top_logprobs"),
        (lambda: client.completions.create(prompt=PROMPT, presence_penalty=0.5, **kw), "presence_penalty: Extra inputs"),
        (lambda: client.completions.create(prompt=PROMPT, n=65, **kw), re.escape("1 to 64 prompts (times n), got 65")),
    ]:
        with pytest.raises(openai.BadRequestError, match=needle):
            call()
    echoed = client.completions.create(prompt=PROMPT, echo=True, logprobs=1, max_tokens=0, **kw)
    assert len(echoed.choices[0].logprobs.token_logprobs) == len(PROMPT)


def test_a_stream_is_server_sent_events_ending_in_done(chat_server):
    body = {"prompt": PROMPT, "max_tokens": 4, "recipe": BASE_ONLY, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", chat_server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    finished = [c["index"] for e in events[:-2] for c in json.loads(e[6:])["choices"] if c["finish_reason"]]
    assert sorted(finished) == [0, 1] and json.loads(events[-2][6:])["usage"]["completion_tokens"] == 8
    r = httpx.post(chat_server.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
    one_line_400(r, "stream_options: only allowed when stream is true")


DEEP = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}
for _ in range(5):
    DEEP = {"merge_method": "linear", "models": [{"model": DEEP, "name": "x", "parameters": {"weight": 1.0}}]}


@pytest.mark.parametrize("change, needle", [
    ({"recipe": {**recipe(1, 1).to_dict(), "seed": "abc"}}, "recipe.seed: must be an integer, got 'abc'"),
    ({"recipe": {**recipe(1, 1).to_dict(), "parameters": [1, 2]}}, "recipe.parameters: must be a mapping, got list"),
    ({"recipe": {**recipe(1, 1).to_dict(), "slices": 7}}, "recipe.slices: must be a list, got int"),
    ({"recipe": recipe(1e308, 1).to_dict(), "temperature": 0.8},
     "recipe.models[0].parameters.weight: must be finite and within +-10000, got 1e+308"),
    ({"recipe": {**recipe(1, 1).to_dict(), "parameters": {"t": [0.1, {"filter": "mlp", "value": float("inf")}]}}},
     "recipe.parameters.t[1].value: must be finite"),
    ({"recipe": {"merge_method": "passthrough", "path": [{"model": "a", "layer": 0}] * 100}},
     "recipe: more than 48 data-flow path steps (the model's 4 layers x 3 models x 4)"),
    ({"recipe": DEEP}, "recipe: more than 4 nested recipes (the model's 4 layers)"),
    ({"recipe": {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 10**9]}]}]}},
     "recipe: more than 48 slice layers"),
    ({"recipe": {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a"}]}]}},
     "recipe.slices[0].sources[0].layer_range: must be [first, end] layer numbers, got None"),
    ({"recipe": {**recipe(1, 1).to_dict(), "base_model": 3}}, "recipe.base_model: must be a model name or a recipe, got int"),
    ({"prompt": "x" * 300}, "prompt 0 is 300 tokens; with max_tokens 2 that is over the model's context of 256 tokens"),
    ({"prompt": ["ok", "y" * 252], "max_tokens": 5}, "prompt 1 is 252 tokens; with max_tokens 5"),
    ('{"prompt": "ok", "recipe": {"merge_method": "linear", "parameters": {"w": ' + "[" * 5000 + "]" * 5000 + "}}}",
     "There was an error parsing the body"),
])
def test_hostile_requests_are_one_line_400s_and_the_server_still_answers(server, change, needle):
    normal = {"prompt": "ok", "max_tokens": 2, "recipe": recipe(1, 1).to_dict()}
    r = post(server, "/v1/completions", None, content=change if isinstance(change, str) else json.dumps({**normal, **change}),
             headers={"Content-Type": "application/json"})
    one_line_400(r, needle)
    assert post(server, "/v1/completions", normal).status_code == 200


def test_the_longest_path_a_data_flow_search_makes_is_served(server):
    """Every slot of a data-flow space over all the host's models on (3 repeats, pinned ends: 37 steps) is within
    the bound."""
    import numpy as np

    from evomerge.search_spaces.data_flow import DataFlow

    space = DataFlow(["base", "a", "b"], 4)
    longest = space.decode(np.concatenate([np.full(space.num_slots, 0.5), np.ones(12 * 12)]))
    assert len(longest.path) == 37
    r = post(server, "/v1/completions", {"prompt": "ok", "max_tokens": 2, "recipe": longest.to_dict()})
    assert r.status_code == 200, r.text


def test_made_up_authorization_headers_are_not_new_clients(tiny_models, monkeypatch):
    s = Running(build(ServeConfig(sources={"base": str(tiny_models["base"])}, base="base", rate=0.5, burst=5)))
    try:
        codes = [httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer made-up-{i}"}).status_code for i in range(8)]
        assert codes == [200] * 5 + [429] * 3
    finally:
        s.stop()
    monkeypatch.setenv("EVOMERGE_TEST_SERVE_TOKEN", TOKEN)  # with a token, holding it is the client
    s = Running(build(ServeConfig(sources={"base": str(tiny_models["base"])}, base="base", rate=0.5, burst=3,
                                  token_env="EVOMERGE_TEST_SERVE_TOKEN")))
    try:
        codes = [httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {t}"}).status_code
                 for t in [TOKEN] * 4 + ["made-up"]]
        assert codes == [200] * 3 + [429, 401]
    finally:
        s.stop()


def test_a_request_waits_for_the_model_at_most_request_timeout(tiny_models):
    s = Running(build(ServeConfig(sources={"base": str(tiny_models["base"])}, base="base", request_timeout=0.3)))
    try:
        heavy = {"prompt": ["ok"] * 64, "max_tokens": 200, "temperature": 1.0, "recipe": BASE_ONLY}  # seconds
        done: list = []
        first = threading.Thread(target=lambda: done.append(httpx.post(s.url + "/v1/completions", json=heavy, timeout=60)))
        first.start()
        time.sleep(0.2)
        start = time.monotonic()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2, "recipe": BASE_ONLY}, timeout=30)
        waited = time.monotonic() - start
        first.join()
        assert (r.status_code, r.json()["error"]["message"], r.headers["retry-after"]) == (503, "the model is busy: waited 0.3 s", "1")
        assert 0.3 <= waited < 1.0 and done[0].status_code == 200
    finally:
        s.stop()
