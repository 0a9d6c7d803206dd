"""Task-vector merges that decide per entry which models contribute: sce, ram and ramplus_tl, as
mergekit 0.1.5 defines them.

SCE keeps the entries where the models disagree most (highest variance), drops the contributions whose
sign loses the vote, and averages the rest weighted by each task vector's mean square. RAM averages each
entry over the models that changed it (|delta| > epsilon); RAM+ (tensor-local) also boosts a model's
entries that no other model changed, by how much that model overlaps the others.
"""
from __future__ import annotations

import torch

from evomerge.merge import stackwide
from evomerge.merge.methods import Group, Method, register
from evomerge.merge.params import NON_NEGATIVE, POSITIVE, UNIT, ParamSpec


# --- sce ------------------------------------------------------------------------------------------

def _most_varied(tv: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the int(fraction x #non-zero variances) entries whose variance across models is largest.

    The cut is the k-th largest variance (a linear-time selection); only when more entries equal it than
    are left to keep does the choice among them need torch's top-k order (mergekit's), which costs a
    partial sort."""
    var = torch.var(tv, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)  # a float32 product, as mergekit's, so the count truncates alike
    if k == 0:
        return torch.zeros(var.shape, dtype=torch.bool, device=var.device)
    flat = var.reshape(-1)
    cut = torch.kthvalue(flat, flat.numel() - k + 1).values
    mask = var > cut
    at_cut = var == cut
    if int(mask.sum()) + int(at_cut.sum()) == k:
        return mask.logical_or_(at_cut)
    mask.zero_().view(-1)[torch.topk(flat, k=k, largest=True).indices] = True
    return mask


def _sce(g: Group) -> None:
    assert g.base is not None
    fraction = g.shared["select_topk"]
    base, entries = g.base.full(), g.non_base
    if not entries:
        g.out.copy_(base)
        return
    tv = torch.stack([e.vector().delta for e in entries])  # the variance and the vote need all models at once
    if g.stack is not None:  # a stack member: the variance cut and the energies are the whole stack's
        if fraction < 1:
            cut, energy = g.stack.once(("sce_cut", fraction), lambda: _stack_cut(g, fraction))
            tv.mul_(_member_mask(tv, cut, g.stack.index))
        else:
            energy = _stack_energy(g)
    else:
        if fraction < 1:
            tv.mul_(_most_varied(tv, fraction))
        energy = torch.stack([d.square().mean() for d in tv])
    positive = tv.sum(dim=0) >= 0  # the majority sign, by total delta
    total = energy.sum().item()
    weights = torch.ones_like(energy) / len(entries) if abs(total) < 1e-6 else energy / total
    # the weighted mean over the models whose delta has the majority sign (zero deltas have none)
    num, den = g.out.zero_(), torch.zeros_like(g.out)
    for d, w in zip(tv, weights):
        agree = torch.where(positive, d > 0, d < 0)
        num.add_(d * torch.where(agree, w, 0))
        den.add_(torch.where(agree, w, 0))
    num.div_(den.clamp_(min=1e-6)).add_(base)


def _task_vectors(g: Group, j: int) -> torch.Tensor:
    """Stack member j's deltas, one per model besides the base."""
    assert g.stack is not None
    xs = g.stack.tensors(j)
    base = xs.pop(g.base_index)
    return torch.stack([x - base for x in xs])


def _stack_cut(g: Group, fraction: float) -> tuple[stackwide.Cut | None, torch.Tensor]:
    """_most_varied over the whole stack, and the models' energies over its selection: the k-th largest
    variance from histograms summed over the members (stackwide.kth_largest), never a sort, its pass also
    summing the selected squares. Among entries equal to it, the first in the stack's order are kept
    (mergekit's torch.topk of the stacked tensor leaves their order unspecified)."""
    assert g.stack is not None
    variance = lambda j: torch.var(_task_vectors(g, j), dim=0, unbiased=False)  # noqa: E731
    high, zeros = stackwide.histogram(g.stack, "sce_var", variance)
    numel = int(high.sum())
    k = int(torch.tensor(numel - zeros) * fraction)  # a float32 product, as mergekit's
    if k == 0:
        return None, torch.zeros(len(g.non_base), dtype=g.out.dtype)

    def with_squares(j: int) -> tuple[torch.Tensor, torch.Tensor]:
        tv = _task_vectors(g, j)
        return torch.var(tv, dim=0, unbiased=False), tv.square_()

    cut = stackwide.kth_largest(g.stack, "sce_var", with_squares, high, k)
    sums = cut.sums
    if cut.partial is not None:  # that member's first equal entries: their squares
        tv = _task_vectors(g, cut.partial)
        equal = (torch.var(tv, dim=0, unbiased=False) == cut.value).reshape(-1).nonzero().reshape(-1)
        sums = sums + tv.reshape(len(tv), -1)[:, equal[: cut.take[cut.partial]]].double().square().sum(1)
    return cut, (sums / numel).to(g.out.dtype)


def _member_mask(tv: torch.Tensor, cut: stackwide.Cut | None, j: int) -> torch.Tensor:
    """Member j's part of the stack's selection."""
    var = torch.var(tv, dim=0, unbiased=False)
    if cut is None:
        return torch.zeros(var.shape, dtype=torch.bool, device=var.device)
    mask = var > cut.value
    if cut.take[j]:
        equal = (var == cut.value).reshape(-1).nonzero().reshape(-1)
        mask.view(-1)[equal[: cut.take[j]]] = True
    return mask


def _stack_energy(g: Group) -> torch.Tensor:
    """Each model's mean squared delta over the whole stack: its members' sums of squares."""
    assert g.stack is not None

    def member(j: int) -> tuple[torch.Tensor, int]:
        tv = _task_vectors(g, j)
        return stackwide.gram(list(tv)).diagonal(), tv[0].numel()

    sums = g.stack.each("sce_energy", member)
    return (sum(s for s, _ in sums) / sum(n for _, n in sums)).to(g.out.dtype)


register(Method("sce", _sce, (
    ParamSpec("select_topk", float, 1.0, bounds=UNIT),
    ParamSpec("int8_mask", bool, False),  # mergekit's memory option; results are the same without it
), needs_base=True))


# --- ram, ramplus_tl ------------------------------------------------------------------------------

def _ram_family(g: Group, boost: bool) -> None:
    assert g.base is not None
    eps = g.shared["epsilon"]
    base = g.base.full()
    deltas = [e.vector().delta for e in g.non_base]
    if not deltas:
        g.out.copy_(base)
        return
    changed = [d.abs() > eps for d in deltas]  # one byte per entry and model
    counts = torch.zeros(base.shape, dtype=torch.int32, device=base.device)  # models that changed each entry
    for c in changed:
        counts += c
    alone = counts == 1
    boosts = [1.0] * len(deltas)
    if boost:
        r, alpha = g.shared["r"], g.shared["alpha"]
        shared = torch.stack([(c & ~alone).sum() for c in changed])
        own = torch.stack([(c & alone).sum() for c in changed])
        boosts = 1 + r * (shared / own.clamp(min=eps)).clamp(min=0, max=alpha)
    divisor = counts.clamp_(min=1)
    g.out.zero_()
    for d, c, b in zip(deltas, changed, boosts):
        # an entry one model changed takes that model's delta (boosted); one several changed, their mean
        g.out.add_(torch.where(c & alone, d * b, torch.where(c, d / divisor, 0)))
    g.out.add_(base)


register(Method("ram", lambda g: _ram_family(g, boost=False), (ParamSpec("epsilon", float, 1e-5, bounds=NON_NEGATIVE),), needs_base=True))
register(Method("ramplus_tl", lambda g: _ram_family(g, boost=True), (
    ParamSpec("r", float, 0.1),
    ParamSpec("alpha", float, 0.2, bounds=NON_NEGATIVE),
    ParamSpec("epsilon", float, 1e-5, bounds=POSITIVE),  # it also divides: the overlap ratio's floor
), needs_base=True))
