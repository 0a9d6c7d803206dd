"""MAP (Li et al. 2024, "MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
Approximation"): model each objective as a quadratic in the merge coefficients, and evaluate the quadratics'
predicted Pareto front. For few dimensions and few evaluations: a quadratic in d dimensions has
p = 1 + d + d(d+1)/2 coefficients (15 at d = 4, 66 at d = 10, 231 at d = 20), and every fit needs at least p
successful evaluations.

Rounds: round 0 is a Latin hypercube of `initial` points (default 2p; `x0`, when given, is its first point);
after it, each round fits one quadratic per objective to every successful evaluation so far (least squares in
coordinates normalised to [0, 1], with a `ridge` penalty on the non-constant terms), and proposes `batch`
points: the minima over the box of `batch` weighted sums of the normalised quadratics (weights evenly spread
over the simplex for two objectives, seeded Dirichlet draws for more), each found by L-BFGS-B from the best
evaluated point under its weights. A proposal within `spacing` (normalised distance) of an evaluated or
already proposed point is moved by a seeded Gaussian step of that size, so a converged surrogate still
samples around its optimum instead of repeating itself. Options are checked when the optimizer is made.

Generational: `ask` hands a round out in pieces and returns [] until every member has a result. Failures
(failed, NaN, a missing objective) are left out of the fit; while fewer than p evaluations succeeded, a round
is another Latin hypercube. State is plain data (arrays, the generator's state), so a resumed run asks the
same points.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from evomerge.optimizers.base import Optimizer
from evomerge.optimizers.generation import Generation
from evomerge.records import Evaluation, UserError


def n_coefficients(d: int) -> int:
    """Terms of a full quadratic in d variables: the constant, d linear, d(d+1)/2 products."""
    return 1 + d + d * (d + 1) // 2


def features(u: np.ndarray) -> np.ndarray:
    """(n, d) points -> (n, p) design matrix [1, u_i, u_i u_j for i <= j]."""
    u = np.atleast_2d(u)
    i, j = np.triu_indices(u.shape[1])
    return np.hstack([np.ones((len(u), 1)), u, u[:, i] * u[:, j]])


def fit_quadratic(u: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """Coefficients (p,) of the quadratic that best fits y over points u, with `ridge` on all but the constant."""
    A = features(u)
    if len(A) < A.shape[1]:
        raise ValueError(f"{len(A)} points cannot fit a quadratic of {A.shape[1]} coefficients")
    penalty = np.full(A.shape[1], float(ridge))
    penalty[0] = 0.0
    return np.linalg.solve(A.T @ A + np.diag(penalty), A.T @ y)


def quadratic_parts(w: np.ndarray, d: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(c, b, H) with q(u) = c + b.u + u.H.u / 2, for the gradient of a fitted quadratic."""
    i, j = np.triu_indices(d)
    H = np.zeros((d, d))
    H[i, j] += w[1 + d:]
    H = H + H.T  # the diagonal doubles, as the second derivative of w_ii u_i^2 is 2 w_ii
    return float(w[0]), w[1:1 + d], H


