"""Models by reference (evomerge.merge.refs): Hub IDs and `@revision` read offline from an HF cache laid out as
huggingface_hub lays it, equal to the local directories; a run config naming Hub IDs runs, exports a card and a
recipe.yaml that name them, and the recipe.yaml replays to the same weights; bad references are one line."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.merge.refs import resolve
from evomerge.records import UserError
from tests.merge_fixtures import load_checkpoint
from tests.test_merge_cli import TIES, assert_failed_cleanly, run_cli, write_config

C_MAIN, C_OLD = "a" * 40, "b" * 40  # commit hashes, as the cache names snapshots


def cache_repo(hub: Path, repo: str, commits: dict[str, Path], refs: dict[str, str]) -> None:
    """models--ORG--NAME/{refs/REF -> commit, snapshots/COMMIT/...}: files as symlinks into blobs/, as
    huggingface_hub stores them."""
    root = hub / ("models--" + repo.replace("/", "--"))
    for commit, src in commits.items():
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in src.iterdir():
            blob = root / "blobs" / f"{commit[:8]}-{f.name}"
            blob.parent.mkdir(exist_ok=True)
            shutil.copy2(f, blob)
            (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (root / "refs").mkdir()
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)


@pytest.fixture()
def hub(tiny_models, tmp_path, monkeypatch):
    """An HF cache under HF_HOME with org/base (main), org/a (main -> a, tag v1 -> b's weights) and org/b, offline."""
    home = tmp_path / "hf"
    cache_repo(home / "hub", "org/base", {C_MAIN: tiny_models["base"]}, {"main": C_MAIN})
    cache_repo(home / "hub", "org/a", {C_MAIN: tiny_models["a"], C_OLD: tiny_models["b"]}, {"main": C_MAIN, "v1": C_OLD})
    cache_repo(home / "hub", "org/b", {C_MAIN: tiny_models["b"]}, {"main": C_MAIN})
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _named(cfg: dict, names: dict[str, str]) -> dict:
    return yaml.safe_load(yaml.safe_dump(cfg).replace("model: base", f"model: {names['base']}")
                          .replace("model: a", f"model: {names['a']}").replace("model: b", f"model: {names['b']}"))


def test_hub_ids_and_revisions_merge_offline_as_the_local_dirs(hub, tiny_models, tmp_path, monkeypatch, capsys):
    local = {k: str(v) for k, v in tiny_models.items()}
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(tmp_path, _named(TIES, local), "local.yaml")), "-o", str(tmp_path / "local"))
    assert code == 0, err
    expected = load_checkpoint(tmp_path / "local")
    # org/a@v1 is b's weights, org/b@<commit> the same: a TIES of b and b, named three ways
    cases = {"main": {"base": "org/base", "a": "org/a", "b": "org/b"},
             "revisions": {"base": "org/base@main", "a": "org/a@main", "b": f"org/b@{C_MAIN}"},
             "tag": {"base": "org/base", "a": "org/a@v1", "b": "org/b"}}
    for case, names in cases.items():
        out = tmp_path / case
        code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(tmp_path, _named(TIES, names), f"{case}.yaml")), "-o", str(out))
        assert code == 0, (case, err)
        got = load_checkpoint(out)
        if case != "tag":
            assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), case
            card = (out / "README.md").read_text()
            assert f"org/a@{C_MAIN}" in card and f"org/base@{C_MAIN}" in card, card  # pinned at the commit
            assert yaml.safe_load((out / "recipe.yaml").read_text())["base_model"] == f"org/base@{C_MAIN}"
        else:
            assert not all(torch.equal(got[k], expected[k]) for k in got)  # v1 is another model
            both_b = _named(TIES, {**local, "a": str(shutil.copytree(tiny_models["b"], tmp_path / "b_again"))})
            code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(tmp_path, both_b, "bb.yaml")), "-o", str(tmp_path / "bb"))
            assert code == 0, err
            bb = load_checkpoint(tmp_path / "bb")
            assert all(torch.equal(got[k], bb[k]) for k in got)


