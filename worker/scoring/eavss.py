"""EAVSS: hallucination-aware layer scores (docs/method.md section 4, equations 9-12).

Inputs, per layer l = 0..L-1 (lists of floats of length L): the activation
variance and sparsity measured separately on the hallucinated and on the correct
answers, and the layer's nAVSS (section 2, eq. 8). Then

- (9)  HSAV_l = |var_l(hallucinated) - var_l(correct)|
- (10) HSS_l  = |S_l(hallucinated) - S_l(correct)|
- nHSAV, nHSS: each normalized to sum 1 over layers
- (11) HCS_l = alpha * nHSAV_l + (1 - alpha) * nHSS_l        (alpha = 0.5)
- (12) combine = "product" (default): EAVSS_l = nAVSS_l * HCS_l renormalized
       to sum 1, so a layer ranks high only when it is both active and
       hallucination-prone; combine = "weighted_sum":
       EAVSS_l = beta * nAVSS_l + (1 - beta) * HCS_l          (beta = 0.5)

nAVSS is renormalized to sum 1 before use (a no-op when it already does), so
both combinations give EAVSS summing to 1.

Degenerate sums **(choice, option `zero_sum`)**: when a vector to be normalized
sums to 0 (e.g. HSAV is 0 everywhere because the two groups have identical
variances, or nAVSS * HCS is 0 on every layer), `zero_sum="uniform"` (default)
puts 1/L on every layer, so that term stops favouring any layer while the
scores still sum to 1; `zero_sum="zeros"` keeps it all 0 (then sums are 0, not
1). Either way the result carries a warning naming the vector.

Sample counts: a group with fewer than `min_group` (default 20) samples gives
a warning (a score from 3 hallucinated samples is not a score), as does an
empty group. The scores are still computed.

Ranking: by EAVSS descending (most hallucination-prone first), ties broken by
the lower layer index. Inputs must be finite and non-negative (sparsity also
at most 1), otherwise `ValueError`; outputs are never NaN or inf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from app.layervalues import typed
from worker.scoring.agreement import Ranking
from worker.stage import LayerRow

__all__ = ["Combine", "EAVSSResult", "ZeroSum", "compute_eavss", "to_layer_rows"]

Combine = Literal["product", "weighted_sum"]
ZeroSum = Literal["uniform", "zeros"]


@dataclass
class EAVSSResult:
    """Per-layer lists (index = position in the input lists) and the options used."""

    hsav: list[float]
    hss: list[float]
    nhsav: list[float]
    nhss: list[float]
    hcs: list[float]
    navss: list[float]  # the nAVSS used (renormalized to sum 1)
    eavss: list[float]
    rank: list[int]  # per layer: 1 = most hallucination-prone
    ranking: list[int]  # layer positions, most hallucination-prone first
    n_correct: int
    n_hallucinated: int
    alpha: float
    beta: float
    combine: str
    zero_sum: str
    min_group: int
    warnings: list[str] = field(default_factory=list)

    def options(self) -> dict[str, Any]:
        """The choices behind these scores, for a result's summary."""
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "combine": self.combine,
            "zero_sum": self.zero_sum,
            "min_group": self.min_group,
            "n_correct": self.n_correct,
            "n_hallucinated": self.n_hallucinated,
        }


def _vector(
    name: str, values: Sequence[float], n_layers: int | None, upper: float | None = None
) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a list of numbers: {exc}") from None
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D list, got shape {x.shape}")
    if n_layers is not None and x.shape[0] != n_layers:
        raise ValueError(f"{name} has {x.shape[0]} layers, expected {n_layers}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf (layer {int(np.flatnonzero(~np.isfinite(x))[0])})")
    if (x < 0).any():
        raise ValueError(f"{name} must be >= 0 (layer {int(np.flatnonzero(x < 0)[0])})")
    if upper is not None and (x > upper).any():
        raise ValueError(f"{name} must be <= {upper} (layer {int(np.flatnonzero(x > upper)[0])})")
    return x


def _normalize(x: np.ndarray, name: str, zero_sum: ZeroSum, warnings: list[str]) -> np.ndarray:
    top = float(x.max()) if x.size else 0.0
    if top > 0.0:
        y = x / top  # scale first, so a huge total cannot overflow
        return y / y.sum()
    fill = "1/L on every layer" if zero_sum == "uniform" else "0 on every layer"
    warnings.append(f"{name} is 0 on every layer; n{name} set to {fill} (zero_sum={zero_sum!r})")
    if zero_sum == "uniform":
        return np.full_like(x, 1.0 / x.shape[0])
    return np.zeros_like(x)


