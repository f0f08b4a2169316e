"""Rank agreement between layer scorers (numpy only), and ranking conventions.

Conventions shared by every scorer of the `prune` stage, the same as the avss
stage's (`worker.scoring.avss`):
- a *score* is per layer, higher = more important;
- a *ranking* lists the layer indices ascending by score, least important first
  (= first pruning candidate first), ties by the lower layer index first, a
  non-finite score last (`pruning_order`); it is what the avss stage's
  `summary["ranking"]` shows and its `Ranking` (first="lowest") carries;
- a *rank* is per layer, 1 = lowest score = first pruning candidate, L = most
  important (`ranks_from_order`), like the avss stage's `rank` column.

`Ranking` carries a ranking with its orientation said once (`first="lowest"` for
importance scores, `first="highest"` for EAVSS, most hallucination-prone first), so
stages hand rankings to each other without restating which end comes first.

Agreement is computed on per-layer values of the same orientation (scores, or
`importance_from_order(order)` = the rank), so ties in scores are kept:
- Spearman rho: Pearson correlation of the average ranks (ties get the mean of
  the ranks they span);
- Kendall tau-b: (concordant - discordant) / sqrt((n0 - n1)(n0 - n2)) over all
  pairs, n0 = n(n-1)/2, n1 / n2 = pairs tied in the first / second values.
Both are None (undefined) when either side is constant or has fewer than 2 layers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "Ranking",
    "average_ranks",
    "importance_from_order",
    "kendall_tau_b",
    "pairwise_agreement",
    "pruning_order",
    "rank_agreement",
    "ranks_from_order",
    "spearman_rho",
]


def pruning_order(scores: Sequence[float]) -> list[int]:
    """Layer indices ascending by score (first pruning candidate first); ties: lower index
    first; a non-finite score sorts last."""

    def key(i: int) -> tuple[float, int]:
        v = float(scores[i])
        return (v if math.isfinite(v) else math.inf, i)

    return sorted(range(len(scores)), key=key)


@dataclass(frozen=True)
class Ranking:
    """Every layer index once, ordered by a per-layer score with the `first` end first:
    `"lowest"` (importance scores: the first pruning candidate first) or `"highest"`
    (e.g. EAVSS: the most hallucination-prone first). `scores` per layer when known."""

    order: tuple[int, ...]
    first: Literal["lowest", "highest"]
    scores: tuple[float, ...] | None = None

    @classmethod
    def from_scores(cls, scores: Sequence[float], first: Literal["lowest", "highest"] = "lowest") -> Ranking:
        """Ties: lower index first; a non-finite score last (`pruning_order`)."""
        values = [float(v) for v in scores]
        key = values if first == "lowest" else [-v for v in values]
        return cls(tuple(pruning_order(key)), first, tuple(values))

    def lowest_first(self) -> list[int]:
        return list(self.order) if self.first == "lowest" else list(reversed(self.order))

    def highest_first(self) -> list[int]:
        return list(self.order) if self.first == "highest" else list(reversed(self.order))

    def ranks(self) -> list[int]:
        """Per layer: 1 = first of `order`."""
        return ranks_from_order(self.order)


def ranks_from_order(order: Sequence[int]) -> list[int]:
    """Rank of each layer (1 = first pruning candidate, L = most important) from a ranking."""
    ranks = [0] * len(order)
    for pos, layer in enumerate(order):
        ranks[int(layer)] = pos + 1
    return ranks


def importance_from_order(order: Sequence[int]) -> list[float]:
    """Per-layer values, higher = more important: the rank."""
    return [float(r) for r in ranks_from_order(order)]


def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks in ascending order of `values`; tied values share their mean rank."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(n, dtype=np.float64)
    sx = x[order]
    i = 0
    while i < n:
        j = i
        while j + 1 < n and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _check(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two 1-d sequences of the same length, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("values must be finite")
    return x, y


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho with average ranks for ties; None when undefined."""
    x, y = _check(a, b)
    if x.size < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    if den == 0.0:
        return None
    return float(np.clip((rx * ry).sum() / den, -1.0, 1.0))


def kendall_tau_b(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Kendall's tau-b (tie-corrected); None when undefined. O(n^2) pairs, fine for layers."""
    x, y = _check(a, b)
    n = x.size
    if n < 2:
        return None
    iu = np.triu_indices(n, k=1)
    dx = np.sign(x[:, None] - x[None, :])[iu]
    dy = np.sign(y[:, None] - y[None, :])[iu]
    n0 = dx.size
    n1 = int((dx == 0).sum())
    n2 = int((dy == 0).sum())
    den = math.sqrt(float(n0 - n1) * float(n0 - n2))
    if den == 0.0:
        return None
    return float(np.clip((dx * dy).sum() / den, -1.0, 1.0))


def rank_agreement(a: Sequence[float], b: Sequence[float]) -> dict[str, float | None]:
    """{"spearman": rho, "kendall": tau_b} of two per-layer value vectors (same orientation)."""
    return {"spearman": spearman_rho(a, b), "kendall": kendall_tau_b(a, b)}


def pairwise_agreement(values: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float | None]]:
    """Agreement of every pair of scorers, keyed "a|b" (in the mapping's order)."""
    return {f"{a}|{b}": rank_agreement(values[a], values[b]) for a, b in itertools.combinations(values, 2)}
