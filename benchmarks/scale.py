"""Scale: a search worker's memory and weight-swap cost on real-size checkpoints, against mergekit, same run.

Random Llama-shaped checkpoints stored in bf16 (benchmarks/scale_models.py: ≈0.2B and ≈1B parameters), base + 3
experts, TIES and DARE-TIES with per-layer weight and density gradients. Per size and method, each row runs in a
fresh subprocess (clean RSS and peak), with the sources' files read once beforehand (a warm page cache):
- evomerge: `Materializer(sources, base="base")`, then a float32 HF model on CPU (the scoring model) built in the
  order `evomerge run` builds them (the sources' pages are mapped by a background thread meanwhile:
  `sources_mapped_before_first` says whether it had finished), + `load_into(recipe, model)`: private (anonymous)
  and shared (file-backed) resident bytes per parameter after the load, after the first and after the warm
  candidates, and their peaks; first vs warm candidate time (the kernels' one-time load, per process, timed apart
  on a tiny model); load_into's throughput as a fraction of this machine's copy bandwidth (a torch copy with the
  same threads, measured in the row's process right after its warm candidates: the host's bandwidth drifts);
- mergekit 0.1.5 in memory, mergekit-evolve style: its planner's in-memory plan executed by its Executor into a
  live bf16 HF model, as `mergekit.evo.actors.InMemoryMergeEvaluator` does (without lm-eval), with the genome's
  config (dtype bfloat16, int8_mask);
- mergekit 0.1.5 `run_merge` of the recipe's mergekit YAML to a temporary directory (mergekit-yaml in process).
Targets (booleans, from ratios): private memory above the interpreter's own <= scoring model + 10%; first candidate
<= 2x a warm one; load_into >= 40% of copy bandwidth; >= 5x faster per candidate than mergekit's in-memory path.

Bytes load_into moves per candidate: what the kernels streamed, every pass counted (evomerge.merge.passes.traffic): the
merge reads base + 3 experts in their stored dtype and writes the scoring model's parameters; a rescale (DARE) reads
each expert and the base once more, a trim's threshold search part of them.

    python benchmarks/scale.py [--sizes 0.2b,1b] [--out benchmarks/results/scale.json] [--cache /tmp/evomerge-scale]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's evomerge, whichever one the venv's editable install points at

from benchmarks import memstat, scale_models  # noqa: E402

METHODS = ("ties", "dare_ties")
ROWS = ("evomerge", "mergekit_in_memory", "mergekit_run_merge")
TARGETS = {"private_over_scoring_model_max": 1.10, "first_over_warm_max": 2.0,
           "fraction_of_copy_bandwidth_min": 0.40, "speedup_vs_mergekit_in_memory_min": 5.0}


# --- measurements (each in its own subprocess) -------------------------------------------------------------

def scoring_model(base_dir: str, dtype):
    """A model built from the base's config in `dtype`, its pages touched (a scoring model is resident)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_dir), dtype=dtype)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.is_floating_point():
                t.zero_()
    return model, sum(t.nbytes for t in (*model.parameters(), *model.buffers()))


def run_candidates(swap, recipes: list) -> tuple[dict, dict]:
    """Time `swap` on each recipe: the first, then the warm ones; memory after each phase and its peaks."""
    out, mem = {}, {}
    with memstat.PeakSampler() as first:
        t = time.perf_counter()
        swap(recipes[0], 0)
        out["first_candidate_s"] = time.perf_counter() - t
    mem["after_first"], mem["peak_first"] = memstat.status(), first.peak
    times = []
    with memstat.PeakSampler() as warm:
        for i, r in enumerate(recipes[1:], start=1):
            t = time.perf_counter()
            swap(r, i)
            times.append(time.perf_counter() - t)
    mem["after_warm"], mem["peak_warm"] = memstat.status(), warm.peak
    out["warm_candidates_s"] = times
    out["warm_candidate_s"] = statistics.median(times) if times else out["first_candidate_s"]  # none: the first
    return out, mem