def test_resolved_records_the_commit_and_a_local_path_wins(hub, tiny_models, tmp_path, monkeypatch):
    r = resolve("org/a@v1", (tmp_path,))
    assert r.commit == C_OLD and r.pinned == f"org/a@{C_OLD}" and (r.path / "config.json").is_file()
    shadow = tmp_path / "org" / "a"  # a local directory spelled like the Hub ID
    shutil.copytree(tiny_models["base"], shadow)
    r = resolve("org/a", (tmp_path,))
    assert r.path == shadow.resolve() and r.commit is None and r.pinned == str(shadow.resolve())


@pytest.mark.parametrize("ref, needles", [
    ("org/missing", ["'org/missing'", "not in the HF cache", "HF_HUB_OFFLINE=0", "HF_TOKEN", "local path"]),
    ("org/a@v9", ["'org/a@v9'", "revision 'v9' of org/a", "not in the HF cache", "HF_HUB_OFFLINE=0"]),
    ("./no/such/dir", ["'./no/such/dir'", "no checkpoint directory", "not a Hub ID"]),
    ("a/b/c", ["'a/b/c'", "not a Hub ID"]),
])
def test_bad_references_are_one_line_and_write_nothing(hub, tmp_path, monkeypatch, capsys, ref, needles):
    cfg = write_config(tmp_path, {**TIES, "base_model": ref, "models": [{"model": ref, "parameters": {"weight": 1.0}}]})
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(cfg), "-o", str(out))
    assert_failed_cleanly(code, err, out, *needles)


def test_an_adapter_by_reference_over_the_base(hub, tiny_models, tmp_path, monkeypatch, capsys):
    """mergekit's `model+lora` names the adapter and the model it applies over; it merges as the local adapter does."""
    from tests.test_merge_lora import peft_adapter

    adapter = tmp_path / "adapter"
    peft_adapter(tiny_models["base"], adapter, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    local = {"merge_method": "linear", "base_model": str(tiny_models["base"]),
             "models": [{"model": str(tiny_models["base"]), "parameters": {"weight": 0.5}},
                        {"model": str(adapter), "parameters": {"weight": 0.5}}]}
    by_ref = {**local, "base_model": "org/base", "models": [{"model": "org/base", "parameters": {"weight": 0.5}},
                                                            {"model": f"org/base+{adapter}", "parameters": {"weight": 0.5}}]}
    for name, cfg in (("local", local), ("ref", by_ref)):
        code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(tmp_path, cfg, f"{name}.yaml")), "-o", str(tmp_path / name))
        assert code == 0, err
    a, b = load_checkpoint(tmp_path / "local"), load_checkpoint(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)
    over_other = {**by_ref, "models": [{"model": "org/base", "parameters": {"weight": 0.5}},
                                       {"model": f"org/a+{adapter}", "parameters": {"weight": 0.5}}]}
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(write_config(tmp_path, over_other, "other.yaml")), "-o", str(tmp_path / "o"))
    assert_failed_cleanly(code, err, tmp_path / "o", "applies over org/a", "base model 'org/base'")


