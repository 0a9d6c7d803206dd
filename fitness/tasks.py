"""Task suites: examples (from JSONL or a Python generator), a prompt template, generation settings,
metrics, and a deterministic split.

JSONL: one object per line, `{"prompt": str, "reference": str}` plus optional `choices` (list of str,
the reference being one of them), `split` ("train"/"dev"/"test": overrides the hashed split) and any
other fields, usable in `prompt_format` (e.g. "Q: {prompt}\nA:"). Blank lines are skipped.

Splits are by a hash of (split_seed, prompt), so an example keeps its split when the file grows or is
reordered, and few-shot demonstrations come from the train split only, never from the scored examples.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.records import UserError
from evomerge.registry import load_callable
from evomerge.fitness.handle import Prompt, Sampling
from evomerge.fitness.metrics import Metric, make_metric

SPLITS = ("train", "dev", "test", "all")

# Public benchmarks whose test sets must not be a search's fitness (the search would overfit the very
# numbers it will be judged by). Matched as whole tokens of the task's name and source.
PUBLIC_BENCHMARKS = (
    "gsm8k", "mgsm", "mmlu", "hellaswag", "arc", "truthfulqa", "winogrande", "humaneval", "mbpp", "bbh",
    "gpqa", "ifeval", "math500", "hendrycks", "drop", "piqa", "boolq", "lambada", "jcommonsenseqa", "jaqket",
)
# Benchmarks that are only ever published as evaluation sets: any use is a test-set use.
TEST_ONLY = ("mgsm", "humaneval", "truthfulqa", "gpqa", "ifeval", "math500", "bbh")


@dataclass
class Example:
    prompt: str
    reference: str
    choices: list[str] | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    split: str | None = None  # given in the data; otherwise hashed


_KEYS = (
    "name", "path", "generator", "generator_args", "template", "prompt_format", "system", "fewshot",
    "fewshot_separator", "max_new_tokens", "temperature", "top_p", "stop", "metrics", "split", "fractions",
    "split_seed", "limit", "allow_test_set",
)


@dataclass
class TaskSpec:
    """A task's configuration, as written in a run config (every field but name optional)."""

    name: str
    path: str | None = None
    generator: str | None = None  # "module:function" returning examples
    generator_args: dict[str, Any] = field(default_factory=dict)
    template: str = "plain"  # or "chat": the tokenizer's chat template (an API: chat completions)
    prompt_format: str = "{prompt}"
    system: str | None = None  # chat only
    fewshot: int = 0
    fewshot_separator: str = "\n"
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    metrics: list[Any] = field(default_factory=lambda: ["exact_match"])
    split: str = "all"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    limit: int | None = None
    allow_test_set: bool = False

    @classmethod
    def from_dict(cls, d: Any, base_dir: str | Path | None = None) -> TaskSpec:
        if not isinstance(d, dict) or "name" not in d:
            raise UserError(f"a task is a mapping with at least a 'name', got {d!r}")
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise UserError(f"task {d['name']!r}: unknown key {unknown[0]!r}; valid keys: {', '.join(_KEYS)}")
        if d.get("path") is not None and not isinstance(d["path"], str):
            raise UserError(f"task {d['name']!r}: path must be a file name, got {d['path']!r}")
        spec = cls(**d)
        if spec.path is not None and base_dir is not None and not Path(spec.path).is_absolute():
            spec.path = str(Path(base_dir) / spec.path)
        spec.validate()
        return spec

    def validate(self) -> None:
        where = f"task {self.name!r}"
        try:  # YAML gives strings where numbers belong: coerce, or name the field
            for key, kind in (("fewshot", int), ("max_new_tokens", int), ("temperature", float), ("top_p", float),
                              ("split_seed", int), ("limit", int)):
                value = getattr(self, key)
                if value is not None and not isinstance(value, bool):
                    setattr(self, key, kind(value))
        except (TypeError, ValueError):
            raise UserError(f"{where}: {key} must be a number, got {value!r}") from None
        if not isinstance(self.metrics, list) or not self.metrics:
            raise UserError(f"{where}: metrics is a non-empty list, got {self.metrics!r}")
        if (self.path is None) == (self.generator is None):
            raise UserError(f"{where}: give exactly one of 'path' (JSONL) or 'generator' (module:function)")
        if self.template not in ("plain", "chat"):
            raise UserError(f"{where}: template must be plain or chat, got {self.template!r}")
        if self.split not in SPLITS:
            raise UserError(f"{where}: split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        fr = tuple(float(f) for f in self.fractions)
        if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise UserError(f"{where}: fractions are (train, dev, test), non-negative, summing to 1; got {self.fractions!r}")
        self.fractions = fr  # type: ignore[assignment]
        if self.fewshot < 0 or self.max_new_tokens < 1 or (self.limit is not None and self.limit < 1):
            raise UserError(f"{where}: fewshot >= 0, max_new_tokens >= 1 and limit >= 1 are required")
        if isinstance(self.stop, str):
            self.stop = [self.stop]

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_p, self.stop)


