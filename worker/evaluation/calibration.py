"""Calibration and detection metrics, as LitCab defines them (docs/method.md section 5).

Inputs everywhere: `confidence[N]` in [0, 1] (a detector's confidence that each
answer is correct) and `correct[N]` of 0/1 (or bools). Confidences that are NaN,
infinite or outside [0, 1] raise `ValueError`; so do labels other than 0/1 and
arrays of different lengths.

Definitions (LitCab, github.com/launchnlp/LitCab `evaluate/`):

- Ordering: answers are sorted by (confidence, correct) ascending, so among
  equal confidences the correct answers sit on the confident side. The "top k"
  are the last k of that order.
- `acc@q` (`acc_at`): mean correctness of the top k = floor(N * q) answers
  (floor evaluated in float64, like LitCab's `int(len * q)`).
  **k == 0** (N * q < 1, or N == 0): returns None. (LitCab's slice
  `values[-0:]` would silently take *all* answers, i.e. the plain accuracy; we
  report "undefined" instead.)
- `cov@p` (`cov_at`): for k = 1..N-1 (never k = N, as LitCab's loop), A(k) =
  accuracy of the top k; the largest k / N with A(k) strictly greater than p,
  else 0.0. So with every answer correct cov@p = (N - 1) / N, and N = 1 gives
  0.0. N == 0 gives None.
- `brier`: mean (confidence - correct)^2 on the raw confidence.
- `auroc`: ROC AUC of confidence against correctness (correct = positive), the
  Mann-Whitney statistic with tied confidences given their average rank (a tie
  between a correct and a wrong answer counts one half). None when only one
  class is present.
- `ece`: standard ECE: 10 equal-width bins [k/10, (k+1)/10), the last one
  closed [0.9, 1.0] so confidence 1.0 falls in it; sum over bins of
  (bin share) * |bin accuracy - bin mean confidence|.
- `ece_litcab`: LitCab's variant: confidences min-max rescaled over the
  evaluated set, bin index floor(c / 0.1) evaluated in float64 exactly as
  LitCab's `int(score / bin_size)` (so the maximum, c = 1.0, gets an 11th bin
  of its own, and a rescaled value that is exactly 0.3, 0.6 or 0.7 lands in the
  bin below because 0.3 / 0.1 < 3 in floating point); each bin's accuracy is
  compared with the bin's MIDPOINT (LitCab's edges 0, 0.1, ..., 1.0 built by
  repeated addition; the 11th bin's midpoint is 1.0), weighted by bin share.
  **All confidences equal** (max == min, where LitCab divides by zero):
  returns None (undefined), and a bootstrap resample in that state is left out.
- `accuracy`: mean correctness.

Undefined values are None from the public functions (NaN internally).
`calibration_report` adds a bootstrap 95% percentile interval (see
`worker.evaluation.bootstrap`) and N to each metric; `to_metric_rows` turns it
into `MetricRow`s.

Every metric is implemented once, on a (B, N) block of resamples, so the point
estimate and its bootstrap use the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from worker.evaluation.bootstrap import bootstrap_cis, paired_bootstrap_ci
from worker.stage import MetricRow, finite_or_none

__all__ = [
    "MetricEstimate",
    "accuracy",
    "acc_at",
    "auroc",
    "auroc_difference",
    "brier",
    "calibration_report",
    "cov_at",
    "ece",
    "ece_litcab",
    "metric_name",
    "to_metric_rows",
    "validate_inputs",
]


class MetricEstimate(NamedTuple):
    """One metric of a report: value, bootstrap interval and number of answers."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


# --------------------------------------------------------------------------- validation


