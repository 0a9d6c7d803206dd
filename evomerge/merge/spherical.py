"""Merges on the hypersphere: nuslerp, multislerp and karcher, as mergekit 0.1.5 defines them.

Each tensor (or its delta from the base, where a base is given) is one point; the merge interpolates
directions along great circles and restores a weighted norm. The numerics follow mergekit's step by step
in the compute dtype, because karcher's iteration count depends on a tolerance test that a different
rounding could tip. Beyond its inputs, each method holds a few working tensors the size of the one
being merged, however many models there are (the inputs are never stacked).

A member of a stack (MoE experts that mergekit merges as one stacked tensor: evomerge.merge.stackwide)
is merged with the stack's statistics: every whole-tensor norm and dot the methods take is one of the
points' Gram matrix over the stack (the means and tangents stay combinations of the points), so the
iterations run on that k x k matrix in float64 and each member combines its own points; nuslerp's
row-wise cosines are each position's across the experts. Rounding there differs from mergekit's float32
passes over the stacked tensor by about 1e-7 relative: a tolerance test that close could tip.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from evomerge.merge import stackwide
from evomerge.merge.methods import Entry, Group, Method, register
from evomerge.merge.params import NON_NEGATIVE, POSITIVE, ParamSpec
from evomerge.records import UserError


def _points(g: Group, entries: list[Entry]) -> list[torch.Tensor]:
    """The points to interpolate: the inputs' deltas when a base is given, else the inputs themselves."""
    return [e.vector().delta if g.base is not None else e.full() for e in entries]


def _finish(g: Group, result: torch.Tensor) -> None:
    if g.base is not None:
        torch.add(g.base.full(), result.reshape(g.out.shape), out=g.out)
    else:
        g.out.copy_(result.reshape(g.out.shape))


# --- nuslerp: slerp of two models, whole tensor or row by row -------------------------------------

def _nuslerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp coefficients per row (last dimension) applied to the unnormalised rows."""
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    return _nuslerp_combine(t, cos, v0, v1)


def _nuslerp_combine(t: float, cos: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The rows' slerp given their cosines (broadcast along the rows); linear where they are (anti)parallel."""
    parallel = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(parallel, 0, cos))
    sin = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    return torch.where(parallel, (1 - t) * v0 + t * v1, spherical)


