"""An L2-regularized logistic-regression probe (no scikit-learn), for P(IK), the EAVSS
probe, the length baseline and the per-layer table.

- Features are standardized with the training split's mean and standard deviation
  (a constant column gets std 1, so it contributes nothing).
- Objective (sklearn's `C = 1 / l2`): mean binary cross-entropy + l2 * ||w||^2 / (2 n);
  the intercept is not penalized. Minimized in float64 with L-BFGS (strong Wolfe line
  search) from zero weights, so a fit is deterministic.
- `l2=None`: the strength is chosen from `l2_grid` by stratified k-fold
  cross-validation on the training data only (mean validation log-loss; ties go to the
  stronger penalty). Fold assignment uses `seed`.
- A training set with a single class gives a constant probe predicting that class's
  smoothed rate (n_pos + 1) / (n + 2), flagged `degenerate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DEFAULT_L2_GRID", "LogisticProbe", "cv_fit", "fit_probe", "probe_confidence"]

# Up to 1e5: with a few hundred answers and 576-1,728 features, CV chose the old top (1e3) with its
# loss still falling. A choice at either end of the grid is flagged (`at_grid_edge`).
DEFAULT_L2_GRID: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)


def _as_xy(x: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    xa = np.asarray(x, dtype=np.float64)
    if xa.ndim == 1:
        xa = xa[:, None]
    if xa.ndim != 2:
        raise ValueError(f"features must be 2-D [examples, features], got shape {xa.shape}")
    if not np.isfinite(xa).all():
        raise ValueError("features contain NaN or inf")
    if y is None:
        return xa, None
    ya = np.asarray(y, dtype=np.float64).reshape(-1)
    if ya.shape[0] != xa.shape[0]:
        raise ValueError(f"{xa.shape[0]} feature rows for {ya.shape[0]} labels")
    if not np.isin(ya, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1")
    return xa, ya


@dataclass
class LogisticProbe:
    """A fitted probe: `predict_proba(x)` gives P(correct) in [0, 1]."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float
    l2: float
    degenerate: bool = False
    constant: float | None = None
    cv_losses: dict[float, float] | None = None
    at_grid_edge: bool = False  # CV chose the smallest or largest strength of the grid
    converged: bool = True

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, *, l2: float = 1.0, max_iter: int = 200) -> LogisticProbe:
        xa, ya = _as_xy(x, y)
        assert ya is not None
        if not (np.isfinite(l2) and l2 >= 0):
            raise ValueError(f"l2 must be >= 0, got {l2}")
        n, d = xa.shape
        if n == 0:
            raise ValueError("cannot fit a probe on no examples")
        mean = xa.mean(axis=0)
        scale = xa.std(axis=0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        pos = float(ya.sum())
        if pos == 0.0 or pos == n:
            rate = (pos + 1.0) / (n + 2.0)
            return cls(mean, scale, np.zeros(d), float(np.log(rate / (1 - rate))), float(l2),
                       degenerate=True, constant=rate)
        xs = torch.from_numpy((xa - mean) / scale)
        yt = torch.from_numpy(ya)
        w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
        prior = pos / n
        b = torch.tensor([np.log(prior / (1 - prior))], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")
        penalty = float(l2) / (2.0 * n)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            z = xs @ w + b
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, yt) + penalty * (w @ w)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        state = opt.state[opt._params[0]]
        converged = int(state.get("n_iter", 0)) < max_iter
        weight = w.detach().numpy().copy()
        bias = float(b.detach().numpy()[0])
        if not (np.isfinite(weight).all() and np.isfinite(bias)):
            raise FloatingPointError("probe fit diverged")
        return cls(mean, scale, weight, bias, float(l2), converged=converged)

    def decision(self, x: np.ndarray) -> np.ndarray:
        xa, _ = _as_xy(x)
        if xa.shape[1] != self.weight.shape[0]:
            raise ValueError(f"probe was fitted on {self.weight.shape[0]} features, got {xa.shape[1]}")
        return ((xa - self.mean) / self.scale) @ self.weight + self.bias

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """P(correct) per row, in [0, 1] (a float64 array)."""
        if self.constant is not None:
            xa, _ = _as_xy(x)
            return np.full(xa.shape[0], self.constant, dtype=np.float64)
        z = np.clip(self.decision(x), -500.0, 500.0)
        return 1.0 / (1.0 + np.exp(-z))


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def _stratified_folds(y: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for cls_value in (0.0, 1.0):
        idx = rng.permutation(np.flatnonzero(y == cls_value))
        for j, i in enumerate(idx):
            folds[j % k].append(int(i))
    return [np.asarray(sorted(f), dtype=np.int64) for f in folds]


def fit_probe(
    x: np.ndarray,
    y: np.ndarray,
    *,
    l2: float | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    folds: int = 3,
    seed: int = 0,
    max_iter: int = 200,
) -> LogisticProbe:
    """Fit on (x, y); with `l2=None` pick the strength by k-fold CV on (x, y) (see module doc)."""
    xa, ya = _as_xy(x, y)
    assert ya is not None
    if l2 is not None:
        return LogisticProbe.fit(xa, ya, l2=l2, max_iter=max_iter)
    grid = sorted({float(v) for v in l2_grid})
    if not grid:
        raise ValueError("l2_grid is empty")
    n_min = int(min(ya.sum(), len(ya) - ya.sum()))
    k = min(int(folds), n_min)
    if k < 2 or len(grid) == 1:
        return LogisticProbe.fit(xa, ya, l2=grid[-1] if k < 2 else grid[0], max_iter=max_iter)
    parts = _stratified_folds(ya, k, seed)
    losses: dict[float, float] = {}
    for strength in grid:
        total = 0.0
        for f in range(k):
            val = parts[f]
            train = np.setdiff1d(np.arange(len(ya)), val, assume_unique=True)
            probe = LogisticProbe.fit(xa[train], ya[train], l2=strength, max_iter=max_iter)
            total += _log_loss(probe.predict_proba(xa[val]), ya[val]) * len(val)
        losses[strength] = total / len(ya)
    best = min(grid, key=lambda s: (round(losses[s], 12), -s))
    probe = LogisticProbe.fit(xa, ya, l2=best, max_iter=max_iter)
    probe.cv_losses = losses
    probe.at_grid_edge = best in (grid[0], grid[-1])
    return probe


def probe_confidence(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    *,
    l2: float | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    folds: int = 3,
    seed: int = 0,
) -> tuple[np.ndarray, LogisticProbe]:
    """Fit a probe on the training split only and return its confidences on the test split."""
    probe = fit_probe(x_train, y_train, l2=l2, l2_grid=l2_grid, folds=folds, seed=seed)
    return np.clip(probe.predict_proba(x_test), 0.0, 1.0), probe


def cv_fit(
    x: np.ndarray,
    y: np.ndarray,
    *,
    l2: float | None = None,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    folds: int = 3,
    seed: int = 0,
) -> tuple[float | None, LogisticProbe]:
    """(cross-validated mean log-loss on (x, y), the probe fitted on all of (x, y)), for choosing
    features on the training split only. `l2=None`: the loss at the strength CV chose (the same
    folds as `fit_probe`); a fixed `l2`: the loss of k-fold fits at that strength. None when a
    class has fewer than 2 examples (no fold split is possible)."""
    xa, ya = _as_xy(x, y)
    assert ya is not None
    probe = fit_probe(xa, ya, l2=l2, l2_grid=l2_grid, folds=folds, seed=seed)
    if probe.cv_losses is not None:
        return probe.cv_losses[probe.l2], probe
    k = min(int(folds), int(min(ya.sum(), len(ya) - ya.sum())))
    if k < 2:
        return None, probe
    parts = _stratified_folds(ya, k, seed)
    total = 0.0
    for val in parts:
        train = np.setdiff1d(np.arange(len(ya)), val, assume_unique=True)
        fold = LogisticProbe.fit(xa[train], ya[train], l2=probe.l2)
        total += _log_loss(fold.predict_proba(xa[val]), ya[val]) * len(val)
    return total / len(ya), probe
