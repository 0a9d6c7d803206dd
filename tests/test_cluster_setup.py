"""A cluster's setup: `evomerge fetch CONFIG` fills (or, offline, checks) a node's HF cache with a run's sources,
one line per source naming its revision and content digest; ray_cluster.yaml passes Ray's own validation and
keeps virtualenvs, runs and .git off the nodes, with Ray pinned to the head's version."""
from __future__ import annotations

import hashlib
import json
import subprocess
import tomllib
from pathlib import Path

import yaml

from evomerge.merge import identity
from tests.test_merge_cli import run_cli
from tests.test_merge_refs import C_MAIN, C_OLD, hub  # noqa: F401  (the HF cache fixture)

ROOT = Path(__file__).resolve().parent.parent


def _run_config(tmp_path: Path, sources: dict[str, str]) -> Path:
    cfg = {"sources": sources, "base": "base", "space": {"name": "layer_weights"},
           "fitness": {"tasks": []}, "budget": {"evaluations": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _digest(model: Path) -> str:
    return hashlib.sha256(json.dumps(identity.fingerprint(model), sort_keys=True).encode()).hexdigest()[:16]


def test_fetch_offline_names_each_source_revision_and_digest(hub, tiny_models, tmp_path, monkeypatch, capsys):  # noqa: F811
    cfg = _run_config(tmp_path, {"base": "org/base", "a": "org/a@v1", "b": "org/b"})
    code, out, err = run_cli(monkeypatch, capsys, "fetch", str(cfg))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3, out
    # org/a@v1 holds b's weights: the digest is the content's, equal to the local checkpoint's
    by_name = {line.split(":")[0]: line for line in lines}
    for name, pinned, model in [("base", f"org/base@{C_MAIN}", "base"), ("a", f"org/a@{C_OLD}", "b"), ("b", f"org/b@{C_MAIN}", "b")]:
        assert by_name[name].startswith(f"{name}: {pinned}  sha256 {_digest(tiny_models[model])}"), by_name[name]
    assert _digest(tiny_models["a"]) != _digest(tiny_models["b"])


def test_fetch_offline_a_missing_source_is_one_line_naming_it(hub, tmp_path, monkeypatch, capsys):  # noqa: F811
    cfg = _run_config(tmp_path, {"base": "org/base", "x": "org/absent"})
    code, out, err = run_cli(monkeypatch, capsys, "fetch", str(cfg))
    assert code == 2 and out == "", (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "sources.x: model 'org/absent'" in lines[0] and "not in the HF cache" in lines[0], err


def test_ray_cluster_yaml_passes_rays_validation_with_excludes_pins_and_apart_setups():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load((ROOT / "ray_cluster.yaml").read_text()))  # Ray's defaults, as `ray up` fills them
    validate_config(cfg)  # Ray's schema and node-type checks; raises on a bad file
    assert {"**/.venv*", ".git", "/runs/*/", "**/__pycache__"} <= set(cfg["rsync_exclude"]), cfg["rsync_exclude"]
    # the code and the shipped lm-eval tasks only; models come through each node's HF cache
    assert cfg["file_mounts"] == {"/home/ubuntu/evomerge": ".", "/home/ubuntu/evomerge/runs/lmeval_tasks": "./runs/lmeval_tasks"}
    head, gpu = cfg["head_setup_commands"], cfg["available_node_types"]["gpu_worker"]["worker_setup_commands"]
    pin = f'"ray[default]=={ray.__version__}"'  # every node gets the Ray that launched the cluster
    assert any(pin in c for c in head) and any(pin in c for c in gpu), (head, gpu)
    assert not any("vllm" in c for c in head), head  # the CPU head installs no vLLM
    tested = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"][0]
    assert any('".[vllm]"' in c and f'"{tested.replace(">=", "==")}"' in c for c in gpu), (tested, gpu)  # the vLLM tested
    assert any("evomerge fetch" in c for c in gpu), gpu
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0 and types["gpu_worker"]["resources"]["GPU"] >= 1


def test_every_folder_the_repo_ships_under_runs_reaches_the_nodes():
    """rsync_exclude's "/runs/*/" keeps run directories home, and with them any folder of runs/: each one the repo
    ships (lm-eval task files) must come by a file mount of its own, where that anchored exclude does not apply."""
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    assert "/runs/*/" in cfg["rsync_exclude"]
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "runs"], capture_output=True, text=True, check=True)
    shipped = {Path(f).parts[1] for f in tracked.stdout.split() if len(Path(f).parts) > 2}  # git's: not a local zoo
    assert "lmeval_tasks" in shipped
    mounted = {src.removeprefix("./runs/") for dst, src in cfg["file_mounts"].items() if src.startswith("./runs/")}
    assert shipped <= mounted and all(cfg["file_mounts"][f"/home/ubuntu/evomerge/runs/{d}"] == f"./runs/{d}" for d in shipped)