def _stack_cosines(g: Group) -> torch.Tensor:
    """nuslerp on a stack member: the cosines mergekit computes on the stacked tensor, of the whole stack
    (flattened) or, row-wise, of each position's vector across the experts (the stack's dim 0), which sums
    over the members of this member's part (gate or up)."""
    stack, bi = g.stack, g.base_index
    if g.shared["nuslerp_flatten"]:
        gram = stack.gram(with_base=bi)
        n0, n1 = (gram[k, k].sqrt().clamp(min=1e-7) for k in (0, 1))
        return (gram[0, 1] / (n0 * n1)).clamp(-1, 1).to(stack.dtype).reshape(1)
    part = stack.index % stack.parts

    def rows() -> torch.Tensor:
        """Block by block of positions, each position's vectors across the part's experts, stacked as
        mergekit's and reduced by the same kernels (near antipodal vectors, the slerp is that sensitive to
        rounding); the sources are read as stored, never copied whole."""
        members = [stack.read(j) for j in range(part, stack.size, stack.parts)]
        shape = members[0][0].shape
        cos = torch.empty(shape.numel(), dtype=stack.dtype, device=members[0][0].device)
        step = max(1, stackwide.CHUNK // len(members))
        for s in range(0, cos.numel(), step):
            block = torch.stack([torch.stack([x.reshape(-1)[s : s + step] for x in xs]) for xs in members])
            block = block.to(stack.dtype)  # [experts, inputs, positions]
            if bi is not None:
                block = torch.cat([block[:, :bi], block[:, bi + 1 :]], dim=1) - block[:, bi : bi + 1]
            u0, u1 = (v / torch.linalg.vector_norm(v, dim=0, keepdim=True).clamp(min=1e-7) for v in block.unbind(1))
            cos[s : s + step] = torch.sum(u0 * u1, dim=0).clamp(-1, 1)
        return cos.reshape(shape)

    experts = stack.size // stack.parts  # the readers of this part's cosines: dropped after the last
    return stack.shared.get((stack.name, "nuslerp_rows", part), rows, experts)


def _nuslerp(g: Group) -> None:
    entries = g.non_base
    if len(entries) != 2:
        raise UserError(f"nuslerp takes exactly 2 models besides the base, got {len(entries)}")
    w0, w1 = (e.params["weight"] for e in entries)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    v0, v1 = _points(g, entries)
    if g.stack is not None and (g.shared["nuslerp_flatten"] or g.shared["nuslerp_row_wise"]):
        _finish(g, _nuslerp_combine(t, _stack_cosines(g), v0, v1))
        return
    if g.shared["nuslerp_flatten"]:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif g.shared["nuslerp_row_wise"]:  # mergekit's "row-wise" interpolates the vectors along dim 0
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    result = _nuslerp_rows(t, v0, v1)
    if not g.shared["nuslerp_flatten"] and g.shared["nuslerp_row_wise"]:
        result = result.transpose(0, -1)
    _finish(g, result)


register(Method("nuslerp", _nuslerp, (
    ParamSpec("weight", float, per_model=True),
    ParamSpec("nuslerp_row_wise", bool, False),
    ParamSpec("nuslerp_flatten", bool, True),
), min_inputs=2, max_inputs=3))


# --- multislerp: barycentric interpolation of any number of models ---------------------------------

def _multislerp(g: Group) -> None:
    entries = g.non_base
    if not entries:
        raise UserError("multislerp needs at least one model besides the base")
    eps = g.shared["eps"]
    if len(entries) == 1:  # nothing to interpolate: the model itself, whatever the base
        g.out.copy_(entries[0].full())
        return
    points = [p.reshape(-1) for p in _points(g, entries)]
    weights = torch.tensor([e.params["weight"] for e in entries], dtype=points[0].dtype, device=points[0].device)
    if g.shared["normalize_weights"]:
        total = weights.sum()
        if total == 0:
            raise UserError("multislerp's weights sum to 0 and cannot be normalized (set normalize_weights: false or change a weight)")
        weights = weights / total
    if g.stack is not None:
        _finish(g, _combination(points, _multislerp_stack(g, g.stack.gram(with_base=g.base_index), weights.double(), eps)))
        return
    norms = [torch.linalg.vector_norm(p) for p in points]
    mean = torch.zeros_like(points[0])
    for p, n, w in zip(points, norms, weights):
        mean.add_(p / (n + eps) * w)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:  # antipodal inputs balanced by their weights: no mean direction
        if len(points) > 2:
            raise UserError(f"multislerp: the weighted directions of {g.name} cancel out (antipodal inputs); change a weight")
        _finish(g, points[0] * weights[0] + points[1] * weights[1])
        return
    mean.div_(mean_norm)
    tangent = torch.zeros_like(mean)  # weighted mean of the inputs' directions in the tangent space at `mean`
    for p, n, w in zip(points, norms, weights):
        unit = p / (n + eps)
        tangent.add_((unit - (unit * mean).sum() * mean) * w)
    length = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)  # the exponential map
    _finish(g, result * (torch.stack(norms) * weights).sum())