def measure_evomerge(sources: dict[str, str], method: str, args) -> dict:
    import torch

    from evomerge.merge import Materializer, passes
    from evomerge.recipe import Recipe

    # the kernels load (compiled, or from numba's cache) on first use, once per process whatever the model's size:
    # timed apart on the tiny checkpoints, so the first candidate's time is what this size costs
    t = time.perf_counter()
    Materializer(scale_models.checkpoints("tiny", args.cache), base="base").materialize(
        Recipe.from_dict(scale_models.candidate(method, 0)))
    kernel_load_s = time.perf_counter() - t
    mem = {"baseline": memstat.status()}
    with memstat.PeakSampler() as load:
        t = time.perf_counter()
        mat = Materializer(sources, base="base", threads=args.threads)
        load_s = time.perf_counter() - t
    mem["after_load"], mem["peak_load"] = memstat.status(), load.peak
    # then the scoring model, as `evomerge run` builds them, while a thread maps the sources' pages (sources.map_pages)
    t = time.perf_counter()
    model, model_bytes = scoring_model(sources["base"], torch.float32)
    model_s = time.perf_counter() - t
    mapped = mat.mapping is not None and not mat.mapping.is_alive()
    mem["after_model"] = memstat.status()
    recipes = [Recipe.from_dict(scale_models.candidate(method, i)) for i in range(1 + args.warm)]
    moved: list[int] = []  # bytes the kernels streamed per candidate (every pass: trims' included)

    def swap(r, i):
        before = passes.traffic.read + passes.traffic.written
        mat.load_into(r, model)
        moved.append(passes.traffic.read + passes.traffic.written - before)

    timing, m = run_candidates(swap, recipes)
    timing["bytes_moved"] = moved
    mem |= m
    mem["peak_rss"] = memstat.status()["VmHWM"]
    timing["copy_gb_s_after_warm"] = copy_gb_s(args.bandwidth_mib)
    return {"scoring_model_bytes": model_bytes, "scoring_model_dtype": "float32", "summary_bytes": sum(s.nbytes for s in mat.summaries.values()),
            "kernel_load_s": kernel_load_s, "load_s": load_s, "scoring_model_s": model_s,
            "sources_mapped_before_first": mapped, **timing, "memory": mem}


def mergekit_config(recipe: dict, sources: dict[str, str], evolve: bool):
    """The recipe as mergekit's MergeConfiguration; `evolve`: as mergekit-evolve's genome writes it."""
    import yaml
    from mergekit.config import MergeConfiguration

    from evomerge.merge.mergekit_yaml import to_mergekit
    from evomerge.recipe import Recipe

    cfg = yaml.safe_load(to_mergekit(Recipe.from_dict(recipe), sources))
    if evolve:
        cfg["dtype"] = "bfloat16"
        cfg["parameters"] = {**(cfg.get("parameters") or {}), "int8_mask": True}
    return MergeConfiguration.model_validate(cfg)


def measure_mergekit_in_memory(sources: dict[str, str], method: str, args) -> dict:
    """mergekit-evolve's InMemoryMergeEvaluator minus lm-eval: one live bf16 model, each candidate planned in
    memory, executed by mergekit's Executor and copied into the model's parameters."""
    import logging

    import torch
    from mergekit.architecture import arch_info_for_config
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache, ReturnTensor
    from mergekit.merge import _model_out_config
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner
    from transformers import AutoConfig

    logging.getLogger("mergekit").setLevel(logging.ERROR)
    mem = {"baseline": memstat.status()}
    options = MergeOptions(quiet=True)
    LoaderCache().setup(options)
    configs = [mergekit_config(scale_models.candidate(method, i), sources, evolve=True) for i in range(1 + args.mergekit_warm)]
    info = arch_info_for_config(AutoConfig.from_pretrained(sources["base"]))
    out_cfg = _model_out_config(configs[0], info)
    out_cfg.use_cache = True
    model, model_bytes = scoring_model(sources["base"], torch.bfloat16)
    params = dict(model.named_parameters())
    mem["after_model"] = memstat.status()

    def plan_in_memory(cfg) -> list:
        """`MergePlanner.plan_in_memory` as mergekit 0.1.5 writes it, but with the ReturnTensor tasks built
        unvalidated: its pydantic check rejects them here (Task[Optional[Tensor]] is not a Task[Tensor]) and
        raises "Can't instantiate abstract class Task[Tensor]", i.e. mergekit-evolve's in-memory mode fails."""
        planner = MergePlanner(cfg, info, options, out_cfg)
        planner._plan()
        return [ReturnTensor.model_construct(weight_info=w, tensor_task=t, dtype=w.force_dtype or cfg.out_dtype)
                for w, t in planner._tensors]

    def swap(cfg, i: int) -> None:
        torch.manual_seed(i)  # DARE's masks
        for task, value in Executor(plan_in_memory(cfg), math_device="cpu", storage_device="cpu").run(quiet=True):
            params[task.weight_info.name].data.copy_(value)
            del value

    timing, m = run_candidates(swap, configs)
    mem |= m
    mem["peak_rss"] = memstat.status()["VmHWM"]
    return {"scoring_model_bytes": model_bytes, "scoring_model_dtype": "bfloat16", **timing, "memory": mem}


