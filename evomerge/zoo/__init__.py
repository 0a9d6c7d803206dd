"""The zoo: tiny Llama models built here, so evomerge runs and is tested with no model hub.

The trained zoo ships in this folder (built by `evomerge zoo build evomerge/zoo`): models/{base,math,lang}
and data/<task>.jsonl. See CARD.md."""
from __future__ import annotations

import json
from pathlib import Path

HOME = Path(__file__).parent
MODELS = ("base", "math", "lang")
# target: J math (never trained on); math_e: MATH's own task; lang_j: LANG's own (J non-math instructions).
TASKS = ("math_j_dev", "math_j_test", "math_e_dev", "math_e_test", "lang_j_dev", "lang_j_test")


def model_path(name: str, root: str | Path = HOME) -> Path:
    """Checkpoint dir of a shipped (or built, with `root`) zoo model: 'base', 'math' or 'lang'."""
    from evomerge.records import UserError

    if name not in MODELS:
        raise UserError(f"unknown zoo model {name!r}; expected one of {', '.join(MODELS)}")
    return Path(root) / "models" / name


def load_task(name: str, root: str | Path = HOME) -> list[dict]:
    """A zoo task file as a list of {"prompt", "reference"}; the text a model sees is prompt + reference."""
    from evomerge.records import UserError

    path = Path(root) / "data" / f"{name}.jsonl"
    if not path.is_file():
        raise UserError(f"no zoo task {name!r} at {path}; known tasks: {', '.join(TASKS)}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