def simplex_weights(m: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if m == 1:
        return np.ones((k, 1))
    if m == 2:
        t = np.linspace(0.0, 1.0, k) if k > 1 else np.array([0.5])
        return np.column_stack([t, 1.0 - t])
    return rng.dirichlet(np.ones(m), size=k)


class MAP(Optimizer):
    def __init__(
        self,
        *,
        initial: int | None = None,
        batch: int = 10,
        ridge: float = 1e-8,
        spacing: float = 0.02,
        **problem: Any,  # bounds, objectives, seed, x0: the base Optimizer's
    ) -> None:
        super().__init__(**problem)
        self.coefficients = n_coefficients(self.dim)
        self.initial = 2 * self.coefficients if initial is None else initial
        if int(self.initial) != self.initial or self.initial < self.coefficients:
            raise UserError(f"initial must be an integer >= {self.coefficients}, the coefficients of a quadratic in "
                            f"{self.dim} dimensions, got {initial!r}")
        if int(batch) != batch or batch < 1:
            raise UserError(f"batch must be an integer >= 1, got {batch!r}")
        if not 0 <= ridge < 1:
            raise UserError(f"ridge must be in [0, 1), got {ridge!r}")
        if not 0 < spacing <= 0.5:
            raise UserError(f"spacing is a fraction of each range: need 0 < spacing <= 0.5, got {spacing!r}")
        self.initial, self.batch, self.ridge, self.spacing = int(self.initial), int(batch), float(ridge), float(spacing)
        self._rng = np.random.default_rng(self.seed)
        self._u_seen = np.empty((0, self.dim))  # normalised points with a successful evaluation
        self._f_seen = np.empty((0, len(self.objectives)))  # their losses
        self._u_all = np.empty((0, self.dim))  # every point handed out
        self._gen: Generation | None = None
        self._rounds = 0

    # normalised coordinates
    def _u(self, x: np.ndarray) -> np.ndarray:
        return (x - self.bounds[:, 0]) / (self.bounds[:, 1] - self.bounds[:, 0])

    def _x(self, u: np.ndarray) -> np.ndarray:
        return self.clip(self.bounds[:, 0] + np.asarray(u) * (self.bounds[:, 1] - self.bounds[:, 0]))

    def _latin_hypercube(self, n: int) -> np.ndarray:
        cells = np.column_stack([self._rng.permutation(n) for _ in range(self.dim)])
        return (cells + self._rng.random((n, self.dim))) / n

    def _next_round(self) -> np.ndarray:
        if len(self._u_seen) < self.coefficients:
            us = self._latin_hypercube(self.initial if self._rounds == 0 else self.batch)
            if self._rounds == 0 and self.x0 is not None:
                us[0] = self._u(self.x0)
            return us
        return self._front_proposals()

    def _front_proposals(self) -> np.ndarray:
        from scipy.optimize import minimize

        lo, hi = self._f_seen.min(axis=0), self._f_seen.max(axis=0)
        scale = np.where(hi > lo, hi - lo, 1.0)
        fits = [quadratic_parts(fit_quadratic(self._u_seen, (self._f_seen[:, k] - lo[k]) / scale[k], self.ridge), self.dim)
                for k in range(self._f_seen.shape[1])]
        observed = (self._f_seen - lo) / scale
        taken = list(self._u_all)
        out = []
        for w in simplex_weights(len(fits), self.batch, self._rng):
            b = sum(wk * f[1] for wk, f in zip(w, fits))
            H = sum(wk * f[2] for wk, f in zip(w, fits))
            start = self._u_seen[int(np.argmin(observed @ w))]
            res = minimize(lambda u: (b @ u + 0.5 * u @ H @ u, b + H @ u), start, jac=True, method="L-BFGS-B",
                           bounds=[(0.0, 1.0)] * self.dim)
            u = np.clip(res.x, 0.0, 1.0)
            for _ in range(100):  # bounded: a box dense with points at this spacing takes the last step as it is
                if min(np.linalg.norm(np.asarray(taken) - u, axis=1)) >= self.spacing:
                    break
                u = np.clip(u + self._rng.normal(0.0, self.spacing, self.dim), 0.0, 1.0)
            taken.append(u)
            out.append(u)
        return np.array(out)

    def _ask(self, n: int):
        if self._gen is None:
            us = self._next_round()
            self._u_all = np.vstack([self._u_all, us])
            self._gen = Generation(xs=us, index=self._rounds)
        rows = self._gen.take(n)
        for k, r in enumerate(rows):
            self._gen.bind(self._next_id + k, r)
        return [(self._x(self._gen.xs[r]), {"generation": self._gen.index}) for r in rows]

    def tell(self, evaluations: Sequence[Evaluation]) -> None:
        for ev in evaluations:
            if self._gen is not None:
                self._gen.record(ev.candidate_id, self.losses(ev))
        if self._gen is None or not self._gen.complete:
            return
        for u, f in zip(self._gen.xs, self._gen.ordered()):
            if f is not None:
                self._u_seen = np.vstack([self._u_seen, u])
                self._f_seen = np.vstack([self._f_seen, f])
        self._gen = None
        self._rounds += 1

    def pareto_front(self) -> tuple[np.ndarray, np.ndarray]:
        """The non-dominated evaluated points: (X, objective values in the objectives' own units)."""
        from evomerge.optimizers.pareto import nondominated

        signs = np.array([-o.sign() for o in self.objectives])
        keep = nondominated(-self._f_seen)
        return self._x(self._u_seen[keep]), self._f_seen[keep] * signs

    def _state(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state, "u_seen": self._u_seen.tolist(), "f_seen": self._f_seen.tolist(),
                "u_all": self._u_all.tolist(), "gen": self._gen, "rounds": self._rounds}

    def _load(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._u_seen = np.asarray(state["u_seen"], dtype=float).reshape(-1, self.dim)
        self._f_seen = np.asarray(state["f_seen"], dtype=float).reshape(-1, len(self.objectives))
        self._u_all = np.asarray(state["u_all"], dtype=float).reshape(-1, self.dim)
        self._gen, self._rounds = state["gen"], int(state["rounds"])