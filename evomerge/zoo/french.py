"""Numbers 0-999 written as French words (the 1990 spelling reform's hyphens between all parts:
"vingt-et-un", "deux-cent-trois", "quatre-vingts", "cent-un")."""
from __future__ import annotations

UNITS = ("zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize "
         "dix-sept dix-huit dix-neuf").split()
TENS = {2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante"}


def _below_100(n: int) -> str:
    if n < 20:
        return UNITS[n]
    tens, unit = divmod(n, 10)
    if tens in (7, 9):  # soixante-dix..., quatre-vingt-dix...: the tens above counted from 10
        head = "soixante" if tens == 7 else "quatre-vingt"
        return f"{head}-et-onze" if n == 71 else f"{head}-{UNITS[10 + unit]}"
    if tens == 8:
        return "quatre-vingts" if unit == 0 else f"quatre-vingt-{UNITS[unit]}"
    if unit == 0:
        return TENS[tens]
    return f"{TENS[tens]}-et-un" if unit == 1 else f"{TENS[tens]}-{UNITS[unit]}"


def french(n: int) -> str:
    if not 0 <= n <= 999:
        raise ValueError(f"french() covers 0-999, got {n}")
    hundreds, rest = divmod(n, 100)
    if hundreds == 0:
        return _below_100(rest)
    head = "cent" if hundreds == 1 else f"{UNITS[hundreds]}-cent" + ("s" if rest == 0 else "")
    return head if rest == 0 else f"{head}-{_below_100(rest)}"
