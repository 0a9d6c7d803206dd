"""Merge methods: one small function per method, registered by name with its typed parameters.

A method merges one output tensor: it receives a `Group` (the inputs for that tensor, each with its
resolved per-model parameters, the shared parameters, and the output buffer) and writes the result into
`group.out`. Parameters, defaults and formulas follow mergekit 0.1.5.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from evomerge.merge import calibration, passes, rng, sparsify
from evomerge.merge.gta import merge_task_vectors
from evomerge.merge.passes import Keep
from evomerge.merge.params import NON_NEGATIVE, POSITIVE, UNIT, Interval, ParamSpec
from evomerge.merge.peers import Peers
from evomerge.merge.stackwide import Stack
from evomerge.merge.vectors import Shared, StackVector, TaskVector
from evomerge.records import UserError


@dataclass
class Entry:
    """One input of a tensor merge."""

    model: str
    params: dict[str, Any]
    full: Callable[[], torch.Tensor]  # this input's tensor in the compute dtype (may be shared: never modify it)
    vector: Callable[[], TaskVector]  # its delta from the group's base, with statistics kept across candidates
    path: Path | None = None  # its checkpoint (data-aware methods read its calibration statistics)


@dataclass(frozen=True)
class Whole:
    """Every tensor of the merge a group's tensor is one of, for a method whose tensors depend on each other
    (regmean_plus: a layer's statistics on the merged layers before it): any output tensor's inputs as stored,
    its per-model and shared parameters, and the values its tensors' merges compute once and share."""

    names: tuple[str, ...]
    read: Callable[[str], list[torch.Tensor]]
    params: Callable[[str], list[dict[str, Any]]]
    shared_params: Callable[[str], dict[str, Any]]
    shared: Shared


@dataclass
class Group:
    name: str  # output tensor name
    entries: list[Entry]
    base: Entry | None
    shared: dict[str, Any]
    seed: int
    out: torch.Tensor
    tie_order: str = "index"  # which of the equal magnitudes at a trim's threshold survive (sparsify)
    stack: Stack | None = None  # the stack this tensor is a member of: whole-tensor statistics read it whole
    dtype: torch.dtype | None = None  # merged as mergekit does, in this dtype (entries' full() are in it); None: float32 kernels
    # flat [start, end) ranges of `out` that are wanted (a tensor-parallel rank's shard); None: all of it. A method
    # that merges only these sets `merged_spans`; the others merge the whole tensor (the spans then equal too)
    spans: tuple[tuple[int, int], ...] | None = None
    merged_spans: bool = False
    peers: Peers | None = None  # the other ranks merging this candidate: a rescale's norms are summed with theirs
    whole: Whole | None = None  # every tensor of this merge, for a method that merges them together


    @property
    def base_index(self) -> int | None:
        return next((i for i, e in enumerate(self.entries) if e is self.base), None)

    @property
    def non_base(self) -> list[Entry]:
        return [e for e in self.entries if e is not self.base]


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[Group], None]
    params: tuple[ParamSpec, ...] = ()
    needs_base: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    random: bool = False
    sparse: bool = False  # keeps a per-model `density` share of each task vector (what a search tunes beside the weight)
    any_out_dtype: bool = False  # computes in float32 and writes a bfloat16 or float32 destination itself
    as_mergekit: bool = False  # runs mergekit's own ops in a low compute dtype (Group.dtype)

    def shared_params(self) -> list[ParamSpec]:
        return [p for p in self.params if not p.per_model]

    def model_params(self, is_base: bool) -> list[ParamSpec]:
        return [p for p in self.params if p.per_model and (p.base_too or not is_base)]


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown merge method {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    return sorted(_REGISTRY)


# --- generalized task arithmetic: task_arithmetic, ties, dare_*, breadcrumbs*, della ---------------

def _gta(name: str, *, consensus: bool, trim: str | None, normalize: bool, rescale: bool) -> Method:
    params = [
        ParamSpec("weight", float, per_model=True),
        ParamSpec("density", float, 1.0, per_model=True, bounds=UNIT),
        ParamSpec("normalize", bool, normalize),
        ParamSpec("rescale", bool, rescale),
        ParamSpec("lambda", float, 1.0),
        ParamSpec("int8_mask", bool, False),  # mergekit's memory option; results are the same without it
    ]
    if trim == "magnitude_outliers":
        params.append(ParamSpec("gamma", float, 0.01, per_model=True, bounds=UNIT))
    if trim == "della":
        params.append(ParamSpec("epsilon", float, 0.15, per_model=True, bounds=NON_NEGATIVE))  # and d ± ε in (0, 1): sparsify.della

    def merge(g: Group) -> None:
        entries = g.non_base
        assert g.base is not None
        if not entries:
            g.out.copy_(g.base.full())
            return
        if g.dtype is not None and trim != "della" and g.stack is None:
            g.out.copy_(_gta_as_mergekit(g, trim, consensus))
            return
        vectors = [e.vector() for e in entries]
        weights = [e.params["weight"] for e in entries]
        opts = {"consensus": consensus, "normalize": g.shared["normalize"], "lam": g.shared["lambda"]}
        units = [v.unit for v in vectors]  # what each trim reads: the tensor, or its stack
        if trim == "della" and units[0] is vectors[0]:
            _della_by_rows(g, vectors, [_trim(trim, v, e, g) for v, e in zip(vectors, entries)], weights, opts)
            return
        keeps = [_keep(trim, u, e, g, i) for i, (u, e) in enumerate(zip(units, entries))]
        if trim == "della":  # a stack member's ranks run along its expert's stacked rows
            keeps = [replace(k, rank=u.rank(u.index), rank_start=u.offset) if k.kind == "della" else k for k, u in zip(keeps, units)]
        # the trims' cuts and draws are by flat index: a shard's spans merge as within the whole
        merge_task_vectors(vectors[0].base, [v.model for v in vectors], keeps, weights, out=g.out,
                           offset=units[0].offset, spans=g.spans, **opts)
        g.merged_spans = g.spans is not None

    return Method(name, merge, tuple(params), needs_base=True, random=trim in ("random", "della"), sparse=trim is not None,
                  any_out_dtype=True, as_mergekit=True)


def _gta_as_mergekit(g: Group, trim: str | None, consensus: bool) -> torch.Tensor:
    """mergekit 0.1.5's GeneralizedTaskArithmeticMerge.merge_group, op for op in g.dtype (its rounding at each
    step), on the same masks: its sort for magnitude trims, evomerge's draws for random ones."""
    base = g.base.full()
    entries = g.non_base
    deltas = base.new_empty((len(entries), *base.shape))
    for i, e in enumerate(entries):
        d = e.full() - base
        deltas[i] = d if trim is None else _sparsify_as_mergekit(d, trim, e, g)
    weights = torch.tensor([e.params["weight"] for e in entries], dtype=deltas.dtype)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    if consensus:
        sign = deltas.sign()
        mask = sign == (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if g.shared["normalize"]:
        mixed /= divisor
    if g.shared["lambda"] != 1:
        mixed *= g.shared["lambda"]
    return base + mixed


def _sparsify_as_mergekit(d: torch.Tensor, trim: str, e: Entry, g: Group) -> torch.Tensor:
    """mergekit's magnitude / magnitude_outliers / bernoulli trims of delta d (sparsify.py), rescaled by L1 when asked."""
    density, n = e.params["density"], d.numel()
    if density >= 1:
        return d
    work = d.dtype
    w = d.abs().reshape(-1).float()
    mask = torch.zeros(n, dtype=d.dtype)
    if trim == "magnitude":
        if density <= 0 or n == 0:
            return torch.zeros_like(d)
        mask[torch.argsort(w, descending=True)[: max(1, int(density * n))]] = 1
    elif trim == "magnitude_outliers":
        target, top = int(density * n), int(e.params["gamma"] * n)
        bottom = max(0, n - target - top)
        mask[torch.sort(w, descending=False).indices[bottom : bottom + target]] = 1
    else:  # random: torch.bernoulli works in float32 on CPU but for bfloat16
        work = d.dtype if d.dtype == torch.bfloat16 else torch.float32
        keep = sparsify.bernoulli(density, rng.key_for(g.seed, g.name, e.model))
        mask = keep.mask(w, 0).to(work)
    masked = d.to(work) * mask.reshape(d.shape)
    if g.shared["rescale"]:
        before, after = d.to(work).abs().sum(), masked.abs().sum()
        if not (before < sparsify.EPS or after < sparsify.EPS):
            masked = masked * (before / after)
    return masked.to(d.dtype)


DELLA_PIECE = 1 << 22  # entries per piece of whole rows (tests make it small)


def _della_by_rows(g: Group, vectors: list[TaskVector], keeps: list[Keep], weights: list[float],
                   opts: dict[str, Any]) -> None:
    """DELLA in pieces of whole rows, each piece's row ranks computed when it is merged (twice when
    rescaling: once for the kept L1 norms, once for the merge), so no rank array of a whole tensor exists.
    With g.spans only the pieces holding them are ranked and only the spans merged (a row-parallel shard
    still ranks every row: a rank is over the whole row); with g.peers each rank sums the norms of its own
    share of the pieces."""
    shape = vectors[0].shape
    cols = math.prod(shape[1:]) if len(shape) >= 2 else max(1, math.prod(shape))
    rows = math.prod(shape) // cols if cols else 0
    step = max(1, DELLA_PIECE // cols) * cols
    flats = [v.flat() for v in vectors]
    pieces = [(s, min(s + step, rows * cols)) for s in range(0, rows * cols, step)]
    if g.shared["rescale"]:
        share = pieces if g.peers is None else pieces[slice(*g.peers.block(len(pieces)))]
        for i, (k, (b, m)) in enumerate(zip(keeps, flats)):
            if k.kind in ("all", "none"):
                continue
            sums = [passes.kept_l1(b[s:e], m[s:e], sparsify.ranked(k, b[s:e], m[s:e], s, cols), s) for s, e in share]
            keeps[i] = sparsify.rescaled(k, *_summed(g, i, (sum(x for x, _ in sums), sum(y for _, y in sums))))
    out = g.out.reshape(-1)
    wanted = g.spans or ((0, rows * cols),)
    for s, e in pieces:
        parts = [(max(s, a), min(e, b)) for a, b in wanted if a < e and b > s]
        if not parts:
            continue
        ranked = [sparsify.ranked(k, b[s:e], m[s:e], s, cols) for k, (b, m) in zip(keeps, flats)]
        merge_task_vectors(flats[0][0][s:e], [m[s:e] for _, m in flats], ranked, weights, out=out[s:e], offset=s,
                           spans=[(a - s, b - s) for a, b in parts], **opts)
    g.merged_spans = g.spans is not None


def _keep(trim: str | None, v: TaskVector, e: Entry, g: Group, i: int) -> Keep:
    """Expert i's trim, rescaled if asked. A stack's trim is found once per merge (by the first of its
    members' merges to need it) and applied to each member at its position; the merges of its members
    share the passes of its rescale."""
    settings = (e.model, trim, g.tie_order, g.seed, *(e.params.get(k) for k in ("density", "gamma", "epsilon")))
    k = v.once(("trim", settings), lambda: _trim(trim, v, e, g))
    if not g.shared["rescale"] or k.kind in ("all", "none"):
        return k
    if g.peers is None or isinstance(v, StackVector):  # a stack's norms: once per merge, over all its members
        return sparsify.rescale(k, v)
    s, t = g.peers.block(v.numel)
    b, m = v.flat()
    return sparsify.rescaled(k, *_summed(g, i, passes.kept_l1(b[s:t], m[s:t], k, s)))


def _summed(g: Group, i: int, norms: tuple[float, float]) -> tuple[float, float]:
    """Expert i's rescale norms over this rank's share, added up with the other ranks' (as they are without
    peers); keyed by position, since a recipe may name one model twice with other parameters."""
    return norms if g.peers is None else g.peers.total(f"{g.name} {i}", norms)


def _trim(trim: str | None, v: TaskVector, e: Entry, g: Group) -> Keep:
    d = e.params["density"]
    if trim is None:
        return Keep("all")
    if trim == "magnitude":
        return sparsify.magnitude(v, d, g.tie_order)
    if trim == "magnitude_outliers":
        return sparsify.magnitude_outliers(v, d, e.params["gamma"], g.tie_order)
    key = rng.key_for(g.seed, v.name if isinstance(v, StackVector) else g.name, e.model)  # the draws of the tensor mergekit sees
    if trim == "random":
        return sparsify.bernoulli(d, key)
    eps = e.params["epsilon"]
    if 0 < d < 1 and (d + eps >= 1 or d - eps <= 0):  # a per-tensor pair: filters and gradients may vary both
        raise UserError(f"della needs 0 < density ± epsilon < 1: model {e.model!r} at {g.name} has density {d:g} "
                        f"and epsilon {eps:g}")
    return sparsify.della(d, eps, key)


for _m in (
    _gta("task_arithmetic", consensus=False, trim=None, normalize=False, rescale=False),
    _gta("ties", consensus=True, trim="magnitude", normalize=True, rescale=False),
    _gta("dare_ties", consensus=True, trim="random", normalize=False, rescale=True),
    _gta("dare_linear", consensus=False, trim="random", normalize=False, rescale=True),
    _gta("breadcrumbs", consensus=False, trim="magnitude_outliers", normalize=False, rescale=False),
    _gta("breadcrumbs_ties", consensus=True, trim="magnitude_outliers", normalize=False, rescale=False),
    _gta("della", consensus=True, trim="della", normalize=True, rescale=True),
    _gta("della_linear", consensus=False, trim="della", normalize=False, rescale=True),
):
    register(_m)


# --- linear ---------------------------------------------------------------------------------------

def _linear(g: Group) -> None:
    """mergekit's: a float32 sum (float64 for float64 inputs) of the inputs as loaded, rounded to their dtype."""
    first = g.entries[0].full()
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([e.params["weight"] for e in g.entries], dtype=dtype)
    acc = g.out if g.out.dtype == dtype else torch.zeros_like(first, dtype=dtype)
    acc.zero_()
    for e, w in zip(g.entries, weights):
        acc.addcmul_(e.full(), w)
    if g.shared["normalize"]:
        acc.div_(weights.sum())
    if acc is not g.out:
        g.out.copy_(acc.to(first.dtype))


register(Method("linear", _linear, (ParamSpec("weight", float, per_model=True, base_too=True), ParamSpec("normalize", bool, True)),
                as_mergekit=True))


# --- slerp ----------------------------------------------------------------------------------------

def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, out: torch.Tensor, *, eps: float = 1e-8) -> None:
    """Spherical interpolation of two tensors seen as flat vectors; linear when they are nearly parallel."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = torch.linalg.vector_norm(a).item(), torch.linalg.vector_norm(b).item()
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    ca, cb = _slerp_coefficients(t, float(torch.dot(a / na, b / nb)))
    torch.mul(a, ca, out=out.reshape(-1)).add_(b, alpha=cb)


def _slerp_coefficients(t: float, dot: float, dot_threshold: float = 0.9995) -> tuple[float, float]:
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > dot_threshold:
        return 1 - t, t
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def _slerp(g: Group) -> None:
    assert g.base is not None
    other = g.non_base[0]
    if g.stack is None:
        slerp(g.shared["t"], g.base.full(), other.full(), g.out)
        return
    gram = g.stack.gram()  # the angle between the whole stacks
    i, j = g.base_index, 1 - g.base_index
    na, nb = (n if n > 1e-8 else 1.0 for n in (math.sqrt(gram[k, k]) for k in (i, j)))
    ca, cb = _slerp_coefficients(g.shared["t"], float(gram[i, j]) / (na * nb))
    torch.mul(g.base.full(), ca, out=g.out).add_(other.full(), alpha=cb)


register(Method("slerp", _slerp, (ParamSpec("t", float, bounds=UNIT),), needs_base=True, min_inputs=2, max_inputs=2))


# --- model stock ----------------------------------------------------------------------------------

def _model_stock(g: Group) -> None:
    assert g.base is not None
    w0 = g.base.full()
    deltas = [e.vector().delta for e in g.non_base]
    shape = w0.shape
    if g.shared["filter_wise"]:
        rows = w0.reshape(1, -1) if w0.dim() == 1 else w0.reshape(w0.shape[0], -1)
        offs = [d.reshape(rows.shape) for d in deltas]
    else:
        rows = w0.reshape(1, -1)
        offs = [d.reshape(1, -1) for d in deltas]
    if g.stack is not None and not g.shared["filter_wise"]:
        # one row, the whole stack: its deltas' angles from their Gram matrix (filter-wise rows run along the
        # last dimension, each within one member, as mergekit's rows of the stacked tensor)
        gram = g.stack.gram(with_base=g.base_index)
        norm = gram.diagonal().sqrt()
        cos = [(gram[i, j] / (norm[i] * norm[j]).clamp(min=1e-6)).clamp(-1, 1).to(w0.dtype).reshape(1)
               for i in range(len(offs)) for j in range(i + 1, len(offs))]
    else:
        cos = []
        for i, a in enumerate(offs):
            for b in offs[i + 1 :]:
                norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
                cos.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(offs)
    denom = 1 + (n - 1) * cos_theta
    singular = denom.abs() < 1e-6  # no finite estimate: keep the base there
    t = torch.where(singular, torch.zeros_like(cos_theta), n * cos_theta / torch.where(singular, 1, denom))
    # t * mean(w_i) + (1 - t) * w_0 = w_0 + t * mean(delta_i)
    mean_delta = sum(offs) / n
    g.out.copy_((rows + t * mean_delta).reshape(shape))


register(Method("model_stock", _model_stock, (ParamSpec("filter_wise", bool, False),), needs_base=True, min_inputs=3))


# --- passthrough ----------------------------------------------------------------------------------

def _passthrough(g: Group) -> None:
    e = g.entries[0]
    scale, offset = e.params.get("scale"), e.params.get("offset")
    if scale is None:
        g.out.copy_(e.full())
    else:
        torch.mul(e.full(), scale, out=g.out)
    if offset is not None:
        g.out.add_(offset)


# offset (evomerge's, added after scale): how a data-flow path scales a norm that multiplies by 1 + w (arch.fold_scope)
register(Method("passthrough", _passthrough, (ParamSpec("scale", float, None, per_model=True, base_too=True),
                                              ParamSpec("offset", float, None, per_model=True, base_too=True)), max_inputs=1))


# --- tsv_m: task singular vectors merging (Gargiulo et al. 2025; evomerge's own) ------------------

def tsv_merge(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The TSV-M merge of task vectors, as fusion-bench 0.2.33's compute_and_sum_svd_mem_reduction: a
    matrix keeps each task's top 1/T singular triplets, the concatenated bases are whitened (their polar
    factors) and recombined with the kept singular values; anything not 2-D is the tasks' mean.
    Cost per m x n matrix (k = min(m, n)), T tasks: T + 2 SVDs, O((T + 2) m n k) flops, about (2T + 4) float32
    m x n buffers held at once; at 7B that is about 7e9 x 4096 x (T + 2) flops over the model and, for the
    32000 x 4096 embedding with T = 2, some 4 GB (estimates from the shapes, not measured).
    """
    if deltas[0].dim() != 2:
        return torch.stack(deltas).mean(0)
    rank = int(min(deltas[0].shape) / len(deltas))
    svds = [torch.linalg.svd(d, full_matrices=False) for d in deltas]
    u = torch.zeros_like(svds[0][0])
    s = torch.zeros_like(svds[0][1])
    vh = torch.zeros_like(svds[0][2])
    for i, (ui, si, vhi) in enumerate(svds):
        cols = slice(i * rank, (i + 1) * rank)
        u[:, cols], s[cols], vh[cols, :] = ui[:, :rank], si[:rank], vhi[:rank, :]
    uu, _, uvh = torch.linalg.svd(u, full_matrices=False)
    vu, _, vvh = torch.linalg.svd(vh, full_matrices=False)
    return torch.linalg.multi_dot((uu, uvh, torch.diag(s), vu, vvh))


def _tsv_m(g: Group) -> None:
    assert g.base is not None
    base = g.base.full()
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    deltas = [e.vector().delta.to(dtype) * e.params["weight"] for e in g.non_base]
    merged = tsv_merge(deltas) if deltas else torch.zeros_like(base, dtype=dtype)
    g.out.copy_((base.to(dtype) + g.shared["lambda"] * merged).to(g.out.dtype))


register(Method("tsv_m", _tsv_m, (ParamSpec("weight", float, 1.0, per_model=True), ParamSpec("lambda", float, 1.0)),
                needs_base=True))


# --- tall_consensus: TALL masks and consensus merging (Wang et al. 2024; evomerge's own) ----------

def _tall_consensus(g: Group) -> None:
    """Task arithmetic kept only where at least `k` tasks own the parameter: task t owns it when its vector
    outweighs the others' sum there, |theta_t - theta_0| > tall_mask_lambda * |theta_0 + tau_mt - theta_t|
    (tau_mt the weighted sum; tall_masks' generate_task_masks, computed on the weights as it is)."""
    assert g.base is not None
    base = g.base.full().float()
    vectors = [e.vector().delta * e.params["weight"] for e in g.non_base]
    tunes = [base + v for v in vectors]
    multi = base + sum(vectors, torch.zeros_like(base))
    owners = sum(((base - t).abs() > (multi - t).abs() * g.shared["tall_mask_lambda"]).float() for t in tunes)
    merged = base + g.shared["lambda"] * (multi - base) * (owners >= g.shared["k"])
    g.out.copy_(merged.to(g.out.dtype))


register(Method("tall_consensus", _tall_consensus,
                (ParamSpec("weight", float, 1.0, per_model=True), ParamSpec("lambda", float, 1.0),
                 ParamSpec("tall_mask_lambda", float, 0.4, bounds=NON_NEGATIVE), ParamSpec("k", int, 2, bounds=NON_NEGATIVE)),
                needs_base=True))


# --- pcb: parameter competition balancing (Du et al. 2024; evomerge's own) -------------------------

def _clamp_rows(x: torch.Tensor, low: list[float], high: float) -> torch.Tensor:
    """Each row clamped between its values at ranks int(d * low_i) and int(d * (1 - high) - 1) in sorted
    order, as the reference's clamp (a selection, not its sort; a low fraction per row)."""
    d = x.shape[1]
    lo = torch.stack([torch.kthvalue(r, int(d * f) + 1).values for r, f in zip(x, low)])
    hi = torch.kthvalue(x, max(int(d * (1 - high) - 1), 0) + 1, dim=1).values
    return torch.clamp(x, lo[:, None], hi[:, None])


def _min_max(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to [0, 1]; a constant row (the reference's 0/0) is 0, so it contributes nothing."""
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), 0)


def pcb_merge(tvs: torch.Tensor, keep: list[float], clamp_ratio: float) -> torch.Tensor:
    """PCB-Merging of the task vectors (rows), as the authors' PCB_merge: each entry's balance is its own
    importance within its task (exp(n x min-max(|tau|)^2)) times its agreement with the others
    (tanh(tau x sum tau)); a task keeps its `keep` fraction of highest balances, rescaled to [0, 1], and
    the merge is the balance-weighted mean of the outlier-clamped vectors (clamp_ratio off each end of |tau|).
    Holds about six n x d float32 buffers per tensor."""
    n = tvs.shape[0]
    mag = _clamp_rows(tvs.abs(), [clamp_ratio] * n, clamp_ratio)
    balance = torch.exp(n * _min_max(mag).square_()).mul_(torch.tanh(tvs * tvs.sum(0)))
    scale = _min_max(_clamp_rows(balance, [1 - k for k in keep], 0.0))
    return (tvs.sign().mul_(mag).mul_(scale)).sum(0).div_(scale.sum(0).clamp_(min=1e-12))


def _pcb(g: Group) -> None:
    assert g.base is not None
    base = g.base.full()
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    if not g.non_base:
        g.out.copy_(base)
        return
    tvs = torch.stack([e.vector().delta.to(dtype).reshape(-1) * e.params["weight"] for e in g.non_base])
    merged = pcb_merge(tvs, [e.params["density"] for e in g.non_base], g.shared["clamp_ratio"]).reshape(base.shape)
    g.out.copy_((base.to(dtype) + g.shared["lambda"] * merged).to(g.out.dtype))


# density: the fraction of each task's entries kept (the paper's pcb_ratio); clamp_ratio: its outlier clamp
register(Method("pcb", _pcb, (ParamSpec("weight", float, 1.0, per_model=True),
                              ParamSpec("density", float, 0.1, per_model=True, bounds=Interval(0.0, 1.0, open_low=True)),
                              ParamSpec("lambda", float, 1.0),
                              ParamSpec("clamp_ratio", float, 0.0001, bounds=Interval(0.0, 0.25))),
                needs_base=True, sparse=True))


# --- localize_stitch: dataless Localize-and-Stitch (He et al. 2024; evomerge's own) ---------------

STITCH_PIECE = 1 << 20  # entries per piece of the stitch (tests make it small)


def _localized_cut(v: TaskVector, weight: float, density: float) -> torch.Tensor:
    """The k-th largest |weight x delta|, k = int(density x entries), in float32: weight x (the k-th largest
    |delta|), rounding being monotone, that from the task vector's summary (kept across candidates, so a
    candidate's cuts cost no pass over the tensor). An entry is localized where it exceeds the cut (none
    when k is 0: an infinite cut)."""
    k = int(density * v.numel)
    cut = torch.tensor(v.cut(k - 1).value if k else math.inf, dtype=torch.float32)
    return cut.mul_(abs(weight))


def _localize_stitch(g: Group) -> None:
    """Each weighted task vector w x tau localized to its entries above its top-density cut, then stitched:
    base + the sum of the localized vectors, each entry divided by the number of tasks localized there
    (the authors' create_basepatch and Stitcher of the dataless variant, tensor by tensor). The cuts are the
    whole tensor's; the stitch runs in pieces (of g.spans only, when given), holding a few float32 copies of
    a piece per expert beyond the output."""
    assert g.base is not None
    entries = g.non_base
    if not entries:
        g.out.copy_(g.base.full())
        return
    vectors = [e.vector() for e in entries]
    weights = [e.params["weight"] for e in entries]
    cuts = torch.stack([_localized_cut(v, w, e.params["density"]) for v, w, e in zip(vectors, weights, entries)])[:, None]
    base, models = vectors[0].base.reshape(-1), [v.model.reshape(-1) for v in vectors]
    cuts, out = cuts.to(base.device), g.out.reshape(-1)
    for start, end in g.spans or ((0, out.numel()),):
        for s in range(start, end, STITCH_PIECE):
            e = min(s + STITCH_PIECE, end)
            b = base[s:e].float()  # the stored tensor itself when float32: never modified
            tau = torch.stack([(m[s:e].float() - b).mul_(w) for m, w in zip(models, weights)])
            local = tau.abs() > cuts
            torch.add(b, (tau * local).sum(0).div_(local.sum(0).clamp_(min=1)), out=out[s:e])
    g.merged_spans = g.spans is not None


# density: the fraction of each task vector localized (the paper's sparsity); weight scales it before localizing
register(Method("localize_stitch", _localize_stitch,
                (ParamSpec("weight", float, 1.0, per_model=True),
                 ParamSpec("density", float, 0.1, per_model=True, bounds=Interval(0.0, 1.0, open_low=True))),
                needs_base=True, sparse=True))


# --- fisher, regmean: data-aware merges from calibration statistics (evomerge/merge/calibration.py) ----

def _statistic(g: Group, e: Entry, key: str) -> torch.Tensor | None:
    if e.path is None:
        raise UserError(f"{g.name}: model {e.model!r} is not a checkpoint on disk; {key.rstrip(':')} statistics need one")
    stats = calibration.statistics(str(e.path), str(g.shared["calibration"]))
    name = key + (g.name if key == calibration.FISHER else g.name.removesuffix(".weight"))
    return stats.get_tensor(name) if name in stats.keys() else None


def _fisher(g: Group) -> None:
    """Fisher-weighted averaging (Matena & Raffel 2022): sum_i w_i (F_i + eps) theta_i / sum_i w_i (F_i + eps),
    F_i model i's diagonal Fisher on the calibration set (fusion-bench 0.2.33's merging_with_fisher_weights
    with normalize_fisher_weight off). A tensor without a Fisher (a buffer) is the weighted average."""
    if not any(e.params["weight"] for e in g.entries):
        raise UserError(f"{g.name}: fisher needs a weight above 0 for at least one model")
    num = torch.zeros(g.out.shape)
    den = torch.zeros(g.out.shape)
    for e in g.entries:
        f = _statistic(g, e, calibration.FISHER)
        w = e.params["weight"] * ((f.float() if f is not None else 0.0) + g.shared["epsilon"])
        num += w * e.full().float()
        den += w
    g.out.copy_((num / den).to(g.out.dtype))


register(Method("fisher", _fisher, (ParamSpec("weight", float, 1.0, per_model=True, base_too=True, bounds=NON_NEGATIVE),
                                    ParamSpec("calibration", str), ParamSpec("epsilon", float, 1e-6, bounds=POSITIVE)),
                min_inputs=2))


def _regmean(g: Group) -> None:
    """RegMean (Jin et al. 2023): a linear layer's weight W = (sum_i w_i G_i')^-1 sum_i w_i G_i' W_i^T (transposed
    back), G_i its inputs' Gram matrix in model i with the off-diagonal entries scaled by alpha; every other tensor
    is the models' weighted mean. With equal weights (the default) this is the paper's and fusion-bench 0.2.33's
    merging_with_regmean_weights; a weight w_i scales model i's term of the least-squares objective, so a search
    can weigh each model per layer (only the ratios matter)."""
    weights = [e.params["weight"] for e in g.entries]
    if not any(weights):
        raise UserError(f"{g.name}: regmean needs a weight above 0 for at least one model")
    grams = [_statistic(g, e, calibration.GRAM) if g.name.endswith(".weight") else None for e in g.entries]
    if any(x is None for x in grams) or g.out.dim() != 2:
        g.out.copy_((sum(w * e.full().float() for w, e in zip(weights, g.entries)) / sum(weights)).to(g.out.dtype))
        return
    g.out.copy_(calibration.regmean_solve(grams, [e.full() for e in g.entries], g.shared["alpha"], weights).to(g.out.dtype))


def _regmean_plus(g: Group) -> None:
    """RegMean++: RegMean whose Gram matrices for layer l are taken on the merged model's own layers < l, so every
    tensor of the merge is computed at once, by the first tensor's merge to ask (calibration.regmean_plus), and
    each candidate of a search is a calibration pass of its own. Weights as regmean's."""
    if g.entries[0].path is None:
        raise UserError(f"{g.name}: regmean_plus needs its first model as a checkpoint on disk (its config and tokenizer)")
    w = g.whole
    merged = w.shared.get("regmean_plus", lambda: calibration.regmean_plus(
        g.entries[0].path, calibration.read_examples(g.shared["calibration"]), len(g.entries), w.read,
        lambda n: [p["weight"] for p in w.params(n)], lambda n: w.shared_params(n)["alpha"]), readers=len(w.names))
    if g.name not in merged:
        raise UserError(f"{g.name}: regmean_plus merges the model transformers loads from {g.entries[0].path}, which has no such parameter")
    g.out.copy_(merged[g.name].to(g.out.dtype))


_REGMEAN_SHARED = (ParamSpec("calibration", str), ParamSpec("alpha", float, 0.9, bounds=UNIT))
_REGMEAN_WEIGHT = ParamSpec("weight", float, 1.0, per_model=True, base_too=True, bounds=NON_NEGATIVE)
register(Method("regmean", _regmean, (_REGMEAN_WEIGHT, *_REGMEAN_SHARED), min_inputs=2))
register(Method("regmean_plus", _regmean_plus, (_REGMEAN_WEIGHT, *_REGMEAN_SHARED), min_inputs=2))
