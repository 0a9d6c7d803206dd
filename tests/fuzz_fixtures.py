"""Seeded mutations of valid inputs (request bodies, run configs) for the fuzz tests: one node somewhere replaced by a
value of another type, a huge, negative or non-finite number, or deep nesting; a key removed or one added; the text
then sent in a wrong encoding, cut short or with a flipped byte now and then."""
from __future__ import annotations

import math
import random
from typing import Any

HOSTILE = [None, "", "abc", "\x00\u202e\ud7ff", "x" * 5000, -1, 0, 1, 2**63, -(10**30), 1e308, -1e308, math.nan, math.inf,
           -0.0, 0.5, True, False, [], {}, [1, 2], [None], {"model": "a"}, {"filter": "mlp", "value": 0.5}]


def mutate(v: Any, rng: random.Random, extra: list[str]) -> Any:
    """`v` with one node replaced, removed, or given a key from `extra` with a hostile value."""
    if isinstance(v, (dict, list)) and v and rng.random() < 0.75:
        out = dict(v) if isinstance(v, dict) else list(v)
        k = rng.choice(list(out) if isinstance(out, dict) else range(len(out)))
        roll = rng.random()
        if roll < 0.15:
            del out[k]
        elif roll < 0.25 and isinstance(out, dict):
            out[rng.choice(extra)] = rng.choice(HOSTILE)
        else:
            out[k] = mutate(out[k], rng, extra)
        return out
    roll = rng.random()
    if roll < 0.1:
        nest: Any = rng.choice([[], {}])
        for _ in range(rng.choice([10, 100, 400])):
            nest = [nest] if rng.random() < 0.5 else {"k": nest}
        return nest
    if roll < 0.2 and isinstance(v, (int, float)) and not isinstance(v, bool):
        return rng.choice([v * 1e200, -v, v + 0.5, str(v), 10 ** rng.randint(3, 40)])
    return rng.choice(HOSTILE)


def encode(text: str, rng: random.Random) -> bytes:
    """`text` as UTF-8 mostly; else as UTF-16, as Latin-1 with a non-ASCII letter, cut short, or with a flipped byte."""
    roll = rng.random()
    if roll < 0.05:
        return text.encode("utf-16")
    if roll < 0.10:
        return text.replace("a", "\u00e4", 1).encode("latin-1", "replace")
    if roll < 0.14:
        return text.encode()[: rng.randrange(len(text))]
    if roll < 0.18:
        raw = bytearray(text.encode())
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    return text.encode("utf-8", "surrogatepass")
