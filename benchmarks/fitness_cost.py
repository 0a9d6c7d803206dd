"""Fitness at a fraction of the cost (issue 16): full scoring vs racing vs subset + estimate, judged on held-out data.

Each variant is the same search spending the same budget in examples scored (`budget: {examples: E}`);
along the way, at fractions of E, the best candidate so far (best dev objective in the journal) is scored
on held-out data. Mean over seeds. Two searches:
  zoo     runs/demo.yaml's zoo, sources and tasks with the search the demo had when this was measured
          (ZOO_SEARCH: CMA-ES over a TIES weight and density per layer and expert; dev = 200 J-math problems,
          teacher-forced exact match); held-out = the 400 J-math test problems. E defaults to 300 full
          evaluations' worth (60,000 examples).
  digits  runs/digits_m2n2.yaml (M2N2 over 19,210 MLP parameters; dev = 1,437 training images); held-out =
          the 360 test images. E defaults to 400 full evaluations' worth.
Target: the held-out score full scoring reaches with the whole budget, reached with <= 25% of it; or a
higher held-out score at the same budget.

Estimator accuracy: on each seed's full-scoring zoo run, the anchors (evomerge/run/frugal.py: fitted on the first
half of the candidates, as the planner fits them) estimate the second half from their anchors' scores;
Spearman rank correlation with their full-dev scores, beside a uniform random subset of the same size.

Measured (benchmarks/results/fitness_cost.json, 3 seeds, 2 shared cores):
  zoo (CMA-ES, 60,000 examples = 300 full evaluations): full reaches held-out 35.2%. Subset + estimate
  ends higher at equal examples (38.1%; seeds -3.8, +0.0, +12.5 points against full) but first reaches
  35.2% at 75% of the examples, not 25% (at 25%: 31.9%, as full). Racing barely acts under CMA-ES (~7% of
  candidates stopped: a generation's members differ by a few points, the Hoeffding-Serfling width on 200
  examples is ~0.2) and ends at 33.5%, within seed noise of full. Anchors estimate held-out candidates
  with Spearman 0.83 (a random subset of the same 30 examples: 0.73).
  digits (M2N2, 574,800 examples = 400 full evaluations): full reaches 60.7% test accuracy; racing and
  subset + estimate both pass it with 10% of the examples (62.8%, 62.7%) and end higher (63.0%, 63.5%).
  Neither wins the zoo demo clearly, and its budget is counted in evaluations: the demo keeps full scoring.

    python benchmarks/fitness_cost.py [--seeds 0,1,2] [--searches digits,zoo] [--variants full,racing,subset]
                                      [--zoo-examples 60000] [--digits-examples 574800] [--records R.jsonl] [--out FILE]
    python benchmarks/fitness_cost.py --summarize R0.jsonl R1.jsonl ... --out FILE
    python benchmarks/fitness_cost.py --plot benchmarks/results/fitness_cost.json --html curves.html
Prints JSON (and writes it to --out); --html draws the report's curves (held-out score against examples
scored, each strategy's mean over seeds and every seed) in one self-contained HTML file.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "runs")]

from benchmarks.memstat import emit, machine  # noqa: E402
from evomerge.run.assemble import build_handle, open_engine  # noqa: E402
from evomerge.config import load_config, parse_config  # noqa: E402
from evomerge.run.frugal import fit_anchors  # noqa: E402
from evomerge.run.store import RunStore  # noqa: E402

FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0)
# per search: about 10% of the dev set per chunk and 15% (zoo) / 10% (digits) as anchors
VARIANTS = {
    "zoo": {"full": {}, "racing": {"racing": {"chunk": 20, "confidence": 0.95}},
            "subset": {"subset": {"anchors": 30, "strata": 8}}},
    "digits": {"full": {}, "racing": {"racing": {"chunk": 144, "confidence": 0.95}},
               "subset": {"subset": {"anchors": 144, "strata": 12}}},
}


# The zoo search the artifact measured, pinned: the demo's own search has changed since (a Gaussian process on the
# answer's probability), and racing and subsets were not measured under it.
ZOO_SEARCH = {
    "space": {"name": "layer_weights", "options": {"method": "ties", "granularity": 1, "normalize": False,
                                                   "weight_max": 1.5, "initial_weight": 1.0, "initial_density": 0.2}},
    "optimizer": {"name": "cmaes", "options": {"sigma0": 0.2}},
    "metrics": ["teacher_exact", "token_accuracy"],
}


def search_config(search: str, variant: str, examples: int, seed: int):
    path = ROOT / "runs" / ("demo.yaml" if search == "zoo" else "digits_m2n2.yaml")
    cfg = load_config(path).to_dict()
    if search == "zoo":
        cfg["space"], cfg["optimizer"] = ZOO_SEARCH["space"], ZOO_SEARCH["optimizer"]
        cfg["fitness"]["tasks"] = [{**t, "metrics": ZOO_SEARCH["metrics"]} for t in cfg["fitness"]["tasks"]]
    cfg["fitness"] = {**cfg["fitness"], **VARIANTS[search][variant]}
    cfg["budget"] = {"examples": examples}
    cfg["seed"] = seed
    cfg.pop("holdout", None)
    return parse_config(cfg)


class ZooHeldOut:
    """The demo's first held-out task (J math, 400 test problems) on the best candidate's recipe."""

    def __init__(self):
        from evomerge.fitness.suite import TaskFitness

        cfg = load_config(ROOT / "runs" / "demo.yaml")
        self.handle = build_handle(cfg)
        self.fitness = TaskFitness.from_config(cfg.holdout.tasks[:1], base_dir=cfg.workdir)
        self.objective = self.fitness.objectives[0].name
        self._cache: dict[str, float] = {}

    def __call__(self, store: RunStore, candidate_id: int) -> float:
        recipe = store.recipe(candidate_id)
        key = recipe.to_yaml()
        if key not in self._cache:
            self.handle.set_recipe(recipe)
            self._cache[key] = self.fitness.evaluate(self.handle).objectives[self.objective]
        return self._cache[key]


def digits_heldout(store: RunStore, candidate_id: int) -> float:
    import digits_m2n2

    _, _, xte, yte = digits_m2n2.digits()
    return float(digits_m2n2.correct(np.asarray(store.candidates({candidate_id})[candidate_id].x), xte, yte).mean())


def curve(store: RunStore, budget: int, heldout) -> list[dict]:
    """At each fraction of the budget: the best candidate so far (dev objective) and its held-out score."""
    objective = store.objectives[0]
    points, spent, best, i = [], 0.0, None, 0
    evals = store.evaluations()
    for frac in FRACTIONS:
        # the last point takes every evaluation: the run stops at the first that reaches the budget
        while i < len(evals) and (frac == 1 or spent + evals[i].cost.get("examples", 0.0) <= frac * budget + 1e-9):
            e = evals[i]
            spent += e.cost.get("examples", 0.0)
            if e.ok and (best is None or objective.sign() * (e.objectives[objective.name] - best.objectives[objective.name]) > 0):
                best = e
            i += 1
        if best is None:
            continue
        points.append({"fraction": frac, "examples": spent, "evaluations": i, "best": best.candidate_id,
                       "dev": best.objectives[objective.name], "dev_measured": best.cost.get("examples") == len(best.per_example or []),
                       "heldout": heldout(store, best.candidate_id)})
    return points


def run_one(search: str, variant: str, examples: int, seed: int, heldout, tmp: Path) -> dict:
    cfg = search_config(search, variant, examples, seed)
    run_dir = tmp / f"{search}-{variant}-{seed}"
    t = time.perf_counter()
    engine = open_engine(cfg, run_dir, resume=False)
    reason = engine.run()
    seconds = time.perf_counter() - t
    store = engine.store
    evals = store.evaluations()
    n = max(len(e.per_example or []) for e in evals)
    partial = sum(e.cost.get("examples", n) < n for e in evals)
    out = {"seed": seed, "stop": reason, "seconds": round(seconds, 1), "evaluations": len(evals),
           "partially_scored": partial, "curve": curve(store, examples, heldout)}
    store.close()
    print(f"{search} {variant} seed {seed}: {len(evals)} evaluations ({partial} partial), {seconds:.0f} s, "
          f"held-out {out['curve'][-1]['heldout']:.4f}", file=sys.stderr, flush=True)
    return out


def mean_curve(runs: list[dict]) -> list[dict]:
    out = []
    for frac in FRACTIONS:
        pts = [p for r in runs for p in r["curve"] if p["fraction"] == frac]
        if len(pts) == len(runs):
            out.append({"fraction": frac, "examples": float(np.mean([p["examples"] for p in pts])),
                        "evaluations": float(np.mean([p["evaluations"] for p in pts])),
                        "heldout": float(np.mean([p["heldout"] for p in pts])),
                        "dev": float(np.mean([p["dev"] for p in pts]))})
    return out


def verdict(variants: dict) -> dict:
    """The issue's target against full scoring's held-out score at the whole budget."""
    full = variants.get("full")
    if not full:
        return {}
    target = full["mean"][-1]["heldout"]
    out = {"full_heldout_at_budget": target}
    for name, v in variants.items():
        if name == "full":
            continue
        reached = [p["fraction"] for p in v["mean"] if p["heldout"] >= target]
        out[name] = {"first_fraction_reaching_full": reached[0] if reached else None,
                     "reaches_with_25_percent": bool(reached and reached[0] <= 0.25),
                     "heldout_at_budget": v["mean"][-1]["heldout"],
                     "higher_at_equal_examples": v["mean"][-1]["heldout"] > target}
    return out


def estimator_accuracy(store: RunStore, anchors: int = 30, strata: int = 8, window: int = 100, seed: int = 0) -> dict:
    """Anchors fitted on the first half of a full run's candidates estimate the second half."""
    from scipy.stats import spearmanr

    rows = np.array([e.per_example for e in store.evaluations() if e.ok])
    half = len(rows) // 2
    history, held = rows[:half][-window:], rows[half:]
    a = fit_anchors(history, anchors, strata, seed)
    est = held[:, a.examples] @ np.asarray(a.weights) / np.sum(a.weights)
    truth = held.mean(1)
    rand = held[:, np.random.default_rng(seed).choice(rows.shape[1], len(a.examples), replace=False)].mean(1)
    return {"candidates": int(len(held)), "anchors": len(a.examples),
            "spearman_anchors": float(spearmanr(est, truth).statistic),
            "spearman_random_subset": float(spearmanr(rand, truth).statistic),
            "mae_anchors": float(np.abs(est - truth).mean()), "mae_random_subset": float(np.abs(rand - truth).mean())}


