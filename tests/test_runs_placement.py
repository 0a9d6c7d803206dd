"""Placement and the memory plan, on real parts: device/dtype options, the plan read from safetensors headers
(`evomerge run --dry-run`), refusals in one line, private scoring-model memory, and Ray workers that die
while loading."""
from __future__ import annotations

import json
import logging
import math
import struct
import time
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.run.assemble import open_engine, prepare
from evomerge.config import parse_config
from evomerge.records import UserError
from evomerge.zoo.random_models import random_expert, random_llama
from test_runs_cli import _cli, _one_line_error

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    """A tiny Llama stored in bfloat16 and one expert, with a task file beside them."""
    root = tmp_path_factory.mktemp("bf16")
    base = random_llama(root / "base", seed=0, dtype=torch.bfloat16)
    random_expert(base, root / "a", seed=1)
    (root / "task.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "reference": str(2 * i)}) + "\n"
                                             for i in range(5)))
    return root


def _model_cfg(root: Path, **over) -> dict:
    cfg = {
        "sources": {"base": str(root / "base"), "a": str(root / "a")},
        "base": "base",
        "space": {"name": "layer_weights", "options": {"method": "ties"}},
        "optimizer": {"name": "random"},
        "fitness": {"tasks": [{"name": "t", "path": str(root / "task.jsonl"), "metrics": ["loss"]}],
                    "handle": {"batch_size": 2}},
        "budget": {"evaluations": 1},
    }
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def _write(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


# -- the plan comes from the headers ------------------------------------------------------------------
def test_dry_run_reads_the_plan_from_headers_and_writes_nothing(bf16_models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(bf16_models / "base").parameters())
    config = _write(tmp_path, _model_cfg(bf16_models))
    code, out, err = _cli(capsys, "run", "--dry-run", str(config))
    assert code == 0, err
    assert f"{params:,} params x 4 bytes" in out and "scoring on cpu in float32" in out
    assert list(tmp_path.iterdir()) == [config]  # no run directory, beside the config or anywhere

    plan = prepare(parse_config(_model_cfg(bf16_models)))[2]
    parts = {p.name: p for p in plan.parts}
    assert parts["scoring model"].private == params * 4  # bf16 on disk, float32 on the CPU
    files = sum((bf16_models / m / "model.safetensors").stat().st_size for m in ("base", "a"))
    assert params * 2 * 2 <= parts["sources"].shared < files  # both checkpoints' tensor bytes, headers excluded
    assert parts["sources"].private == 0 and plan.peak_rss == plan.total("private") + plan.total("shared")


def _sparse_checkpoint(dest: Path, like: Path, elements: int) -> Path:
    """A checkpoint whose header promises `elements` bf16 values in a hole of a sparse file (nothing behind it
    was ever written): only a reader of headers alone can plan it."""
    dest.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (dest / f).write_bytes((like / f).read_bytes())
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "BF16", "shape": [elements // 1024, 1024],
                                                       "data_offsets": [0, 2 * elements]}}).encode()
    with open(dest / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2 * elements)
    return dest


def test_a_model_too_large_for_this_machine_is_refused_in_one_line(bf16_models, tmp_path, capsys):
    elements = 1 << 38  # 256 Gi parameters: 1 TiB as a float32 scoring model
    base = _sparse_checkpoint(tmp_path / "huge", bf16_models / "base", elements)
    cfg = _model_cfg(bf16_models, sources={"base": str(base), "a": str(base)})
    for args in (["--dry-run"], ["--run-dir", str(tmp_path / "r")]):
        start = time.monotonic()
        code, out, err = _cli(capsys, "run", *args, str(_write(tmp_path, cfg)))
        _one_line_error(code, err, "will not fit", "1024.00 GiB", "private host memory")
        assert "Traceback" not in out + err and time.monotonic() - start < 60
    assert not (tmp_path / "r").exists()