def test_a_run_with_hub_sources_exports_a_card_and_recipe_that_replay(hub, tmp_path, monkeypatch, capsys):
    """A tiny search over Hub IDs, with a held-out baseline naming a model that is not a source; the exported
    card and recipe.yaml name the sources by Hub ID at their commit, and `evomerge merge recipe.yaml` gives the
    exported weights."""
    import json

    task = tmp_path / "t.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "reference": str(2 * a)}) + "\n" for a in range(10, 13)))
    cfg = {"sources": {"base": "org/base", "a": "org/a", "b": "org/b@main"}, "base": "base",
           "space": {"name": "layer_weights", "options": {"method": "ties"}}, "optimizer": {"name": "random"},
           "fitness": {"tasks": [{"name": "t", "path": str(task), "metrics": ["token_accuracy"]}]},
           "budget": {"evaluations": 2}, "seed": 1,
           "holdout": {"tasks": [{"name": "t", "path": str(task), "metrics": ["loss"]}], "baselines": {
               "b": {"merge_method": "linear", "models": [{"model": "b", "parameters": {"weight": 1.0}}]},
               "v1": {"merge_method": "linear", "models": [{"model": "org/a@v1", "parameters": {"weight": 1.0}}]}}}}  # b's weights
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(monkeypatch, capsys, "run", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    rows = json.loads((tmp_path / "r" / "holdout.json").read_text())["rows"]
    assert rows["v1"] == rows["b"] and rows["v1"] != rows["evolved best"], rows  # a baseline's own model, by Hub ID
    code, _, err = run_cli(monkeypatch, capsys, "export", str(tmp_path / "r"), "--best", "-o", str(tmp_path / "best"))
    assert code == 0, err
    card = (tmp_path / "best" / "README.md").read_text()
    assert f"- `a`: `org/a@{C_MAIN}`" in card and f"- `b`: `org/b@{C_MAIN}`" in card, card
    replay = yaml.safe_load((tmp_path / "best" / "recipe.yaml").read_text())
    assert replay["base_model"] == f"org/base@{C_MAIN}"
    tie = card.split("--tie-order ")[1].split("`")[0]
    code, _, err = run_cli(monkeypatch, capsys, "merge", str(tmp_path / "best" / "recipe.yaml"), "-o", str(tmp_path / "again"), "--tie-order", tie)
    assert code == 0, err
    exported, again = load_checkpoint(tmp_path / "best"), load_checkpoint(tmp_path / "again")
    assert exported.keys() == again.keys() and all(torch.equal(exported[k], again[k]) for k in exported)


def test_a_run_config_source_or_baseline_offline_and_not_cached_is_one_line(hub, tmp_path):
    from evomerge.config import parse_config

    with pytest.raises(UserError, match=r"^config: sources.x: model 'org/nope': .*not in the HF cache.*HF_HUB_OFFLINE=0"):
        parse_config({"sources": {"x": "org/nope"}, "base": "x", "space": {"name": "layer_weights"},
                      "fitness": {"tasks": []}, "budget": {"evaluations": 1}}, base_dir=tmp_path)
    baseline = {"merge_method": "linear", "models": [{"model": "org/gone@v2", "parameters": {"weight": 1.0}}]}
    with pytest.raises(UserError, match=r"^config: holdout.baselines.B: model 'org/gone@v2': no such local directory, and org/gone is not in the HF cache"):
        parse_config({"sources": {"x": "org/base"}, "base": "x", "space": {"name": "layer_weights"}, "fitness": {"tasks": []},
                      "budget": {"evaluations": 1}, "holdout": {"tasks": [], "baselines": {"B": baseline}}}, base_dir=tmp_path)


def test_a_mergekit_evolve_genome_naming_hub_ids_becomes_pinned_sources(hub, tmp_path):
    from evomerge.config import parse_config
    from evomerge.mergekit_evolve import to_evomerge

    genome = {"genome": {"models": ["org/a", "org/b@main"], "merge_method": "ties", "base_model": "org/base",
                         "layer_granularity": 2},
              "tasks": [{"name": "t"}]}
    config, _ = to_evomerge(genome, tmp_path)
    assert config["sources"] == {"a": f"org/a@{C_MAIN}", "b_main": f"org/b@{C_MAIN}", "base": f"org/base@{C_MAIN}"}
    cfg = parse_config(config, base_dir=tmp_path)
    assert cfg.source_refs == config["sources"] and all((p / "config.json").is_file() for p in cfg.sources.values())


class _FakeHub:
    """The Hub's answers for a revision and a repository that do not exist, over HTTP on 127.0.0.1."""

    def __enter__(self) -> str:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                code, kind = (404, "RevisionNotFound") if "/revision/v9" in self.path else (401, "RepoNotFound")
                body = b'{"error": "not here"}'
                self.send_response(code)
                self.send_header("X-Error-Code", kind)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()


def _online_errors(hub: Path, endpoint: str, *refs: str) -> list[str]:
    """resolve() in a fresh process online (huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT at import)."""
    import os
    import subprocess
    import sys

    script = ("import sys\nfrom evomerge.merge.refs import resolve\nfrom evomerge.records import UserError\n"
              "for ref in sys.argv[1:]:\n    try:\n        resolve(ref, ('.',))\n    except UserError as e:\n        print(e)\n")
    env = {**os.environ, "HF_HOME": str(hub), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HUB_ETAG_TIMEOUT": "5"}
    res = subprocess.run([sys.executable, "-c", script, *refs], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip().splitlines()


def test_online_a_missing_revision_a_missing_repo_and_no_hub_are_one_line_each(hub, tmp_path):
    import socket

    with _FakeHub() as endpoint:
        revision, repo = _online_errors(hub, endpoint, "org/a@v9", "org/secret")
    assert revision == "model 'org/a@v9': revision 'v9' does not exist in org/a on the Hub", revision
    assert repo.startswith("model 'org/secret': the Hub has no repository org/secret this token can read: set HF_TOKEN"), repo
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    [unreachable] = _online_errors(hub, closed, "org/missing")
    assert unreachable.startswith("model 'org/missing': no such local directory, and org/missing is not in the HF cache") and "ConnectError" in unreachable, unreachable
    assert "HF_TOKEN" in unreachable and "local path" in unreachable
    assert _online_errors(hub, closed, "org/a") == []  # cached: no request needed


def test_serve_takes_hub_ids_and_answers_as_the_local_models(hub, tiny_models, monkeypatch):
    """`evomerge serve --model base=org/base --model a=org/a@v1`: a recipe's completions and scores are the local
    models' (org/a@v1 holds b's weights)."""
    from evomerge.fitness.api import APIHandle
    from evomerge.fitness.handle import Sampling
    from evomerge.fitness.hf import HFHandle
    from evomerge.merge import Materializer
    from evomerge.recipe import ModelRef, Recipe
    from evomerge.serve import ServeConfig, build
    from tests.test_fitness_serve import TOKEN, Running

    monkeypatch.setenv("EVOMERGE_TEST_SERVE_TOKEN", TOKEN)
    s = Running(build(ServeConfig(sources={"base": "org/base", "a": "org/a@v1"}, base="base", rate=1000, burst=1000)))
    try:
        local = HFHandle(tiny_models["base"], Materializer({"base": tiny_models["base"], "a": tiny_models["b"]}), batch_size=4)
        remote = APIHandle(base_url=s.url + "/v1", model="evomerge", api_key_env="EVOMERGE_TEST_SERVE_TOKEN",
                           send_recipe=True, timeout=30, max_retries=0)
        recipe = Recipe(merge_method="task_arithmetic", base_model="base", models=[ModelRef("a", {"weight": 0.7})])
        remote.set_recipe(recipe)
        local.set_recipe(recipe)
        prompts = ["12+12=", "what is 3 plus 4? "]
        assert remote.generate(prompts, Sampling(max_new_tokens=6)) == local.generate(prompts, Sampling(max_new_tokens=6))
        for got, want in zip(remote.score([(p, "24") for p in prompts]), local.score([(p, "24") for p in prompts])):
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    finally:
        s.stop()


def test_recipe_yaml_of_a_data_flow_merge_with_a_nested_recipe_replays(tiny_models, tmp_path, monkeypatch, capsys):
    """The run's names (a nested entry's `name`, path steps, slices) become references in recipe.yaml, which
    `evomerge merge` replays to the same weights."""
    from evomerge.merge.writer import write_checkpoint
    from evomerge.recipe import Recipe

    nested = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.5}}]}
    recipes = {
        "path": {"merge_method": "passthrough", "models": [{"model": nested, "name": "ps"}, {"model": "b"}],
                 "path": [{"model": "ps", "layer": 0}, {"model": "b", "layer": 1, "scale": 0.8}, {"model": "ps", "layer": 1}]},
        "slices": {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]},
                                                           {"sources": [{"model": "b", "layer_range": [0, 2]}]}]},
    }
    for kind, recipe in recipes.items():
        out = write_checkpoint(Recipe.from_dict(recipe), {k: str(v) for k, v in tiny_models.items()}, tmp_path / kind)
        replay = (out / "recipe.yaml").read_text()
        assert str(Path(tiny_models["b"]).resolve()) in replay and "model: b\n" not in replay, replay
        code, _, err = run_cli(monkeypatch, capsys, "merge", str(out / "recipe.yaml"), "-o", str(tmp_path / f"{kind}_again"), "--tie-order", "index")
        assert code == 0, err
        first, again = load_checkpoint(out), load_checkpoint(tmp_path / f"{kind}_again")
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first), kind


