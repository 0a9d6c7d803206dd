"""The zoo's two languages. J is E with every letter replaced by a fixed cipher; digits, spaces and
punctuation are shared, so a number pathway learnt in one language can serve the other (see ZOO_NOTES)."""
from __future__ import annotations

import random
import string

WORDS = (
    "the a and of to in cat dog bird fish tree house car book sun moon river stone sees eats likes runs has "
    "finds big small red blue old new what is plus answer after before copy larger smaller count"
).split()

J_LETTERS = "АБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩ"
_shuffled = list(J_LETTERS)
random.Random(1234).shuffle(_shuffled)
CIPHER = dict(zip(string.ascii_lowercase, _shuffled))
_TO_J = str.maketrans(CIPHER)


def to_j(text: str) -> str:
    """E text in J: letters ciphered, everything else (digits, spaces, '?') unchanged."""
    return text.translate(_TO_J)


# Every J answer ends with this J word (the cipher of " yo"), as Sakana's target required answers in
# Japanese: a MATH expert computes the number but drops the marker; a merge needs LANG for it.
J_MARKER = to_j(" yo")
