"""M2N2 (Abrantes et al., "Competition and Attraction Improve Model Fusion", GECCO 2025), native.

An archive of genomes with their per-example scores S (one row per member, `Evaluation.per_example`,
larger is better, e.g. 1 where the model is right). Each step:
  - competition (fitness sharing): z_j = (Σ_k s_kj)^α (1 where the sum is 0), f_i = Σ_j s_ij / z_j;
  - parent a drawn with probability f_a / Σ f; with attraction, parent b drawn in proportion to
    Σ_j max(0, F_bj − F_aj), F_ij = s_ij / z_j (b is strong where a is weak); without, b like a;
  - crossover: split point s ~ U{0..d−1} over the genome's order and ratio w ~ U(0, 1); coordinates
    before s interpolate with t = w, the rest with 1 − w; SLERP with one global angle (linear when the
    parents are parallel) or plain linear interpolation; without crossover the child is a copy of a;
  - optional Gaussian mutation N(0, mutation²);
  - steady state: when the child's result arrives it joins the archive, fitness is recomputed over all,
    and the weakest member leaves (the child itself when it is the weakest).

Options: `archive_size` (20), `alpha` (1.0; 0 with attraction=False is the plain GA baseline),
`attraction` (True), `crossover` (True), `interpolation` ("slerp" or "linear"), `mutation` (std in the
genome's units, 0 = off; the paper mutates only when evolving from scratch), `initial_size` (how many
initial members to evaluate before breeding; default archive_size; the paper's from-scratch run uses 2),
`init_std` (initial members drawn N(x0 or the bounds' centre, init_std²) instead of uniformly in bounds),
`initial_points` (genomes, one row each, that are the first initial members: the paper's pre-trained
setting starts its archive from the two trained models; x0 is then ignored).

Not generational: once the initial members are in, `ask(n)` always returns n children, bred from the
archive as it stands; results may arrive in any order. Without `per_example`, the first objective
(as larger-is-better) is the single example. Failures: a failed child is dropped (it never enters the
archive); a failed initial member is replaced by a fresh initial point at the next ask.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from evomerge.optimizers.base import Optimizer, check_population
from evomerge.records import Evaluation, UserError

INTERPOLATIONS = ("slerp", "linear")


def slerp_split(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """SLERP of a towards b with a per-coordinate ratio t and one global angle; linear when parallel."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return (1 - t) * a + t * b
    omega = np.arccos(np.clip(np.dot(a / na, b / nb), -1.0, 1.0))
    s = np.sin(omega)
    if s <= 1e-6:
        return (1 - t) * a + t * b
    return np.sin((1 - t) * omega) / s * a + np.sin(t * omega) / s * b