def summarize(lines: list[dict]) -> dict:
    """The report from the runs' records (one per search, variant and seed; estimator records beside)."""
    report: dict = {"fractions": list(FRACTIONS), "variants": VARIANTS}
    for search in dict.fromkeys(r["search"] for r in lines):
        runs = [r for r in lines if r["search"] == search and "curve" in r]
        variants = {}
        for variant in dict.fromkeys(r["variant"] for r in runs):
            mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
            variants[variant] = {"runs": mine, "mean": mean_curve(mine)}
        report[search] = {"examples_budget": runs[0]["budget"], "seeds": sorted({r["seed"] for r in runs}),
                          "variants": variants, "verdict": verdict(variants)}
        est = [r["estimator"] for r in lines if r["search"] == search and "estimator" in r]
        if est:
            report[search]["estimator"] = {"per_seed": est, **{f"mean_{k}": float(np.mean([e[k] for e in est]))
                                                               for k in est[0] if k.startswith(("spearman", "mae"))}}
    return report


def curves_html(report: dict) -> str:
    """The held-out score of the best so far against examples scored: per search a panel, per strategy its
    mean over seeds (each seed faint), full scoring's final score dotted."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    searches = [s for s, v in report.items() if isinstance(v, dict) and "variants" in v]
    fig = make_subplots(rows=1, cols=len(searches), subplot_titles=searches)
    for col, search in enumerate(searches, start=1):
        for k, (name, v) in enumerate(report[search]["variants"].items()):
            color = qualitative.Plotly[k % 10]
            for run in v["runs"]:
                fig.add_trace(go.Scatter(x=[p["examples"] for p in run["curve"]], y=[p["heldout"] for p in run["curve"]],
                                         mode="lines", line={"color": color, "width": 1}, opacity=0.3, showlegend=False,
                                         name=f"{search} {name} seed {run['seed']}"), row=1, col=col)
            fig.add_trace(go.Scatter(x=[p["examples"] for p in v["mean"]], y=[p["heldout"] for p in v["mean"]],
                                     mode="lines+markers", line={"color": color}, name=f"{search}: {name}",
                                     legendgroup=name), row=1, col=col)
        fig.add_hline(y=report[search]["verdict"]["full_heldout_at_budget"], line_dash="dot", row=1, col=col)
        fig.update_xaxes(title_text="examples scored", row=1, col=col)
        fig.update_yaxes(title_text="held-out score of the best so far", row=1, col=col)
    fig.update_layout(title="Fitness at a fraction of the cost (benchmarks/fitness_cost.py)")
    return fig.to_html(include_plotlyjs=True, full_html=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated search seeds")
    ap.add_argument("--searches", default="digits,zoo")
    ap.add_argument("--variants", default="full,racing,subset")
    ap.add_argument("--zoo-examples", type=int, default=300 * 200)
    ap.add_argument("--digits-examples", type=int, default=400 * 1437)
    ap.add_argument("--records", help="append each run's record to this JSONL file as it finishes (several "
                    "processes may share out the seeds; --summarize combines them)")
    ap.add_argument("--summarize", nargs="*", help="only build the report from these JSONL record files")
    ap.add_argument("--out")
    ap.add_argument("--plot", help="a report JSON to draw (with --html), running nothing")
    ap.add_argument("--html", help="also write the curves here (self-contained HTML)")
    args = ap.parse_args()
    if args.plot:
        if not args.html:
            raise SystemExit("--plot draws into the file --html names")
        Path(args.html).write_text(curves_html(json.loads(Path(args.plot).read_text())))
        return
    if args.summarize:
        lines = [json.loads(x) for f in args.summarize for x in Path(f).read_text().splitlines() if x.strip()]
        _finish({"machine": machine(), **summarize(lines)}, args)
        return
    lines = []

    def record(rec: dict) -> None:
        lines.append(rec)
        if args.records:
            with open(args.records, "a") as f:
                f.write(json.dumps(rec) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        for search in args.searches.split(","):
            budget = args.zoo_examples if search == "zoo" else args.digits_examples
            heldout = ZooHeldOut() if search == "zoo" else digits_heldout
            for seed in (int(s) for s in args.seeds.split(",")):
                for variant in args.variants.split(","):
                    rec = run_one(search, variant, budget, seed, heldout, Path(tmp))
                    record({"search": search, "variant": variant, "budget": budget, **rec})
                    run_dir = Path(tmp) / f"{search}-{variant}-{seed}"
                    if variant == "full" and search == "zoo":
                        with RunStore.open(run_dir, readonly=True) as s:
                            record({"search": search, "seed": seed, "estimator": estimator_accuracy(s, seed=seed)})
                    shutil.rmtree(run_dir)  # a digits run journals 150 kB of genome per candidate
    _finish({"machine": machine(), **summarize(lines)}, args)


def _finish(report: dict, args) -> None:
    emit(report, args.out)
    if args.html:
        Path(args.html).write_text(curves_html(report))


if __name__ == "__main__":
    main()