# -- refusals in one line ------------------------------------------------------------------------------
def test_too_many_workers_for_this_node_names_how_many_fit(bf16_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EVOMERGE_MEMORY_LIMIT", "20GiB")  # this node, whatever else runs on it now
    cfg = _model_cfg(bf16_models, executor={"kind": "ray", "workers": 100_000, "cpus_per_worker": 0})
    code, out, err = _cli(capsys, "run", "--dry-run", str(_write(tmp_path, cfg)))
    _one_line_error(code, err, "will not fit", "100000 workers need", "but 20.00 GiB is available",
                    "set executor.workers: ")
    fit = int(err.split("executor.workers: ")[1].split()[0])
    plan = prepare(parse_config(cfg))[2]
    assert 1 <= fit < 100_000 and plan.host_need(fit) <= 20 * 2**30 < plan.host_need(fit + 1)
    assert "100000 workers per node" in out  # the plan was printed before the refusal


def test_memory_limit_from_the_environment(bf16_models, tmp_path, capsys, monkeypatch):
    config = _write(tmp_path, _model_cfg(bf16_models))
    monkeypatch.setenv("EVOMERGE_MEMORY_LIMIT", "100MiB")
    code, out, err = _cli(capsys, "run", str(config), "--run-dir", str(tmp_path / "r"))
    _one_line_error(code, err, "will not fit", "but 100 MiB is available")
    assert out.startswith("evomerge: plan per worker") and not (tmp_path / "r").exists()
    monkeypatch.setenv("EVOMERGE_MEMORY_LIMIT", "lots")
    code, _, err = _cli(capsys, "run", "--dry-run", str(config))
    _one_line_error(code, err, "EVOMERGE_MEMORY_LIMIT='lots'", "8GiB")


@pytest.mark.parametrize("over, needles", [
    ({"fitness": {"handle": {"device": "gpu"}}}, ["fitness.handle", "'gpu'", "auto, cpu, cuda, cuda:N"]),
    ({"fitness": {"handle": {"dtype": "int8"}}}, ["fitness.handle", "'int8'", "auto, float32, bfloat16, float16"]),
    ({"fitness": {"handle": {"device": "cuda:1"}}, "executor": {"kind": "ray", "gpus_per_worker": 1}},
     ["fitness.handle.device cuda:1", "gpus_per_worker >= 2"]),
    ({"fitness": {"handle": {"device": "cuda"}}, "executor": {"kind": "ray"}},
     ["fitness.handle.device cuda", "gpus_per_worker >= 1"]),
    ({"fitness": {"backend": "vllm", "handle": {"tensor_parallel_size": 2}},
      "executor": {"kind": "ray", "gpus_per_worker": 1}},
     ["tensor_parallel_size 2", "executor.gpus_per_worker 1"]),
    ({"fitness": {"backend": "vllm", "handle": {"tensor_parallel_size": 2}},
      "executor": {"kind": "ray", "gpus_per_worker": 0.5}},
     ["tensor_parallel_size 2", "executor.gpus_per_worker 0.5", "fractional"]),
    ({"fitness": {"backend": "vllm", "handle": {"tensor_parallel_size": 0}}}, ["tensor_parallel_size", ">= 1"]),
])
def test_bad_placement_is_one_line_at_config_time(bf16_models, tmp_path, capsys, over, needles):
    cfg = _model_cfg(bf16_models)
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    code, _, err = _cli(capsys, "run", str(_write(tmp_path, cfg)), "--run-dir", str(tmp_path / "r"))
    _one_line_error(code, err, "config:", *needles)
    assert not (tmp_path / "r").exists()


def test_matching_tensor_parallelism_passes_the_config():
    cfg = {"space": {"bounds": [[0, 1]]}, "fitness": {"function": "m:f", "objectives": [{"name": "x"}],
                                                     "backend": "vllm", "handle": {"tensor_parallel_size": 2}},
           "budget": {"evaluations": 1}, "executor": {"kind": "ray", "gpus_per_worker": 2}}
    assert parse_config(cfg).fitness.handle["tensor_parallel_size"] == 2


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("over, needles", [
    ({"fitness": {"handle": {"device": "cuda"}}}, ["fitness.handle.device: cuda", "sees no GPU"]),
    ({"executor": {"kind": "ray", "workers": 2, "gpus_per_worker": 1}},
     ["executor.workers 2 x gpus_per_worker 1 need 2 GPU(s)", "has 0"]),
])
def test_a_gpu_asked_for_on_a_machine_without_one_is_one_line(bf16_models, tmp_path, capsys, over, needles):
    cfg = _model_cfg(bf16_models)
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    code, _, err = _cli(capsys, "run", "--dry-run", str(_write(tmp_path, cfg)))
    _one_line_error(code, err, *needles)


# -- a run shows its plan first; the scoring model is private memory in the chosen dtype ---------------
def test_a_run_starts_with_its_plan(bf16_models, tmp_path, capsys):
    code, out, err = _cli(capsys, "run", "-q", str(_write(tmp_path, _model_cfg(bf16_models))),
                          "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    first, second = out.splitlines()[:2]
    assert first.startswith("evomerge: plan per worker (scoring on cpu, float32): private ") and "peak RSS" in first
    assert second.startswith("this node: 1 worker needs") and "available" in second


def _file_backed(t: torch.Tensor) -> bool:
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= ptr < hi:
            return len(fields) == 6 and fields[4] != "0"
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_hf_parameters_are_private_memory_and_writes_never_reach_the_checkpoint(tiny_models, bf16_models):
    from evomerge.fitness.hf import HFHandle
    from transformers import AutoModelForCausalLM

    # float32 on disk and in memory: transformers 5 returns views of the file's mapping; the handle must not
    aliased = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32)
    assert any(_file_backed(p) for p in aliased.parameters())  # what the handle guards against
    weights = (tiny_models["base"] / "model.safetensors").read_bytes()
    handle = HFHandle(tiny_models["base"])
    assert handle.device == torch.device("cpu") and handle.model.dtype == torch.float32
    assert not any(_file_backed(t) for t in [*handle.model.parameters(), *handle.model.buffers()])
    with torch.no_grad():
        for p in handle.model.parameters():
            p.add_(1.0)
    assert (tiny_models["base"] / "model.safetensors").read_bytes() == weights
    # a bf16 checkpoint scores in float32 on the CPU unless asked otherwise
    assert HFHandle(bf16_models / "base").model.dtype == torch.float32
    assert HFHandle(bf16_models / "base", dtype="bfloat16").model.dtype == torch.bfloat16


# -- Ray workers that die while loading ------------------------------------------------------------------


def _ray_cfg(points: str, workers: int, evaluations: int = 4) -> dict:
    return {"space": {"points": f"placement_fixtures:{points}", "bound": 1.0}, "optimizer": {"name": "random"},
            "fitness": {"function": "placement_fixtures:kills_its_worker_once",
                        "objectives": [{"name": "score"}, {"name": "gpu_hidden"}]},
            "budget": {"evaluations": evaluations}, "seed": 3,
            "executor": {"kind": "ray", "workers": workers, "cpus_per_worker": 0.5}}


@pytest.mark.parametrize("points, cause", [
    ("raises_in_worker", "ValueError: cannot read the sources on this node"),
    ("exits_in_worker", "was killed or exited; on a node short of memory the kernel's OOM killer"),
])
def test_a_worker_that_dies_while_loading_fails_the_start_once(ray_local, tmp_path, points, cause):
    with pytest.raises(UserError) as e:
        open_engine(parse_config(_ray_cfg(points, 2)), tmp_path / "run", resume=False)
    msg = str(e.value)
    assert msg.startswith("worker ray-") and " died while loading: " in msg and cause in msg and "\n" not in msg
    assert not (tmp_path / "run").exists()


def test_a_replacement_that_cannot_load_is_placed_again_and_said(ray_local, tmp_path, caplog):
    from placement_fixtures import markers, reloaded

    for m in markers():
        m.unlink(missing_ok=True)
    engine = open_engine(parse_config(_ray_cfg("exits_once_marked", 2, evaluations=10)), tmp_path / "run",
                         resume=False)
    with caplog.at_level(logging.WARNING, logger="evomerge"):
        assert engine.run() == "budget: evaluations"
    evals = engine.store.evaluations()
    assert len(evals) == 10 and all(e.ok for e in evals)  # candidate 1 was retried
    assert all(e.objectives["gpu_hidden"] == 1.0 for e in evals)  # no GPU reserved: none visible
    warnings = [r.getMessage() for r in caplog.records if "died while loading" in r.getMessage()]
    # the load failure is one line, and the slot is placed again (a bounded number of tries)
    assert len(warnings) == 1 and "was killed or exited" in warnings[0] and "placing it again (try 2 of 3)" in warnings[0]
    assert reloaded().exists()  # the slot placed again loaded
    engine.store.close()
    for m in markers():
        m.unlink(missing_ok=True)


def test_the_plan_counts_sources_once_per_node_and_the_rest_per_worker(bf16_models):
    one = prepare(parse_config(_model_cfg(bf16_models)))[2]
    four = prepare(parse_config(_model_cfg(bf16_models, executor={"kind": "ray", "workers": 4})))[2]
    assert four.total("shared") == one.total("shared") > 0  # the sources: once per node, however many workers
    assert four.host_need() == 4 * four.total("private") + four.node_private and four.node_private > 0
    remote = prepare(parse_config(_model_cfg(bf16_models, executor={"kind": "ray", "workers": 4,
                                                                    "address": "auto"})))[2]
    assert not remote.here and "not compared with this machine" in remote.summary()
    remote.check()  # a cluster's nodes are not this machine: nothing to refuse here
    assert math.isclose(one.peak_rss, one.total("private") + one.total("shared"))
