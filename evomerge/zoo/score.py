"""Teacher-forced exact match: one batched forward over prompt + reference + EOS. A greedy decoder
reproduces the reference exactly iff every reference token (and the EOS) is the argmax, so this equals
greedy-decoding exact match at a fraction of the cost."""
from __future__ import annotations

import torch

from evomerge.zoo.tasks import Example
from evomerge.zoo.train import Encoder


@torch.no_grad()
def exact_match(model, enc: Encoder, examples: list[Example], *, chars: list[int] | None = None,
                batch: int = 400) -> list[bool]:
    """Per example: is the greedy continuation of the prompt the reference then EOS? With `chars`, only
    the first chars[i] characters of reference i are checked (e.g. the number without the J marker)."""
    out: list[bool] = []
    for start in range(0, len(examples), batch):
        part = examples[start:start + batch]
        seqs = [enc.example(ex) for ex in part]
        ids = enc.batch(seqs)
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
        hit = pred == ids[:, 1:]
        for i, (prompt, ref) in enumerate(part):
            first = len(prompt)  # position predicting the reference's first char (BOS shifts by one)
            n = len(ref) + 1 if chars is None else chars[start + i]
            out.append(bool(hit[i, first:first + n].all()))
    return out


def accuracy(model, enc: Encoder, examples: list[Example], **kw) -> float:
    hits = exact_match(model, enc, examples, **kw)
    return 100.0 * sum(hits) / max(1, len(hits))