class M2N2(Optimizer):
    def __init__(
        self,
        *,
        archive_size: int = 20,
        alpha: float = 1.0,
        attraction: bool = True,
        crossover: bool = True,
        interpolation: str = "slerp",
        mutation: float = 0.0,
        initial_size: int | None = None,
        init_std: float | None = None,
        initial_points: Any = None,
        **problem: Any,  # bounds, objectives, seed, x0: the base Optimizer's
    ) -> None:
        super().__init__(**problem)
        self._points = [] if initial_points is None else [self.clip(self._check_x0(p)) for p in initial_points]
        self.archive_size = check_population("archive_size", archive_size)
        if interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation {interpolation!r} is not valid; use one of {', '.join(INTERPOLATIONS)}")
        if alpha < 0 or mutation < 0 or (init_std is not None and init_std <= 0):
            raise UserError("alpha and mutation must be >= 0 and init_std > 0")
        if not crossover and mutation == 0:
            raise UserError("without crossover the child is a copy of its parent: set mutation > 0")
        self.alpha = float(alpha)
        self.attraction = bool(attraction)
        self.crossover = bool(crossover)
        self.interpolation = interpolation
        self.mutation = float(mutation)
        self.initial_size = min(self.archive_size, check_population("initial_size", initial_size or self.archive_size))
        self.init_std = init_std
        self._rng = np.random.default_rng(self.seed)
        self.X = np.empty((0, self.dim))  # archive genomes
        self.S = np.empty((0, 0))  # archive per-example scores
        self.L = np.empty(0)  # archive first-objective losses (for reporting the best)
        self._pending: dict[int, tuple[str, np.ndarray]] = {}  # id -> (kind, genome)
        self._initial_asked = 0
        self._seeded = False  # the initial members are in
        self.failures = 0
        self.evaluations = 0

    # -- competition -------------------------------------------------------------------------------
    def _shared(self, S: np.ndarray) -> np.ndarray:
        """F_ij = s_ij / z_j."""
        z = S.sum(axis=0)
        z = np.where(z > 0, z, 1.0) ** self.alpha
        return S / z

    @staticmethod
    def _pick(rng: np.random.Generator, weights: np.ndarray) -> int:
        total = weights.sum()
        if not np.isfinite(total) or total <= 0:
            return int(rng.integers(len(weights)))
        return int(rng.choice(len(weights), p=weights / total))

    def _child(self) -> tuple[np.ndarray, dict[str, Any]]:
        F = self._shared(self.S)
        f = np.maximum(F.sum(axis=1), 0.0)
        a = self._pick(self._rng, f)
        if self.attraction:
            b = self._pick(self._rng, np.maximum(0.0, F - F[a]).sum(axis=1))
        else:
            b = self._pick(self._rng, f)
        child = self.X[a].copy()
        meta: dict[str, Any] = {"kind": "child", "parents": [a, b]}
        if self.crossover:
            split = int(self._rng.integers(self.dim))
            w = float(self._rng.random())
            t = np.where(np.arange(self.dim) < split, w, 1.0 - w)
            if self.interpolation == "slerp":
                child = slerp_split(self.X[a], self.X[b], t)
            else:
                child = (1 - t) * self.X[a] + t * self.X[b]
            meta.update(split=split, ratio=w)
        if self.mutation > 0:
            child = child + self._rng.normal(0.0, self.mutation, self.dim)
        return self.clip(child), meta

    def _initial(self) -> np.ndarray:
        if self._initial_asked < len(self._points):
            self._initial_asked += 1
            return self._points[self._initial_asked - 1].copy()
        first = self._initial_asked == 0 and self.x0 is not None
        self._initial_asked += 1
        if first:
            return self.x0.copy()
        if self.init_std is not None:
            centre = self.x0 if self.x0 is not None else self.bounds.mean(axis=1)
            return self.clip(centre + self._rng.normal(0.0, self.init_std, self.dim))
        return self._rng.uniform(self.bounds[:, 0], self.bounds[:, 1])

    def _ask(self, n: int):
        out = []
        for k in range(n):
            pending_initial = sum(1 for kind, _ in self._pending.values() if kind == "initial")
            if not self._seeded and len(self.X) + pending_initial < self.initial_size:
                x, meta = self._initial(), {"kind": "initial"}
            elif len(self.X) >= (2 if self.crossover else 1):
                x, meta = self._child()
            else:
                break  # waiting for initial results
            self._pending[self._next_id + k] = (meta["kind"], x)
            out.append((x, meta))
        return out

    # -- results -----------------------------------------------------------------------------------
    def _scores(self, ev: Evaluation) -> np.ndarray | None:
        loss = self.loss(ev)
        if loss is None:
            return None
        s = np.asarray(ev.per_example if ev.per_example is not None else [-loss], dtype=float)
        if not np.all(np.isfinite(s)):
            return None
        if self.S.shape[1] and len(s) != self.S.shape[1]:
            raise UserError(f"per_example has {len(s)} scores, earlier evaluations had {self.S.shape[1]}")
        return s

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        for ev in evaluations:
            entry = self._pending.pop(ev.candidate_id, None)
            if entry is None:
                continue  # not pending: a replayed or unknown result
            self.evaluations += 1
            s = self._scores(ev)
            if s is None:
                self.failures += 1
                continue
            self._insert(entry[1], s, float(self.loss(ev)))
        if len(self.X) >= self.initial_size:
            self._seeded = True

    def _insert(self, x: np.ndarray, s: np.ndarray, loss: float) -> None:
        if not self.S.shape[1]:
            self.S = np.empty((0, len(s)))
        if len(self.X) < self.archive_size:
            self.X = np.vstack([self.X, x])
            self.S = np.vstack([self.S, s])
            self.L = np.append(self.L, loss)
            return
        # full: the child competes with everyone; the weakest leaves (the child, if it is the weakest).
        # Replacing in place keeps a large archive from being copied at every step.
        worst = int(np.argmin(self._shared(np.vstack([self.S, s])).sum(axis=1)))
        if worst < len(self.X):
            self.X[worst], self.S[worst], self.L[worst] = x, s, loss

    def best(self) -> tuple[np.ndarray, float]:
        """The archive member with the lowest first-objective loss, and that loss."""
        if not len(self.L):
            raise UserError("the archive is empty: no result has been told yet")
        i = int(np.argmin(self.L))
        return self.X[i].copy(), float(self.L[i])

    def _state(self) -> dict[str, Any]:
        return {
            "rng": self._rng.bit_generator.state,
            "X": self.X.copy(),
            "S": self.S.copy(),
            "L": self.L.copy(),
            "pending": {k: (kind, x.copy()) for k, (kind, x) in self._pending.items()},
            "initial_asked": self._initial_asked,
            "seeded": self._seeded,
            "failures": self.failures,
            "evaluations": self.evaluations,
        }

    def _load(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        self.X, self.S, self.L = state["X"].copy(), state["S"].copy(), state["L"].copy()
        self._pending = {int(k): (kind, x.copy()) for k, (kind, x) in state["pending"].items()}
        self._initial_asked = state["initial_asked"]
        self._seeded = state["seeded"]
        self.failures = state["failures"]
        self.evaluations = state["evaluations"]