def measure_mergekit_run_merge(sources: dict[str, str], method: str, args) -> dict:
    import logging

    import torch
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    logging.getLogger("mergekit").setLevel(logging.ERROR)
    mem = {"baseline": memstat.status()}
    configs = [mergekit_config(scale_models.candidate(method, i), sources, evolve=False) for i in range(1 + args.mergekit_warm)]
    scratch = Path(tempfile.mkdtemp(prefix="scale-mergekit-"))

    def swap(cfg, i: int) -> None:
        torch.manual_seed(i)
        run_merge(cfg, str(scratch / "out"), MergeOptions(quiet=True, write_model_card=False))
        shutil.rmtree(scratch / "out")

    try:
        timing, m = run_candidates(swap, configs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    mem |= m
    mem["peak_rss"] = memstat.status()["VmHWM"]
    return {**timing, "memory": mem}


def copy_gb_s(mib: int) -> float:
    """Copy bandwidth (bytes read + written per second, best of 5) of a torch copy far larger than the caches,
    with the row's threads."""
    import torch

    src, dst = torch.rand(mib * (1 << 20) // 4), torch.empty(mib * (1 << 20) // 4)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


MEASURE = {"evomerge": measure_evomerge, "mergekit_in_memory": measure_mergekit_in_memory,
           "mergekit_run_merge": measure_mergekit_run_merge}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = MEASURE[args.measure](scale_models.checkpoints(args.size, args.cache), args.method, args)
    print(json.dumps(result))


# --- the parent: builds, runs each row in a subprocess, derives ratios -------------------------------------

def warm_page_cache(sources: dict[str, str]) -> None:
    for d in sources.values():
        for f in Path(d).glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def spawn(kind: str, args, size: str, method: str) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, "--size", size, "--method", method, "--cache", args.cache,
           "--threads", str(args.threads), "--warm", str(args.warm), "--mergekit-warm", str(args.mergekit_warm),
           "--bandwidth-mib", str(args.bandwidth_mib)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    print(f"[scale] {size} {method} {kind} ...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}" + (" (killed: out of memory?)" if done.returncode == -9 else "") + f": {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def per_param(row: dict, params: int) -> dict:
    """Resident bytes per parameter above the process's own baseline (interpreter + libraries) at each phase."""
    mem = row["memory"]
    base = mem["baseline"]
    out = {}
    for phase in ("after_model", "after_load", "after_first", "after_warm", "peak_load", "peak_first", "peak_warm"):
        if phase in mem:
            out[phase] = {"private": round((mem[phase]["RssAnon"] - base["RssAnon"]) / params, 3),
                          "shared": round((mem[phase]["RssFile"] - base["RssFile"]) / params, 3)}
    out["peak_rss"] = round(mem["peak_rss"] / params, 3)
    return out


def ratios_of(rows: dict, params: int, stored: int) -> dict:
    """One method's ratios from its rows (evomerge's against its own scoring model, the copy bandwidth measured
    beside its warm candidates and mergekit's rows)."""
    ev = rows["evomerge"]
    mem, model = ev["memory"], ev["scoring_model_bytes"]
    peak_private = max(mem[p]["RssAnon"] for p in ("after_model", "peak_load", "peak_first", "peak_warm"))
    times = ev["warm_candidates_s"]
    warm = 1 + min(range(len(times)), key=lambda k: abs(times[k] - ev["warm_candidate_s"])) if times else 0
    moved = ev["bytes_moved"][warm]  # the median warm candidate's bytes, as the kernels counted them
    out = {
        "private_peak_over_scoring_model": (peak_private - mem["baseline"]["RssAnon"]) / model,
        "private_after_warm_over_scoring_model": (mem["after_warm"]["RssAnon"] - mem["baseline"]["RssAnon"]) / model,
        "materializer_private_peak_bytes_per_parameter": (peak_private - mem["after_model"]["RssAnon"]) / params,
        "first_over_warm": ev["first_candidate_s"] / ev["warm_candidate_s"],
        "first_with_kernel_load_over_warm": (ev["first_candidate_s"] + ev["kernel_load_s"]) / ev["warm_candidate_s"],
        "load_into_bytes_moved": moved,
        "load_into_gb_s": moved / ev["warm_candidate_s"] / 1e9,
    }
    out["load_into_fraction_of_copy_bandwidth"] = out["load_into_gb_s"] / ev["copy_gb_s_after_warm"]
    for mk in ("mergekit_in_memory", "mergekit_run_merge"):
        if mk in rows and "error" not in rows[mk]:
            out[f"speedup_vs_{mk}"] = rows[mk]["warm_candidate_s"] / ev["warm_candidate_s"]
    return out


def targets_of(ratios: dict) -> dict:
    checks = {
        "private_memory_within_scoring_model_plus_10pct": ("private_peak_over_scoring_model", "private_over_scoring_model_max"),
        "first_within_2x_warm": ("first_over_warm", "first_over_warm_max"),
        "load_into_at_least_40pct_of_copy_bandwidth": ("load_into_fraction_of_copy_bandwidth", "fraction_of_copy_bandwidth_min"),
        "at_least_5x_mergekit_in_memory": ("speedup_vs_mergekit_in_memory", "speedup_vs_mergekit_in_memory_min"),
    }
    return {name: ratios[r] <= TARGETS[t] if t.endswith("_max") else ratios[r] >= TARGETS[t]
            for name, (r, t) in checks.items() if r in ratios}


def summarize(size: str, sources: dict[str, str], results: dict) -> dict:
    params = scale_models.parameters(size)
    stored = sum(Path(f).stat().st_size for f in Path(sources["base"]).glob("*.safetensors"))
    out: dict = {"parameters": params, "shape": scale_models.SIZES[size], "stored_dtype": "bfloat16",
                 "experts": len(scale_models.EXPERTS), "source_bytes_each": stored}
    for method, rows in results.items():
        entry = {name: row if "error" in row else {**row, "bytes_per_parameter": per_param(row, params)}
                 for name, row in rows.items()}
        if "error" not in rows.get("evomerge", {"error": "not run"}):
            entry["ratios"] = ratios_of(rows, params, stored)
            entry["targets"] = targets_of(entry["ratios"])
        out[method] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.2b,1b", help=f"comma-separated, of {', '.join(scale_models.SIZES)}")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--cache", default="/tmp/evomerge-scale", help="where the checkpoints are built (reused when present)")
    ap.add_argument("--threads", type=int, default=1, help="torch and merge threads of every row")
    ap.add_argument("--warm", type=int, default=3, help="evomerge candidates after the first")
    ap.add_argument("--mergekit-warm", type=int, default=1, help="mergekit candidates after the first (0: the first is its time)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rows", default=",".join(ROWS), help="which of the rows to run")
    ap.add_argument("--bandwidth-mib", type=int, default=512, help="size of the copy that measures bandwidth")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per row")
    ap.add_argument("--measure", choices=ROWS, help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        child(args)
        return

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in scale_models.SIZES]
    if bad:
        raise SystemExit(f"unknown size {bad[0]!r}; sizes: {', '.join(scale_models.SIZES)}")
    methods, rows = args.methods.split(","), args.rows.split(",")
    report: dict = {"benchmark": "scale", "machine": memstat.machine(), "versions": memstat.versions(ROOT),
                    "threads": args.threads, "warm_candidates": {"evomerge": args.warm, "mergekit": args.mergekit_warm},
                    "targets": TARGETS, "sizes": {}}
    for size in sizes:
        print(f"[scale] building / reusing {size} checkpoints under {args.cache}", file=sys.stderr, flush=True)
        sources = scale_models.checkpoints(size, args.cache)
        results: dict = {}
        for method in methods:
            results[method] = {}
            for row in rows:
                warm_page_cache(sources)
                results[method][row] = spawn(row, args, size, method)
        report["sizes"][size] = summarize(size, sources, results)
    memstat.emit(report, args.out)


if __name__ == "__main__":
    main()