@dataclass
class Task:
    """A loaded task: its spec, metrics, the examples it scores and the few-shot demonstrations."""

    spec: TaskSpec
    examples: list[Example]
    demos: list[Example]
    metrics: list[Metric]

    @property
    def name(self) -> str:
        return self.spec.name

    def prompt(self, ex: Example) -> Prompt:
        """The example's prompt as the model sees it: few-shot demonstrations first, then the question."""
        s = self.spec
        if s.template == "plain":
            shots = [self._format(d) + d.reference for d in self.demos]
            return s.fewshot_separator.join([*shots, self._format(ex)])
        chat: list[dict[str, str]] = [{"role": "system", "content": s.system}] if s.system else []
        for d in self.demos:
            chat += [{"role": "user", "content": self._format(d)}, {"role": "assistant", "content": d.reference}]
        return chat + [{"role": "user", "content": self._format(ex)}]

    def _format(self, ex: Example) -> str:
        try:
            return self.spec.prompt_format.format(prompt=ex.prompt, reference=ex.reference, **ex.fields)
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"task {self.name!r}: prompt_format {self.spec.prompt_format!r} cannot be filled: {e!r}") from e


def load_task(spec: TaskSpec | dict[str, Any], base_dir: str | Path | None = None) -> Task:
    if isinstance(spec, dict):
        spec = TaskSpec.from_dict(spec, base_dir)
    else:
        spec.validate()
    guard_test_set(spec)
    metrics = [make_metric(m, spec.name) for m in spec.metrics]
    seen: dict[str, str] = {}
    for m in metrics:
        if m.alias in seen:
            raise UserError(f"task {spec.name!r}: metrics {seen[m.alias]!r} and {m.name!r} both name objective "
                            f"{m.objective(spec.name)!r}; give one an 'as'")
        seen[m.alias] = m.name
    examples = read_jsonl(spec.path) if spec.path is not None else from_generator(spec.generator, spec.generator_args)
    if not examples:
        raise UserError(f"task {spec.name!r}: no examples")
    if any(m.kind == "choice" for m in metrics):
        for i, ex in enumerate(examples):
            if not ex.choices or ex.reference not in ex.choices:
                raise UserError(f"task {spec.name!r}: example {i} needs 'choices' containing its reference for metric choice")
    by_split = {name: [] for name in ("train", "dev", "test")}
    for ex in examples:
        by_split[ex.split or hashed_split(ex.prompt, spec.split_seed, spec.fractions)].append(ex)
    chosen = examples if spec.split == "all" else by_split[spec.split]
    if spec.fewshot:
        pool = by_split["train"] if spec.split != "train" else []
        if len(pool) < spec.fewshot:
            raise UserError(f"task {spec.name!r}: {spec.fewshot} few-shot demonstrations need that many train-split "
                            f"examples outside the scored split; there are {len(pool)}")
        demos = pool[: spec.fewshot]
        chosen = [ex for ex in chosen if all(ex is not d for d in demos)]
    else:
        demos = []
    if spec.limit is not None:
        chosen = chosen[: spec.limit]
    if not chosen:
        raise UserError(f"task {spec.name!r}: split {spec.split!r} has no examples")
    return Task(spec=spec, examples=chosen, demos=demos, metrics=metrics)


def hashed_split(prompt: str, seed: int, fractions: tuple[float, float, float]) -> str:
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "dev" if u < fractions[0] + fractions[1] else "test"


def guard_test_set(spec: TaskSpec) -> None:
    """Refuse a public benchmark's test set as fitness unless the user insists (allow_test_set: true)."""
    if spec.allow_test_set:
        return
    where = "/".join(Path(spec.path).parts[-2:]) if spec.path else spec.generator  # file and its folder: gsm8k/test.jsonl
    tokens = set(re.split(r"[^a-z0-9]+", f"{spec.name} {where}".lower()))
    bench = sorted(tokens & set(PUBLIC_BENCHMARKS))
    if spec.split == "test":
        raise UserError(f"task {spec.name!r} scores its test split; a search scored on it overfits the numbers it "
                        "will be judged by. Use split: dev, or set allow_test_set: true to insist")
    if not bench:
        return
    if spec.split == "test" or "test" in tokens or set(bench) & set(TEST_ONLY):
        raise UserError(f"task {spec.name!r} looks like the {bench[0]} test set; a search scored on it overfits the "
                        "numbers it will be judged by. Use a train/dev set, or set allow_test_set: true to insist")


def read_jsonl(path: str | Path) -> list[Example]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"task file not found: {p}")
    out: list[Example] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            out.append(_example(obj, f"{p}:{lineno}"))
    return out


def from_generator(target: str, args: dict[str, Any]) -> list[Example]:
    """Examples from `module:function(**args)`, which returns dicts like a JSONL line or (prompt, reference)."""
    fn = load_callable(target, "task generator")
    try:
        items: Iterable[Any] = fn(**args)
        return [_example(item, f"{target} item {i}") for i, item in enumerate(items)]
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"task generator {target} failed: {type(e).__name__}: {e}") from e


def _example(obj: Any, where: str) -> Example:
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        obj = {"prompt": obj[0], "reference": obj[1]}
    if not isinstance(obj, dict):
        raise UserError(f"{where}: an example is an object with prompt and reference, got {type(obj).__name__}")
    for key in ("prompt", "reference"):
        if not isinstance(obj.get(key), str):
            raise UserError(f"{where}: {key!r} must be a string" if key in obj else f"{where}: missing {key!r}")
    choices = obj.get("choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise UserError(f"{where}: 'choices' must be a list of strings")
    split = obj.get("split")
    if split is not None and split not in ("train", "dev", "test"):
        raise UserError(f"{where}: 'split' must be train, dev or test, got {split!r}")
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "reference", "choices", "split")}
    return Example(prompt=obj["prompt"], reference=obj["reference"], choices=choices, fields=extra, split=split)
