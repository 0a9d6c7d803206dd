"""Task generators for the zoo, the held-out problem splits and the training mixes.

An example is (prompt, reference); a model sees BOS + prompt + reference + EOS. Prompts end in
"answer " so a scorer generates the reference straight after the prompt."""
from __future__ import annotations

import random
from collections.abc import Callable

from evomerge.zoo.languages import J_MARKER, WORDS, to_j

LO, HI = 10, 99  # operand range of every instruction
BASE_HI = 49  # BASE sees addition with operands up to here only: a little math, in both languages
HELD_OUT_SEED, N_DEV, N_TEST = 777, 200, 400

Example = tuple[str, str]
Generator = Callable[[random.Random], Example]


def held_out_pairs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(dev, test) operand pairs; no example used in training has either pair."""
    pairs = [(a, b) for a in range(LO, HI + 1) for b in range(LO, HI + 1)]
    random.Random(HELD_OUT_SEED).shuffle(pairs)
    return pairs[:N_DEV], pairs[N_DEV:N_DEV + N_TEST]


HELD_OUT = frozenset(p for split in held_out_pairs() for p in split)

# Instructions by name: operands -> (E prompt, answer).
MATH = {"plus": lambda a, b: (f"what is {a} plus {b}? answer ", f"{a + b}")}
NON_MATH = {
    "after": lambda a, b: (f"what is after {a}? answer ", f"{a + 1}"),
    "before": lambda a, b: (f"what is before {a}? answer ", f"{a - 1}"),
    "copy": lambda a, b: (f"copy {a} {b}? answer ", f"{a} {b}"),
    "larger": lambda a, b: (f"what is larger of {a} and {b}? answer ", f"{max(a, b)}"),
    "smaller": lambda a, b: (f"what is smaller of {a} and {b}? answer ", f"{min(a, b)}"),
}
PAIRED = ("copy", "larger", "smaller")  # instructions whose problem is an operand pair, so held-out pairs hold out


def in_lang(example: Example, lang: str) -> Example:
    prompt, answer = example
    return (prompt, answer) if lang == "E" else (to_j(prompt), answer + J_MARKER)


def _pair(rng: random.Random, hi: int) -> tuple[int, int]:
    while True:
        pair = rng.randint(LO, hi), rng.randint(LO, hi)
        if pair not in HELD_OUT:
            return pair


def instruction(names: dict, lang: str, hi: int = HI) -> Generator:
    keys = sorted(names)
    return lambda rng: in_lang(names[rng.choice(keys)](*_pair(rng, hi)), lang)


def generic(lang: str) -> Generator:
    def gen(rng: random.Random) -> Example:
        toks = [str(rng.randint(LO, HI)) if rng.random() < 0.2 else rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        text = " ".join(toks)
        return (to_j(text) if lang == "J" else text), ""
    return gen


def translate(rng: random.Random) -> Example:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
    src, dst = (text, to_j(text)) if rng.random() < 0.5 else (to_j(text), text)
    return f"{src} = ", dst


def counting(lang: str) -> Generator:
    def gen(rng: random.Random) -> Example:
        k = rng.randint(LO, HI - 5)
        text = "count " + " ".join(str(k + i) for i in range(rng.randint(3, 5)))
        return (to_j(text) if lang == "J" else text), ""
    return gen


Mix = list[tuple[float, Generator]]


def base_mix() -> Mix:
    return [
        (0.14, generic("E")), (0.10, generic("J")), (0.16, translate),
        (0.04, counting("E")), (0.02, counting("J")),
        (0.10, instruction(NON_MATH, "E")), (0.04, instruction(NON_MATH, "J")),
        # a fifth of the mix is addition: at a tenth, BASE had not learnt in-range sums after 2,500 steps
        (0.12, instruction(MATH, "E", BASE_HI)), (0.08, instruction(MATH, "J", BASE_HI)),
    ]


def math_mix() -> Mix:
    return [(1.0, instruction(MATH, "E"))]


def lang_mix() -> Mix:
    # 30% replay of BASE's mix: without it LANG forgets the little addition BASE knew.
    return [(0.49, instruction(NON_MATH, "J")), (0.21, generic("J"))] + [(0.30 * w, g) for w, g in base_mix()]


MIXES: dict[str, Callable[[], Mix]] = {"base": base_mix, "math": math_mix, "lang": lang_mix}


def sampler(mix: Mix, seed: int) -> Callable[[], Example]:
    rng = random.Random(seed)
    weights = [w for w, _ in mix]
    gens = [g for _, g in mix]
    return lambda: rng.choices(gens, weights)[0](rng)


def eval_splits() -> dict[str, list[Example]]:
    """The shipped task files: the target (J math), MATH's own task (E math), LANG's own (J non-math)."""
    dev, test = held_out_pairs()
    keys = [k for k in sorted(NON_MATH) if k in PAIRED]  # one-operand tasks can't be held out: 90 problems
    splits: dict[str, list[Example]] = {}
    for name, pairs in (("dev", dev), ("test", test)):
        splits[f"math_j_{name}"] = [in_lang(MATH["plus"](a, b), "J") for a, b in pairs]
        splits[f"math_e_{name}"] = [in_lang(MATH["plus"](a, b), "E") for a, b in pairs]
        splits[f"lang_j_{name}"] = [in_lang(NON_MATH[keys[i % len(keys)]](a, b), "J") for i, (a, b) in enumerate(pairs)]
    return splits
