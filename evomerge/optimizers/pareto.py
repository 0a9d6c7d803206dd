"""Pareto arithmetic over objective values made larger-is-better in every column: the non-dominated rows and the
hypervolume they dominate. Used by the optimizers that keep a front (MAP) and by the read side (Run.pareto)."""
from __future__ import annotations

import numpy as np


def nondominated(values: np.ndarray) -> np.ndarray:
    """Mask of the rows of `values` (larger is better in every column) that no other row dominates.

    Rows are visited best first in lexicographic order, where whatever dominates a row comes before it; a
    dominated row is dominated by some front member too, so each row is checked against the front found so far
    only: O(n x front) instead of O(n^2), 10,000 evaluations in a fraction of a second instead of 16 s."""
    keep = np.zeros(len(values), dtype=bool)
    front = values[:0]
    for i in np.lexsort(values.T[::-1] * -1):
        v = values[i]
        if not (np.all(front >= v, axis=1) & np.any(front > v, axis=1)).any():
            keep[i] = True
            front = np.vstack([front, v])
    return keep


def hypervolume(values: np.ndarray, ref: np.ndarray) -> float:
    """Hypervolume (larger-is-better values) dominated by `values` above the reference point `ref`."""
    pts = values[np.all(values > ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    if values.shape[1] == 1:
        return float(pts[:, 0].max() - ref[0])
    if values.shape[1] == 2:  # a staircase: sweep the points by the first objective, best first
        pts = pts[np.lexsort((-pts[:, 1], -pts[:, 0]))]
        total, top = 0.0, ref[1]
        for x, y in pts:
            if y > top:
                total += (x - ref[0]) * (y - top)
                top = y
        return float(total)
    # slice along the last objective: exact, fine for the front sizes of a merge search
    pts = pts[np.argsort(-pts[:, -1])]
    total = 0.0
    for i in range(len(pts)):
        hi = pts[i, -1]
        lo = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        if hi > lo:
            front = pts[: i + 1, :-1]
            total += hypervolume(front[nondominated(front)], ref[:-1]) * (hi - lo)
    return float(total)
