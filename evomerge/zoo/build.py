"""`evomerge zoo build DIR`: train BASE, then the MATH and LANG experts from it, and write the task files.

Layout written: DIR/models/{base,math,lang} (HF checkpoint dirs: safetensors, config, tokenizer),
DIR/data/<task>.jsonl (lines {"prompt", "reference"}), DIR/build.json (seeds, steps, seconds, scores).
Everything is built in a scratch dir beside DIR and moved in at the end, so a failed build leaves DIR as it was."""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from evomerge.machine import cpu_model
from evomerge.zoo import tasks
from evomerge.zoo.languages import J_LETTERS
from evomerge.zoo.score import accuracy
from evomerge.zoo.tokenizer import char_tokenizer
from evomerge.zoo.train import Encoder, new_model, train


@dataclass(frozen=True)
class Stage:
    name: str
    mix: str
    steps: int
    lr: float
    warmup: int
    seed: int


STAGES = (
    Stage("base", "base", steps=2500, lr=2e-3, warmup=200, seed=1),
    Stage("math", "math", steps=500, lr=1e-3, warmup=50, seed=2),
    Stage("lang", "lang", steps=300, lr=1e-3, warmup=50, seed=3),
)
# Robustness gate: merges only beat their sources when MATH, trained on E only, still computes sums
# asked in J. Below this share of J dev problems with the right number, MATH is re-drawn with a new seed.
MATH_GATE = 55.0
MATH_TRIES = 4
SEED_STRIDE = 100
# `--seed N` shifts every stage's seed (its init and its data draws) by N * ZOO_SEED_STRIDE: another zoo from
# the same recipe, to see whether a result holds beyond one training draw. The held-out splits do not move.
ZOO_SEED_STRIDE = 1000

SCORED = ("math_j_test", "math_j_dev", "math_e_dev", "lang_j_dev")  # in build.json; the other test splits stay unseen
Progress = Callable[[str, int, int], None]  # (stage, steps done in this call, total steps planned)


def built_on() -> dict:
    """What a build's weights depend on besides its seeds, for its build.json: a build is byte-identical on one
    machine, but the libraries' numerics and the CPU's float kernels move it (the seed-1 zoo trained on an Intel
    Xeon and on an AMD EPYC gave other weights, with the same library versions)."""
    import transformers

    return {"cpu_model": cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def weights_sha256(models: Path, names) -> dict[str, str]:
    """Each checkpoint's sha256 (its one safetensors file), for build.json: a rebuild says whether it is the same zoo."""
    return {name: hashlib.sha256((models / name / "model.safetensors").read_bytes()).hexdigest() for name in names}


def tokenizer():
    return char_tokenizer(J_LETTERS, add_bos=True)


def math_reads_j(model, enc: Encoder, examples: list[tasks.Example]) -> float:
    """% of J math problems whose number (the reference without the J marker) MATH gets right."""
    return accuracy(model, enc, examples, chars=[len(ref.split(" ")[0]) for _, ref in examples])


def build(out: str | Path, *, scale: float = 1.0, math_tries: int = MATH_TRIES, base_from: str | Path | None = None,
          seed: int = 0, progress: Progress | None = None) -> dict:
    """Train the zoo into `out`; `scale` multiplies every stage's steps (tests use a tiny one).
    `base_from`: a BASE checkpoint dir to start the experts from instead of pretraining one (the slow stage).
    `seed`: the zoo's training seed (0 = the shipped zoo)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()  # our own bar counts training steps; shard-writing bars are noise
    tok = tokenizer()
    enc = Encoder(tok)
    splits = tasks.eval_splits()
    stages = {s.name: replace(s, steps=max(1, round(s.steps * scale)), warmup=max(1, round(s.warmup * scale)),
                              seed=s.seed + ZOO_SEED_STRIDE * seed) for s in STAGES}
    if base_from is not None:
        stages.pop("base")
    planned = sum(s.steps for s in stages.values())
    report: dict = {"arch": "", "zoo_seed": seed, "stages": {}, "scores": {},
                    "math_gate": {"threshold": MATH_GATE, "draws": []}}
    t_all = time.perf_counter()

    def run(stage: Stage, init_from=None):
        model = new_model(stage.seed)
        if init_from is not None:
            model.load_state_dict(init_from.state_dict())
        t0 = time.perf_counter()
        loss = train(model, tasks.sampler(tasks.MIXES[stage.mix](), stage.seed), enc, steps=stage.steps,
                     lr=stage.lr, warmup=stage.warmup, seed=stage.seed,
                     on_step=(lambda s, _l: progress(stage.name, 1, planned)) if progress else None)
        return model, {**asdict(stage), "final_loss": round(loss, 4), "seconds": round(time.perf_counter() - t0, 1)}

    if base_from is None:
        base, report["stages"]["base"] = run(stages["base"])
    else:
        from transformers import LlamaForCausalLM

        base = LlamaForCausalLM.from_pretrained(base_from).eval()
        report["stages"]["base"] = {"reused": str(base_from)}
    best = None
    for draw in range(math_tries):
        stage = replace(stages["math"], seed=stages["math"].seed + SEED_STRIDE * draw)
        if draw:
            planned += stage.steps
        model, info = run(stage, base)
        reads_j = math_reads_j(model, enc, splits["math_j_dev"])
        report["math_gate"]["draws"].append({"seed": stage.seed, "j_number_right": round(reads_j, 1)})
        if best is None or reads_j > best[0]:
            best = (reads_j, model, info)
        if reads_j >= MATH_GATE:
            break
    _, math, report["stages"]["math"] = best
    report["math_gate"]["passed"] = best[0] >= MATH_GATE
    lang, report["stages"]["lang"] = run(stages["lang"], base)
    report["build_seconds"] = round(time.perf_counter() - t_all, 1)
    report["arch"] = {k: v for k, v in base.config.to_dict().items()
                      if k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size", "max_position_embeddings")}
    report["parameters"] = sum(p.numel() for p in base.parameters())
    report["built_on"] = built_on()
    for name, model in (("base", base), ("math", math), ("lang", lang)):
        report["scores"][name] = {task: round(accuracy(model, enc, splits[task]), 1) for task in SCORED}

    scratch = Path(tempfile.mkdtemp(prefix=".zoo-build-", dir=out))
    for name, model in (("base", base), ("math", math), ("lang", lang)):
        model.save_pretrained(scratch / "models" / name, safe_serialization=True)
        tok.save_pretrained(str(scratch / "models" / name))
    report["weights_sha256"] = weights_sha256(scratch / "models", ("base", "math", "lang"))
    (scratch / "data").mkdir()
    for task, exs in splits.items():
        lines = (json.dumps({"prompt": p, "reference": r}, ensure_ascii=False) for p, r in exs)
        (scratch / "data" / f"{task}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (scratch / "build.json").write_text(json.dumps(report, indent=2) + "\n")
    install(scratch, out, ("models", "data", "build.json"))
    return report


def install(scratch: Path, out: Path, entries: tuple[str, ...]) -> None:
    """A finished build's entries moved from its scratch folder into `out`, replacing the previous build's, and
    the scratch folder removed: a build that fails earlier leaves the previous zoo whole."""
    for entry in entries:
        target = out / entry
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        (scratch / entry).rename(target)
    scratch.rmdir()