def _multislerp_stack(g: Group, gram: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """multislerp's result on a stack as coefficients of its points: the mean direction and the tangent
    are combinations of the points, so every norm and dot the method takes is one of the points' Gram
    matrix over the whole stack."""
    norms = gram.diagonal().sqrt()
    length = lambda c: (c @ gram @ c).clamp(min=0).sqrt()  # noqa: E731  the norm of sum(c_i p_i)
    mean = weights / (norms + eps)
    mean_norm = length(mean)
    if mean_norm < eps:
        if len(norms) > 2:
            raise UserError(f"multislerp: the weighted directions of {g.name} cancel out (antipodal inputs); change a weight")
        return weights
    mean = mean / mean_norm
    dots = (gram @ mean) / (norms + eps)  # each unit point's dot with the mean direction
    tangent = weights / (norms + eps) - (weights * dots).sum() * mean
    tangent_norm = length(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return result * (norms * weights).sum()


def _combination(points: list[torch.Tensor], coefficients: torch.Tensor) -> torch.Tensor:
    """sum(c_i p_i) in the points' dtype."""
    out = points[0] * float(coefficients[0])
    for p, c in zip(points[1:], coefficients[1:]):
        out.add_(p, alpha=float(c))
    return out


register(Method("multislerp", _multislerp, (
    ParamSpec("weight", float, per_model=True),
    ParamSpec("normalize_weights", bool, True),
    ParamSpec("eps", float, 1e-8, bounds=POSITIVE),
)))


# --- karcher: the Riemannian (Karcher) mean of all inputs' directions ------------------------------

def karcher_mean(points: Iterable[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The equal-weight Karcher mean of the (flat) points' directions on the unit sphere, by fixed-point
    iteration from their normalised Euclidean mean, scaled by the points' mean norm. Holds one unit
    vector per point, never the points themselves."""
    norms, units = [], []
    for p in points:
        norms.append(torch.linalg.vector_norm(p))
        if norms[-1].item() > tol:  # zero (or nearly) points have no direction: they only count in the norm
            units.append(p / norms[-1])
    if not units:
        return torch.zeros_like(p)
    alpha = 1.0 / len(norms)
    share = alpha / sum([alpha] * len(units))  # renormalised over the points with a direction, summed as mergekit does
    mean = torch.zeros_like(units[0])
    for u in units:
        mean += share * u
    n = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if n.item() < tol else mean / n
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (u - dot * mean)
        length = torch.linalg.vector_norm(tangent)
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        n = torch.linalg.vector_norm(mean)
        if n.item() > tol:
            mean = mean / n
    return sum(alpha * n for n in norms) * mean


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """karcher_mean as coefficients of its points, from their Gram matrix (float64): the mean and its
    tangents stay combinations of the points, so the iteration runs on the Gram matrix alone (a stack's,
    summed over its members)."""
    norms = gram.diagonal().sqrt()
    alpha = 1.0 / len(norms)
    valid = [i for i in range(len(norms)) if norms[i] > tol]
    if not valid:
        return torch.zeros_like(norms)
    share = alpha / sum([alpha] * len(valid))
    units = torch.zeros_like(norms)  # unit i is e_i / norm_i in the points' coordinates
    units[valid] = 1 / norms[valid]
    length = lambda c: (c @ gram @ c).clamp(min=0).sqrt()  # noqa: E731
    mean = share * units
    n = length(mean)
    if n < tol:
        mean = torch.zeros_like(norms)
        mean[valid[0]] = units[valid[0]]
    else:
        mean = mean / n
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            unit = torch.zeros_like(mean)
            unit[i] = units[i]
            dot = torch.clamp(unit @ gram @ mean, -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta < tol:
                continue
            tangent += share * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = length(tangent)
        if tangent_norm < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        n = length(mean)
        if n > tol:
            mean = mean / n
    return (alpha * norms).sum() * mean


def _karcher(g: Group) -> None:
    max_iter, tol = g.shared["max_iter"], g.shared["tol"]
    if len(g.entries) == 1:
        g.out.copy_(g.entries[0].full())
        return
    # every input, the base included (mergekit's karcher ignores which one is the base)
    if g.stack is not None:
        points = [e.full().reshape(-1) for e in g.entries]
        result = _combination(points, karcher_coefficients(g.stack.gram(), max_iter, tol))
    else:
        result = karcher_mean((e.full().reshape(-1) for e in g.entries), max_iter, tol)
    g.out.copy_(result.reshape(g.out.shape))


register(Method("karcher", _karcher, (ParamSpec("max_iter", int, 10, bounds=NON_NEGATIVE),
                                             ParamSpec("tol", float, 1e-5, bounds=NON_NEGATIVE))))
