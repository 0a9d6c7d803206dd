"""The user's side of `digits_m2n2.yaml`: M2N2's pre-trained setting (Abrantes et al., GECCO 2025, §5.2).

Two 64-256-10 ReLU MLPs, one trained on scikit-learn's digits 0-4, the other on 5-9 (Adam, lr 3e-3, 10
full-batch steps from N(0, 0.01²), as SakanaAI/natural_niches does), are the two starting genomes: the
genome is the flattened parameters (W1, b1, W2, b2; 19,210 values), so M2N2's split-point crossover runs
over the parameters themselves. Fitness: per-example correctness on the 1,437 training images. The
held-out table compares, on the last 360 images: both parents, the best of a brute-force sweep of SLERP
ratios (picked on training accuracy, as the paper's baseline) and the evolved best.

evomerge imports this file as `digits_m2n2` because the run config's folder is on the import path.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from fitness.base import FitnessResult

HIDDEN, INPUT, OUTPUT = 256, 64, 10
NUM_PARAMS = (INPUT + 1) * HIDDEN + (HIDDEN + 1) * OUTPUT  # 19,210


@lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits: the first 80% train (1,437), the rest test (360), as in the paper's code."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    cut = int(len(images) * 0.8)
    images = images.astype(np.float32)
    return images[:cut], labels[:cut], images[cut:], labels[cut:]


def logits(params: np.ndarray, x: np.ndarray) -> np.ndarray:
    p = np.asarray(params, dtype=np.float32)
    w1, b1 = p[: INPUT * HIDDEN].reshape(INPUT, HIDDEN), p[INPUT * HIDDEN: (INPUT + 1) * HIDDEN]
    rest = p[(INPUT + 1) * HIDDEN:]
    w2, b2 = rest[: HIDDEN * OUTPUT].reshape(HIDDEN, OUTPUT), rest[HIDDEN * OUTPUT:]
    return np.maximum(x @ w1 + b1, 0.0) @ w2 + b2


def correct(params: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (logits(params, x).argmax(axis=1) == y).astype(float)


def train(seed: int, x: np.ndarray, y: np.ndarray, lr: float = 3e-3, steps: int = 10) -> np.ndarray:
    """Adam on the full batch from N(0, 0.01²), as the paper's pre-trained models."""
    import torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    params = (torch.randn(NUM_PARAMS, generator=gen) * 0.01).requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    for _ in range(steps):
        p = params
        w1, b1 = p[: INPUT * HIDDEN].view(INPUT, HIDDEN), p[INPUT * HIDDEN: (INPUT + 1) * HIDDEN]
        rest = p[(INPUT + 1) * HIDDEN:]
        w2, b2 = rest[: HIDDEN * OUTPUT].view(HIDDEN, OUTPUT), rest[HIDDEN * OUTPUT:]
        loss = torch.nn.functional.cross_entropy(torch.relu(xt @ w1 + b1) @ w2 + b2, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return params.detach().numpy().astype(np.float64)


@lru_cache(maxsize=1)
def _pretrained() -> np.ndarray:
    xtr, ytr, _, _ = digits()
    low = ytr < 5
    return np.stack([train(1, xtr[low], ytr[low]), train(2, xtr[~low], ytr[~low])])


def pretrained() -> np.ndarray:
    """The starting genomes: the MLP trained on digits 0-4 and the one trained on 5-9 (2 × 19,210)."""
    return _pretrained().copy()


def fitness(genome) -> FitnessResult:
    """Training accuracy, with per-example correctness for M2N2's competition."""
    xtr, ytr, _, _ = digits()
    right = correct(np.asarray(genome.x), xtr, ytr)
    return FitnessResult(objectives={"train_acc": float(right.mean())}, per_example=right.tolist())


def slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    omega = np.arccos(np.clip(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)), -1.0, 1.0))
    if np.sin(omega) <= 1e-6:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def best_slerp(ratios: int = 1_000) -> tuple[float, np.ndarray]:
    """The paper's brute-force baseline: the SLERP ratio with the best training accuracy."""
    xtr, ytr, _, _ = digits()
    a, b = _pretrained()
    best_t, best_acc = 0.0, -1.0
    for t in np.linspace(0.0, 1.0, ratios):
        acc = correct(slerp(t, a, b), xtr, ytr).mean()
        if acc > best_acc:
            best_t, best_acc = float(t), acc
    return best_t, slerp(best_t, a, b)


def holdout(best, ratios: int = 1_000) -> dict[str, dict[str, float]]:
    """Test accuracy (all ten digits, 360 images) of the parents, the best SLERP ratio and the evolved best."""
    _, _, xte, yte = digits()
    a, b = _pretrained()
    t, sl = best_slerp(ratios)
    rows = {"MLP digits 0-4": a, "MLP digits 5-9": b, f"best SLERP of {ratios} ratios (t={t:.4f})": sl,
            "M2N2 (evolved)": np.asarray(best.x)}
    return {name: {"test_acc": float(correct(p, xte, yte).mean())} for name, p in rows.items()}