def test_a_hub_source_downloads_only_what_a_merge_reads():
    """The patterns as huggingface_hub applies them to a repo's file list."""
    from huggingface_hub.utils import filter_repo_objects

    from evomerge.merge import refs

    repo = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "tokenizer.model", "pytorch_model.bin", "pytorch_model.bin.index.json", "README.md", ".gitattributes",
            "onnx/model.onnx", "onnx/model.safetensors", "original/consolidated.00.pth", "model.gguf"]

    def kept(patterns):
        return set(filter_repo_objects(repo, allow_patterns=list(patterns), ignore_patterns=list(refs._SUBFOLDERS)))

    assert kept(refs._MERGE_FILES) == {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                                       "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                                       "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"}
    assert kept((*refs._MERGE_FILES, *refs._PICKLE_FILES)) - kept(refs._MERGE_FILES) == {"pytorch_model.bin", "pytorch_model.bin.index.json"}


class _ServingHub(_FakeHub):
    """A Hub serving one repo, org/served at commit C_MAIN, over HTTP as huggingface_hub reads it (revision info,
    tree listing, resolve URLs); it records the files downloaded."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.downloaded = files, []

    def __enter__(self) -> str:
        import hashlib
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes, **headers: str) -> None:
                self.send_response(code)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                path = self.path.split("?")[0]
                if path.startswith("/api/models/org/served/revision/"):
                    info = {"id": "org/served", "sha": C_MAIN, "siblings": [{"rfilename": f} for f in hub.files]}
                    return self._send(200, json.dumps(info).encode(), **{"Content-Type": "application/json"})
                if path.startswith("/api/models/org/served/tree/"):
                    tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for f, b in hub.files.items()]
                    return self._send(200, json.dumps(tree).encode(), **{"Content-Type": "application/json"})
                prefix = f"/org/served/resolve/{C_MAIN}/"
                if path.startswith(prefix) and path[len(prefix):] in hub.files:
                    name = path[len(prefix):]
                    body = hub.files[name]
                    if self.command == "GET":
                        hub.downloaded.append(name)
                    return self._send(200, body, **{"X-Repo-Commit": C_MAIN, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'})
                self._send(404, b"{}", **{"X-Error-Code": "RepoNotFound"})

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def test_online_a_hub_id_downloads_only_what_a_merge_reads_then_reads_the_cache(hub, tiny_models, tmp_path):
    import os
    import subprocess
    import sys

    model = {f.name: f.read_bytes() for f in Path(tiny_models["a"]).iterdir()}
    extra = {"README.md": b"# card", "pytorch_model.bin": b"pickle", "onnx/model.onnx": b"onnx", "onnx/model.safetensors": b"x"}
    script = ("from evomerge.merge.refs import resolve\nr = resolve('org/served', ('.',))\nprint(r.pinned)\n"
              "print(sorted(p.name for p in r.path.iterdir()))\n")
    env = {**os.environ, "HF_HOME": str(hub), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
    served = _ServingHub({**model, **extra})
    with served as endpoint:
        res = subprocess.run([sys.executable, "-c", script], env={**env, "HF_ENDPOINT": endpoint}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines() == [f"org/served@{C_MAIN}", str(sorted(model))]
    assert sorted(served.downloaded) == sorted(model)  # not the card, the pickle, nor the subfolders
    again = subprocess.run([sys.executable, "-c", script], env={**env, "HF_ENDPOINT": endpoint}, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout == res.stdout, again.stderr[-3000:]  # the Hub is gone: the cache answers