def _check_arguments(
    combine: str, zero_sum: str, alpha: float, beta: float, n_hallucinated: int, n_correct: int, min_group: int
) -> None:
    if combine not in ("product", "weighted_sum"):
        raise ValueError(f"combine must be 'product' or 'weighted_sum', got {combine!r}")
    if zero_sum not in ("uniform", "zeros"):
        raise ValueError(f"zero_sum must be 'uniform' or 'zeros', got {zero_sum!r}")
    for name, w in (("alpha", alpha), ("beta", beta)):
        if not (np.isfinite(w) and 0.0 <= w <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {w!r}")
    for name, cnt in (("n_hallucinated", n_hallucinated), ("n_correct", n_correct), ("min_group", min_group)):
        if int(cnt) != cnt or cnt < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {cnt!r}")


def compute_eavss(
    var_hallucinated: Sequence[float],
    var_correct: Sequence[float],
    sparsity_hallucinated: Sequence[float],
    sparsity_correct: Sequence[float],
    navss: Sequence[float],
    *,
    n_hallucinated: int,
    n_correct: int,
    alpha: float = 0.5,
    beta: float = 0.5,
    combine: Combine = "product",
    zero_sum: ZeroSum = "uniform",
    min_group: int = 20,
) -> EAVSSResult:
    """Equations 9-12 for every layer (see module doc)."""
    _check_arguments(combine, zero_sum, alpha, beta, n_hallucinated, n_correct, min_group)

    vh = _vector("var_hallucinated", var_hallucinated, None)
    n_layers = vh.shape[0]
    vc = _vector("var_correct", var_correct, n_layers)
    sh = _vector("sparsity_hallucinated", sparsity_hallucinated, n_layers, upper=1.0)
    sc = _vector("sparsity_correct", sparsity_correct, n_layers, upper=1.0)
    na = _vector("navss", navss, n_layers)

    warnings: list[str] = []
    for group, cnt in (("hallucinated", int(n_hallucinated)), ("correct", int(n_correct))):
        if cnt == 0:
            warnings.append(f"no {group} samples: HSAV/HSS compare against an empty group and mean nothing")
        elif cnt < min_group:
            warnings.append(
                f"only {cnt} {group} samples (< min_group={min_group}): HSAV, HSS and EAVSS are unreliable"
            )

    hsav = np.abs(vh - vc)  # (9)
    hss = np.abs(sh - sc)  # (10)
    nhsav = _normalize(hsav, "HSAV", zero_sum, warnings)
    nhss = _normalize(hss, "HSS", zero_sum, warnings)
    hcs = alpha * nhsav + (1.0 - alpha) * nhss  # (11)
    nav = _normalize(na, "AVSS", zero_sum, warnings)
    if combine == "product":  # (12)
        prod = nav * hcs
        if prod.max() > 0.0:
            eavss = prod / prod.sum()
        else:
            uniform = zero_sum == "uniform"
            warnings.append(
                "nAVSS * HCS is 0 on every layer (no layer is both active and divergent); "
                f"EAVSS set to {'1/L' if uniform else '0'} on every layer (zero_sum={zero_sum!r})"
            )
            eavss = np.full_like(prod, 1.0 / n_layers) if uniform else np.zeros_like(prod)
    else:
        eavss = beta * nav + (1.0 - beta) * hcs

    order = Ranking.from_scores(eavss.tolist(), first="highest")  # ties: lower index first; NaN last
    ranking, rank = list(order.order), order.ranks()

    def out(x: np.ndarray) -> list[float]:
        return [float(v) for v in np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)]

    return EAVSSResult(
        hsav=out(hsav),
        hss=out(hss),
        nhsav=out(nhsav),
        nhss=out(nhss),
        hcs=out(hcs),
        navss=out(nav),
        eavss=out(eavss),
        rank=rank,
        ranking=ranking,
        n_correct=int(n_correct),
        n_hallucinated=int(n_hallucinated),
        alpha=float(alpha),
        beta=float(beta),
        combine=combine,
        zero_sum=zero_sum,
        min_group=int(min_group),
        warnings=warnings,
    )


def to_layer_rows(
    result: EAVSSResult,
    block_names: Sequence[str],
    layers: Sequence[int] | None = None,
) -> list[LayerRow]:
    """One `LayerRow` (scorer "eavss") per layer; `layers` defaults to 0..L-1."""
    n_layers = len(result.eavss)
    if len(block_names) != n_layers:
        raise ValueError(f"{len(block_names)} block names for {n_layers} layers")
    layer_ids = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if len(layer_ids) != n_layers:
        raise ValueError(f"{len(layer_ids)} layer indices for {n_layers} layers")
    rows = []
    for i in range(n_layers):
        values = {
            "hsav": result.hsav[i],
            "hss": result.hss[i],
            "nhsav": result.nhsav[i],
            "nhss": result.nhss[i],
            "hcs": result.hcs[i],
            "eavss": result.eavss[i],
            "rank": result.rank[i],
            "n_correct": result.n_correct,
            "n_hallucinated": result.n_hallucinated,
        }
        rows.append(
            LayerRow(
                layer=layer_ids[i],
                block_name=str(block_names[i]),
                scorer="eavss",
                values=typed(values),
            )
        )
    return rows
