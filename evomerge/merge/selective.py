"""Two-model merges that take the other model's value entry by entry: nearswap and arcee_fusion, as
mergekit 0.1.5 defines them.

nearswap moves each base entry toward the other model's in proportion to how close they already are
(fully where they differ by at most t). arcee_fusion takes the other model's entry where its importance
(|delta| times the row's KL divergence between the two models' softmaxed rows) is an upper outlier:
at least median + 1.5 x interquartile range.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from evomerge.merge.methods import Group, Method, register
from evomerge.merge.params import NON_NEGATIVE, ParamSpec


def _nearswap(g: Group) -> None:
    assert g.base is not None
    t = g.shared["t"]
    delta = g.non_base[0].vector().delta
    share = (t / delta.abs().clamp(min=1e-6)).clamp_(0, 1)
    torch.add(g.base.full(), share.mul_(delta), out=g.out)


register(Method("nearswap", _nearswap, (ParamSpec("t", float, bounds=NON_NEGATIVE),), needs_base=True, min_inputs=2, max_inputs=2))


def _row_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, eps: float = 1e-8, block: int = 1 << 22) -> torch.Tensor:
    """KL(p || q) of the softmaxed last-dimension rows (kept as a dimension), each probability + eps;
    computed a block of rows at a time, so its temporaries stay small whatever the tensor's size."""
    p_rows = p_logits.reshape(-1, p_logits.shape[-1])
    q_rows = q_logits.reshape(-1, q_logits.shape[-1])
    kl = torch.empty(p_rows.shape[0], 1, dtype=p_rows.dtype, device=p_rows.device)
    step = max(1, block // p_rows.shape[1])
    for i in range(0, p_rows.shape[0], step):
        p = F.softmax(p_rows[i : i + step], dim=-1) + eps
        q = F.softmax(q_rows[i : i + step], dim=-1) + eps
        kl[i : i + step] = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return kl.reshape(*p_logits.shape[:-1], 1)


def upper_fence(x: torch.Tensor) -> torch.Tensor:
    """median + 1.5 x (q3 - q1), each quartile the element at floor(q x (n - 1)) in ascending order.

    Exact on every tensor; mergekit estimates the quartiles from 1,000,000 entries drawn with torch's
    unseeded generator when a tensor has more, so there its result varies from run to run and ours is
    the value its estimate scatters around."""
    flat = x.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = (torch.kthvalue(flat, i + 1).values for i in (last // 4, last // 2, 3 * last // 4))
    return median + 1.5 * (q3 - q1)


def _arcee_fusion(g: Group) -> None:
    assert g.base is not None
    other = g.non_base[0]
    base, delta = g.base.full(), other.vector().delta
    importance = delta.abs() * _row_kl(other.full(), base)
    torch.add(base, delta * (importance >= upper_fence(importance)), out=g.out)


register(Method("arcee_fusion", _arcee_fusion, needs_base=True, min_inputs=2, max_inputs=2))