def validate_inputs(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert to float64 1-D arrays; raise ValueError with a clear message."""
    try:
        conf = np.asarray(confidence, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"confidence must be numbers: {exc}") from None
    try:
        corr = np.asarray(correct, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"correct must be 0/1 labels: {exc}") from None
    if conf.ndim != 1 or corr.ndim != 1:
        raise ValueError(f"confidence and correct must be 1-D, got shapes {conf.shape} and {corr.shape}")
    if conf.shape[0] != corr.shape[0]:
        raise ValueError(f"confidence and correct differ in length: {conf.shape[0]} vs {corr.shape[0]}")
    bad = ~np.isfinite(conf)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"confidence must be finite: {int(bad.sum())} value(s) are NaN/inf (first at index {i})"
        )
    out = (conf < 0.0) | (conf > 1.0)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise ValueError(
            f"confidence must lie in [0, 1]: {int(out.sum())} value(s) outside "
            f"(first at index {i}: {conf[i]!r})"
        )
    notbin = ~((corr == 0.0) | (corr == 1.0))
    if notbin.any():
        i = int(np.flatnonzero(notbin)[0])
        raise ValueError(f"correct must be 0/1, got {corr[i]!r} at index {i}")
    return conf, corr


def _check_fraction(name: str, x: float, *, allow_zero: bool) -> float:
    x = float(x)
    lo_ok = x >= 0.0 if allow_zero else x > 0.0
    if not (math.isfinite(x) and lo_ok and x <= 1.0):
        rng = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {rng}, got {x!r}")
    return x


# --------------------------------------------------------------------------- batched kernels
# Each takes (B, N) float64 arrays and returns (B,) float64, NaN where undefined.


def _take_rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`np.take_along_axis(a, idx, axis=1)` for 2-D arrays, via one flat gather (faster)."""
    b, n = a.shape
    return a.ravel()[(idx + (np.arange(b) * n)[:, None]).ravel()].reshape(b, n)


TieSorted = tuple[np.ndarray, np.ndarray, np.ndarray]


def _tie_sorted(conf: np.ndarray, corr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort each row by confidence; return (correct, lo, hi) in that order, where
    [lo, hi] are the positions of each element's tie group (equal confidence) and,
    inside every tie group, the correct answers are moved to the confident end:
    the correctness sequence of LitCab's (confidence, correct) ascending sort."""
    b, n = corr.shape
    order = np.argsort(conf, axis=1)  # tie order is fixed up below
    xs = _take_rows(conf, order)
    ys = _take_rows(corr, order)
    pos = np.arange(n)
    first = np.ones((b, n), dtype=bool)  # a tie group starts here
    first[:, 1:] = xs[:, 1:] != xs[:, :-1]
    last = np.ones((b, n), dtype=bool)  # a tie group ends here
    last[:, :-1] = first[:, 1:]
    lo = np.maximum.accumulate(np.where(first, pos, 0), axis=1)
    hi = np.minimum.accumulate(np.where(last, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
    cs = np.cumsum(ys, axis=1)
    before = _take_rows(cs, lo) - _take_rows(ys, lo)
    ones = _take_rows(cs, hi) - before  # correct answers in the tie group
    return (pos > hi - ones).astype(np.float64), lo, hi


def _b_accuracy(conf: np.ndarray, corr: np.ndarray) -> np.ndarray:
    if corr.shape[1] == 0:
        return np.full(corr.shape[0], np.nan)
    return corr.mean(axis=1)


def _b_brier(conf: np.ndarray, corr: np.ndarray) -> np.ndarray:
    if corr.shape[1] == 0:
        return np.full(corr.shape[0], np.nan)
    return ((conf - corr) ** 2).mean(axis=1)


def _b_acc_at(conf: np.ndarray, corr: np.ndarray, q: float, ts: TieSorted | None = None) -> np.ndarray:
    n = corr.shape[1]
    k = int(n * q)  # LitCab: int(len(values) * q)
    if k == 0:
        return np.full(corr.shape[0], np.nan)
    ys = (ts or _tie_sorted(conf, corr))[0]
    return ys[:, n - k :].mean(axis=1)


def _b_cov_at(conf: np.ndarray, corr: np.ndarray, p: float, ts: TieSorted | None = None) -> np.ndarray:
    b, n = corr.shape
    if n == 0:
        return np.full(b, np.nan)
    if n == 1:
        return np.zeros(b)
    ys = (ts or _tie_sorted(conf, corr))[0][:, ::-1]  # most confident first
    ks = np.arange(1, n, dtype=np.float64)  # k = 1..N-1
    acc_k = np.cumsum(ys[:, : n - 1], axis=1) / ks  # same float division as LitCab
    above = acc_k > p
    any_above = above.any(axis=1)
    last = (n - 2) - np.argmax(above[:, ::-1], axis=1)  # index of the largest qualifying k
    return np.where(any_above, (last + 1) / n, 0.0)


def _per_bin(idx: np.ndarray, weights: np.ndarray | None, nbins: int) -> np.ndarray:
    b = idx.shape[0]
    flat = (idx + nbins * np.arange(b)[:, None]).ravel()
    w = None if weights is None else weights.ravel()
    return np.bincount(flat, weights=w, minlength=b * nbins).reshape(b, nbins)


_ECE_EDGES = np.arange(11, dtype=np.float64) / 10.0  # exact k/10 floats


def _b_ece(conf: np.ndarray, corr: np.ndarray) -> np.ndarray:
    n = corr.shape[1]
    if n == 0:
        return np.full(corr.shape[0], np.nan)
    idx = np.clip(np.searchsorted(_ECE_EDGES, conf, side="right") - 1, 0, 9)
    sum_y = _per_bin(idx, corr, 10)
    sum_c = _per_bin(idx, conf, 10)
    # share * |acc - mean conf| = (n_b / N) * |sum_y / n_b - sum_c / n_b|
    return np.abs(sum_y - sum_c).sum(axis=1) / n


def _litcab_edges() -> np.ndarray:
    edges = [0.0]
    while edges[-1] < 1.0:  # LitCab's construction, float accumulation included
        edges.append(edges[-1] + 0.1)
    edges[-1] = 1.0
    return np.asarray(edges)


_LITCAB_EDGES = _litcab_edges()  # 12 edges -> 11 bins, the last one [~1.0, 1.0]
_LITCAB_MID = (_LITCAB_EDGES[:-1] + _LITCAB_EDGES[1:]) / 2.0
_LITCAB_NBINS = _LITCAB_MID.shape[0]


def _b_ece_litcab(conf: np.ndarray, corr: np.ndarray) -> np.ndarray:
    b, n = corr.shape
    if n == 0:
        return np.full(b, np.nan)
    lo = conf.min(axis=1, keepdims=True)
    span = conf.max(axis=1, keepdims=True) - lo
    degenerate = span[:, 0] <= 0.0
    safe = np.where(span > 0.0, span, 1.0)
    scaled = (conf - lo) / safe
    idx = np.clip(np.floor(scaled / 0.1).astype(np.int64), 0, _LITCAB_NBINS - 1)
    sum_y = _per_bin(idx, corr, _LITCAB_NBINS)
    count = _per_bin(idx, None, _LITCAB_NBINS)
    # share * |acc - mid| = |sum_y - mid * n_b| / N
    out = np.abs(sum_y - _LITCAB_MID[None, :] * count).sum(axis=1) / n
    return np.where(degenerate, np.nan, out)


def _b_auroc(conf: np.ndarray, corr: np.ndarray, ts: TieSorted | None = None) -> np.ndarray:
    b, n = corr.shape
    if n == 0:
        return np.full(b, np.nan)
    ys, lo, hi = ts or _tie_sorted(conf, corr)
    ranks = (lo + hi) / 2.0 + 1.0  # average of the 1-based ranks lo+1..hi+1 of a tie group
    n1 = ys.sum(axis=1)
    n0 = n - n1
    r1 = (ranks * ys).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (r1 - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auc, np.nan)


def _point(kernel: Callable[..., np.ndarray], conf: np.ndarray, corr: np.ndarray) -> float | None:
    return finite_or_none(kernel(conf[None, :], corr[None, :])[0])


# --------------------------------------------------------------------------- public metrics


def accuracy(confidence: Any, correct: Any) -> float | None:
    """Mean correctness (None for no answers)."""
    return _point(_b_accuracy, *validate_inputs(confidence, correct))


def brier(confidence: Any, correct: Any) -> float | None:
    """Mean squared error of the raw confidence against 0/1 correctness."""
    return _point(_b_brier, *validate_inputs(confidence, correct))


def acc_at(confidence: Any, correct: Any, q: float = 0.5) -> float | None:
    """LitCab acc@q: accuracy of the top floor(N*q) answers; None when that is 0 answers."""
    q = _check_fraction("q", q, allow_zero=False)
    conf, corr = validate_inputs(confidence, correct)
    return _point(lambda c, y: _b_acc_at(c, y, q), conf, corr)


def cov_at(confidence: Any, correct: Any, p: float = 0.5) -> float | None:
    """LitCab cov@p: largest k/N (k = 1..N-1) whose top-k accuracy is > p, else 0."""
    p = _check_fraction("p", p, allow_zero=True)
    conf, corr = validate_inputs(confidence, correct)
    return _point(lambda c, y: _b_cov_at(c, y, p), conf, corr)


def auroc(confidence: Any, correct: Any) -> float | None:
    """ROC AUC (Mann-Whitney, ties averaged); None when only one class is present."""
    return _point(_b_auroc, *validate_inputs(confidence, correct))


def ece(confidence: Any, correct: Any) -> float | None:
    """Standard ECE, 10 equal-width bins on the raw confidence (1.0 in the last bin)."""
    return _point(_b_ece, *validate_inputs(confidence, correct))


def ece_litcab(confidence: Any, correct: Any) -> float | None:
    """LitCab's ECE (min-max rescale, 11 bins, midpoints); None when all confidences are equal."""
    return _point(_b_ece_litcab, *validate_inputs(confidence, correct))


# --------------------------------------------------------------------------- report


def metric_name(prefix: str, x: float) -> str:
    """`acc@50` for q = 0.5; percentages are rounded (0.29 -> 29, not int()'s 28); 0.125 -> 12.5."""
    pct = round(float(x) * 100.0, 6)
    if pct == int(pct):
        return f"{prefix}@{int(pct)}"
    return f"{prefix}@{pct:g}"


def calibration_report(
    confidence: Any,
    correct: Any,
    *,
    p_values: Iterable[float] = (0.5,),
    q_values: Iterable[float] = (0.5,),
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, MetricEstimate]:
    """Every metric with its bootstrap (1 - alpha) percentile interval and N.

    Keys: `acc@<q%>` for each q, `cov@<p%>` for each p, `ece`, `ece_litcab`,
    `brier`, `auroc`, `accuracy`. Each value is a `MetricEstimate`
    (value, ci_low, ci_high, n); undefined values and intervals are None.
    All metrics use the same resamples (same seed), so their intervals are paired.
    """
    conf, corr = validate_inputs(confidence, correct)
    qs = [_check_fraction("q", q, allow_zero=False) for q in q_values]
    ps = [_check_fraction("p", p, allow_zero=True) for p in p_values]
    names = [metric_name("acc", q) for q in qs] + [metric_name("cov", p) for p in ps]
    names += ["ece", "ece_litcab", "brier", "auroc", "accuracy"]

    def all_metrics(c: np.ndarray, y: np.ndarray) -> np.ndarray:
        ts = _tie_sorted(c, y) if c.shape[1] else None  # one sort shared by acc@, cov@, auroc
        cols = [_b_acc_at(c, y, q, ts) for q in qs] + [_b_cov_at(c, y, p, ts) for p in ps]
        cols += [_b_ece(c, y), _b_ece_litcab(c, y), _b_brier(c, y), _b_auroc(c, y, ts), _b_accuracy(c, y)]
        return np.stack(cols, axis=1)

    point = all_metrics(conf[None, :], corr[None, :])[0]
    cis = bootstrap_cis(all_metrics, conf, corr, n_boot=n_boot, seed=seed, alpha=alpha)
    n = int(conf.shape[0])
    return {
        name: MetricEstimate(finite_or_none(v), ci.low, ci.high, n)
        for name, v, ci in zip(names, point, cis, strict=True)
    }


def auroc_difference(
    confidence_a: Any, confidence_b: Any, correct: Any, *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> MetricEstimate:
    """AUROC(a) - AUROC(b) of two detectors on the same answers, with a paired bootstrap
    (1 - alpha) interval (both resampled with the same indices, `paired_bootstrap_ci`)."""
    a, y = validate_inputs(confidence_a, correct)
    b, _ = validate_inputs(confidence_b, correct)
    if a.shape != b.shape:
        raise ValueError(f"{a.shape[0]} and {b.shape[0]} confidences for one set of answers")
    pa, pb = auroc(a, y), auroc(b, y)
    point = None if pa is None or pb is None else pa - pb
    if n_boot <= 0 or point is None:
        return MetricEstimate(point, None, None, int(a.shape[0]))
    ci = paired_bootstrap_ci(lambda xa, xb: _b_auroc(xa[0], xa[1]) - _b_auroc(xb[0], xb[1]), [a, y], [b, y],
                             n_boot=n_boot, seed=seed, alpha=alpha)
    return MetricEstimate(point, ci.low, ci.high, int(a.shape[0]))


def to_metric_rows(report: Mapping[str, Any], scope: str) -> list[MetricRow]:
    """One `MetricRow` per metric; NaN/inf become None."""
    rows: list[MetricRow] = []
    for name, est in report.items():
        value, low, high, n = est
        rows.append(
            MetricRow(
                scope=scope,
                name=name,
                value=finite_or_none(value),
                ci_low=finite_or_none(low),
                ci_high=finite_or_none(high),
                n=None if n is None else int(n),
            )
        )
    return rows
