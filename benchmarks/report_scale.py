"""Rendering time, file size and peak memory of `evomerge report` on runs of 10,000 evaluations.

Two synthetic stores, written through RunStore as a run writes them: `layer_weights` (two objectives, a TIES
recipe per candidate over 2 models x 16 layer groups x weight and density: 64 named dimensions, a Pareto front,
hover labels from every recipe) and `digits` (the digits M2N2 run's shape: one objective, 19,210 flat
dimensions, per-example scores). The baseline, measured in the same run, is `evomerge status` on the same store
(what reading the run costs at all): `ratio_to_status`; the size is compared with plotly.js, embedded once.
Prints JSON (and writes it with --out).

    python benchmarks/report_scale.py [--evaluations 10000] [--out benchmarks/results/report_scale.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memstat import machine, reset_peak, status  # noqa: E402

from evomerge.recipe import Recipe  # noqa: E402
from evomerge.records import Candidate, Evaluation, Objective  # noqa: E402
from evomerge.run.store import RunStore  # noqa: E402

LAYERS = 16
BATCH = 16  # candidates per ask, as a run with 16 workers


def _layer_weights(run_dir: Path, n: int, rng) -> None:
    names = [f"{m}.{p}.layers_{2 * i}-{2 * i + 1}" for m in ("math", "lang") for p in ("weight", "density")
             for i in range(LAYERS)]
    objs = [Objective("acc/math_j", "max"), Objective("acc/lang_j", "max")]
    store = RunStore.create(run_dir, {"space": {"name": "layer_weights"}}, objectives=objs, space_names=names, seed=0)
    for start in range(0, n, BATCH):
        xs = rng.uniform(0, 1, (min(BATCH, n - start), len(names)))
        cands = [Candidate(id=start + k, x=list(x), meta={}) for k, x in enumerate(xs)]
        recipes = [Recipe.from_dict({"merge_method": "ties", "base_model": "base", "models": [
            {"model": m, "parameters": {"weight": list(x[j * 2 * LAYERS: j * 2 * LAYERS + LAYERS]),
                                        "density": list(x[j * 2 * LAYERS + LAYERS: (j + 1) * 2 * LAYERS])}}
            for j, m in enumerate(("math", "lang"))]}) for x in xs]
        store.record_ask(len(cands), cands, recipes)
        w = xs[:, :LAYERS].mean(axis=1)
        store.record_evaluations([
            Evaluation(candidate_id=c.id, objectives={"acc/math_j": float(0.9 * a - 0.2 * b + 0.05 * r),
                                                      "acc/lang_j": float(0.8 * b - 0.3 * a + 0.05 * r)},
                       timings={"materialize": 0.4, "score": 2.1}, worker="w0")
            for c, a, b, r in zip(cands, w, xs[:, 2 * LAYERS: 3 * LAYERS].mean(axis=1), rng.uniform(0, 1, len(cands)))])
    store.close()


def _digits(run_dir: Path, n: int, rng) -> None:
    dims, examples = 19_210, 900
    names = [f"x{i}" for i in range(dims)]
    store = RunStore.create(run_dir, {"space": {"points": "digits_m2n2:pretrained"}},
                            objectives=[Objective("train_acc", "max")], space_names=names, seed=0)
    for start in range(0, n, BATCH):
        k = min(BATCH, n - start)
        cands = [Candidate(id=start + i, x=list(rng.normal(0, 1, dims)), meta={}) for i in range(k)]
        store.record_ask(k, cands)
        store.record_evaluations([
            Evaluation(candidate_id=c.id, objectives={"train_acc": float(p.mean())}, per_example=p.tolist(),
                       timings={"score": 0.05}, worker="w0")
            for c, p in zip(cands, (rng.uniform(0, 1, (k, examples)) < 0.6).astype(float))])
    store.close()


def measure(kind: str, n: int, root: Path) -> dict:
    from plotly.offline import get_plotlyjs

    from evomerge.results.report import write_report
    from evomerge.results.journal import run_status

    run_dir = root / kind
    t = time.perf_counter()
    (_layer_weights if kind == "layer_weights" else _digits)(run_dir, n, np.random.default_rng(0))
    build_s = time.perf_counter() - t
    (run_dir / "holdout.json").write_text(json.dumps({"rows": {"MATH": {"acc": 0.4}, "evolved best": {"acc": 0.6}},
                                                      "best": 0, "seed": 0, "percent": True}))
    t = time.perf_counter()
    run_status(run_dir)
    status_s = time.perf_counter() - t
    reset_peak()
    before = status()["VmRSS"]
    t = time.perf_counter()
    write_report(run_dir, root / f"{kind}.html")
    render_s = time.perf_counter() - t
    size = (root / f"{kind}.html").stat().st_size
    js = len(get_plotlyjs().encode())
    return {"evaluations": n, "store_MB": round((run_dir / "run.sqlite").stat().st_size / 1e6, 1),
            "store_build_s": round(build_s, 1), "status_s": round(status_s, 2), "render_s": round(render_s, 2),
            "ratio_to_status": round(render_s / status_s, 2), "html_MB": round(size / 1e6, 2),
            "plotly_js_MB": round(js / 1e6, 2), "data_MB": round((size - js) / 1e6, 2),
            "peak_rss_over_start_MB": round((status()["VmHWM"] - before) / 1e6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evaluations", type=int, default=10_000)
    ap.add_argument("--kinds", default="layer_weights,digits")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="report_scale") as tmp:
        result = {"machine": machine(), "runs": {k: measure(k, args.evaluations, Path(tmp))
                                                 for k in args.kinds.split(",")}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
