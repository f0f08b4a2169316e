"""AVSS layer scores (docs/method.md section 2, paper section 2.1-2.3, equations 1-8).

Per layer l = 1..L of one capture site, from the profiler's streaming statistics:

- (1) `var_l`: population variance over every counted activation scalar
  (`variance_mode="elements"`, default) or the reference code's pooled variance
  (`"pooled"`: per example, mean over tokens, variance over hidden units; mean over
  examples). See `worker.profiler.stats` for the exact definitions.
- (2) `std_l = sqrt(var_l)`
- (3) `nvar_l = var_l / sum_k var_k`
- (4) `S_l = #(|a| < eps_l) / N_l`, `eps_l` absolute (`sparsity_eps`) or relative
  (`sparsity_rel_eps` x the layer's RMS or median |a|). Exact for thresholds the
  profiler counted (absolute ones during the pass; relative ones with `exact_sparsity`,
  a second pass), else read from the |a| histogram's fine window around the threshold
  with a stated bound on the error (`sparsity_bound` per layer, `RunningStats.sparsity_bounded`).
- (5) `nS_l = S_l / sum_k S_k`
- (6) `dS_l = |S_l - (1/L) sum_k S_k|`
- (7) `AVSS_l = nvar_l / max(nS_l, delta)`; when every S_l is 0 the score degrades to
  `nvar_l` (variance alone, same ranking as nvar/delta) and the result says so.
- (8) `nAVSS_l = AVSS_l / sum_k AVSS_k`; layers ranked ascending by AVSS (rank 1 = lowest
  score = first pruning candidate; ties by block order); `C_l` = sum of nAVSS_k over the
  layers with rank <= rank_l (cumulative impact in rank order, not layer order).

A normalization whose sum is 0 (or not finite) gives zeros. Every number handed to a
client goes through `finite_or_none`: never NaN or inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from app.layervalues import LayerValue, typed
from worker.profiler.profiler import Profile
from worker.profiler.stats import RunningStats
from worker.scoring.agreement import Ranking, pruning_order, ranks_from_order, spearman_rho
from worker.stage import ArtifactFile, JobFailed, LayerRow, MetricRow, StageResult, finite_or_none

if TYPE_CHECKING:
    from app.schemas import AvssOptions

VarianceMode = Literal["elements", "pooled"]
ThresholdMode = Literal["relative", "absolute"]
Reference = Literal["rms", "median"]

MASSIVE_RATIO = 100.0  # max|a| / median|a| above this flags a massive activation
NEAR_ZERO_SPARSITY = 1e-4  # every S_l below this: sparsity carries almost no signal
PROFILE_SPARSITY_EPS = 1e-5  # the reference code's absolute threshold, reported by the profile stage
PROFILE_SPARSITY_REL_EPS = 0.01

__all__ = [
    "AvssScores",
    "AvssStage",
    "avss_stage",
    "avss_scores",
    "compute_avss",
    "cumulative_impact",
    "layer_sparsity",
    "layer_variance",
    "massive_activation_layers",
    "normalize",
    "normalized_avss",
    "normalized_sparsity",
    "normalized_variance",
    "prune_count",
    "rank_ascending",
    "ranking",
    "run_avss_stage",
    "run_profile_stage",
    "sparsity_deviation",
    "sparsity_thresholds",
    "spearman",
    "standard_deviation",
]


# ------------------------------------------------------------ pure functions


def _arr(values: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def normalize(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """x_l / sum_k x_k; all zeros when the sum is 0 or not finite."""
    x = _arr(values)
    total = float(x.sum()) if x.size else 0.0
    if total == 0.0 or not math.isfinite(total):
        return np.zeros_like(x)
    return x / total


def layer_variance(stats: Sequence[RunningStats], mode: VarianceMode = "elements") -> np.ndarray:
    """Eq. 1 per layer: `elements` (every scalar) or `pooled` (the reference code's)."""
    if mode == "elements":
        return _arr([s.variance for s in stats])
    if mode == "pooled":
        return _arr([s.pooled_variance for s in stats])
    raise ValueError(f"unknown variance_mode {mode!r}")


def standard_deviation(variance: Sequence[float] | np.ndarray) -> np.ndarray:
    """Eq. 2."""
    return np.sqrt(np.maximum(_arr(variance), 0.0))


def normalized_variance(variance: Sequence[float] | np.ndarray) -> np.ndarray:
    """Eq. 3."""
    return normalize(variance)


def sparsity_thresholds(
    stats: Sequence[RunningStats],
    mode: ThresholdMode = "relative",
    eps: float = 1e-5,
    rel_eps: float = 0.01,
    reference: Reference = "rms",
) -> np.ndarray:
    """The |a| threshold eps_l of eq. 4 per layer."""
    if mode == "absolute":
        return np.full(len(stats), float(eps))
    if mode != "relative":
        raise ValueError(f"unknown sparsity_threshold {mode!r}")
    if reference == "rms":
        ref = _arr([s.rms for s in stats])
    elif reference == "median":
        ref = _arr([s.median_abs for s in stats])
    else:
        raise ValueError(f"unknown sparsity_reference {reference!r}")
    return float(rel_eps) * ref


def layer_sparsity(stats: Sequence[RunningStats], thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Eq. 4: share of activations with |a| < eps_l."""
    return _arr(
        [
            s.sparsity(float(t)) if math.isfinite(t) else math.nan
            for s, t in zip(stats, thresholds, strict=True)
        ]
    )


def layer_sparsity_bounds(stats: Sequence[RunningStats], thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per layer, the bound on the absolute error of `layer_sparsity` (0: an exact count)."""
    return _arr(
        [
            s.sparsity_bounded(float(t))[1] if math.isfinite(t) else math.nan
            for s, t in zip(stats, thresholds, strict=True)
        ]
    )


def sparsity_provenance(bounds: np.ndarray) -> dict[str, Any]:
    """How a set of stored sparsities was obtained: exact counts, or read off the histogram
    with at most `max_bound` absolute error."""
    finite = bounds[np.isfinite(bounds)]
    worst = float(finite.max()) if finite.size else 0.0
    return {"exact": worst == 0.0, "method": "exact" if worst == 0.0 else "histogram", "max_bound": worst}


def counted_thresholds(profile: Profile, options: AvssOptions | None, profile_stage: bool) -> dict[tuple[int, str], list[float]]:
    """Per hook, the relative thresholds the avss (main and leading-positions views) and
    profile stages will read off `profile`: what a second pass counts exactly."""
    wanted: dict[tuple[int, str], list[float]] = {key: [] for key in profile.stats}
    if options is not None and options.sparsity_threshold == "relative" and options.site in profile.sites:
        for stats in (profile.site_stats(options.site), profile.alternative_stats(options.site)):
            eps = sparsity_thresholds(stats, "relative", options.sparsity_eps, options.sparsity_rel_eps,
                                      options.sparsity_reference)
            for i, t in enumerate(eps):
                if math.isfinite(t) and t > 0:
                    wanted[(i, options.site)].append(float(t))
    if profile_stage:
        for key, s in profile.stats.items():
            if s.count:
                wanted[key].append(PROFILE_SPARSITY_REL_EPS * s.rms)
    return wanted


def normalized_sparsity(sparsity: Sequence[float] | np.ndarray) -> np.ndarray:
    """Eq. 5."""
    return normalize(sparsity)


def sparsity_deviation(sparsity: Sequence[float] | np.ndarray) -> np.ndarray:
    """Eq. 6: |S_l - mean_k S_k|."""
    s = _arr(sparsity)
    return np.abs(s - s.mean()) if s.size else s


def avss_scores(
    nvar: Sequence[float] | np.ndarray, nsparsity: Sequence[float] | np.ndarray, delta: float = 1e-6
) -> tuple[np.ndarray, bool]:
    """Eq. 7: nvar_l / max(nS_l, delta). Returns (scores, degraded); degraded (every nS_l
    is 0, i.e. no layer has any sparsity) gives nvar_l, the variance alone."""
    nv, ns = _arr(nvar), _arr(nsparsity)
    if ns.size and not np.any(ns > 0):
        return nv.copy(), True
    return nv / np.maximum(ns, float(delta)), False


def normalized_avss(avss: Sequence[float] | np.ndarray) -> np.ndarray:
    """Eq. 8, first half."""
    return normalize(avss)


def ranking(scores: Sequence[float] | np.ndarray) -> list[int]:
    """Layer positions sorted ascending by score (lowest first, ties by position; a
    non-finite score sorts last): `worker.scoring.agreement.pruning_order`."""
    return pruning_order(_arr(scores).tolist())


def rank_ascending(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Rank per layer, 1 = lowest score (first pruning candidate)."""
    return np.asarray(ranks_from_order(ranking(scores)), dtype=np.int64)


def cumulative_impact(navss: Sequence[float] | np.ndarray, ranks: Sequence[int] | np.ndarray) -> np.ndarray:
    """Eq. 8, second half: C_l = sum of nAVSS_k over layers with rank_k <= rank_l."""
    nv = _arr(navss)
    r = np.asarray(ranks, dtype=np.int64)
    order = np.argsort(r, kind="stable")
    out = np.empty_like(nv)
    out[order] = np.cumsum(nv[order])
    return out


def prune_count(n_layers: int, fraction: float) -> int:
    """floor(p x L), with a float guard so that e.g. 0.3 x 10 gives 3."""
    return max(0, min(n_layers, int(math.floor(fraction * n_layers + 1e-9))))


def massive_activation_layers(
    ratios: Sequence[float] | np.ndarray, limit: float = MASSIVE_RATIO
) -> list[int]:
    """Positions whose max|a| / median|a| exceeds `limit` (inf counts, NaN does not)."""
    r = _arr(ratios)
    return [int(i) for i in np.nonzero(np.nan_to_num(r, nan=0.0, posinf=np.inf) > limit)[0]]


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation of two score vectors, ties sharing their mean rank
    (`worker.scoring.agreement.spearman_rho`); NaN when undefined or a score is not finite."""
    x, y = _arr(a), _arr(b)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return math.nan
    rho = spearman_rho(x.tolist(), y.tolist())
    return math.nan if rho is None else rho


@dataclass
class AvssScores:
    """Equations 2-8 for L layers (arrays indexed by block position)."""

    variance: np.ndarray
    std: np.ndarray
    nvar: np.ndarray
    sparsity: np.ndarray
    nsparsity: np.ndarray
    sparsity_dev: np.ndarray
    avss: np.ndarray
    navss: np.ndarray
    rank: np.ndarray
    cumulative: np.ndarray
    ranking: list[int]
    degraded: bool  # every S_l is 0: AVSS is the normalized variance alone
    guarded: list[int] = field(default_factory=list)  # layers whose denominator is delta
    warnings: list[str] = field(default_factory=list)


def compute_avss(
    variance: Sequence[float] | np.ndarray, sparsity: Sequence[float] | np.ndarray, delta: float = 1e-6
) -> AvssScores:
    """All of equations 2-8 from per-layer variance and sparsity."""
    var = _arr(variance)
    s = _arr(sparsity)
    warnings: list[str] = []
    bad = [i for i in range(var.size) if not (math.isfinite(var[i]) and math.isfinite(s[i]))]
    if bad:
        warnings.append(
            f"layers {bad} have no finite variance or sparsity (no activations counted?); scored as 0"
        )
        var = np.where(np.isfinite(var), var, 0.0)
        s = np.where(np.isfinite(s), s, 0.0)
    nvar = normalized_variance(var)
    if var.size and not np.any(var > 0):
        warnings.append("every layer's variance is 0: AVSS is 0 everywhere and the ranking is block order")
    ns = normalized_sparsity(s)
    scores, degraded = avss_scores(nvar, ns, delta)
    guarded: list[int] = []
    if degraded:
        warnings.append(
            "every layer's sparsity is 0 at this threshold, so AVSS degrades to the normalized variance "
            "alone (ranking by variance); use a relative threshold (sparsity_threshold='relative') for a "
            "sparsity-aware score"
        )
    else:
        guarded = [int(i) for i in np.nonzero(ns < delta)[0]]
        if guarded:
            warnings.append(
                f"layers {guarded} have normalized sparsity below delta={delta:g}; their AVSS uses delta as "
                "denominator and ranks them as the most important"
            )
        if s.size and float(s.max()) < NEAR_ZERO_SPARSITY:
            warnings.append(
                f"every layer's sparsity is below {NEAR_ZERO_SPARSITY:g}: the normalized sparsity rests on very few "
                "near-zero activations and the AVSS ranking is fragile; a relative threshold is more robust"
            )
    navss = normalized_avss(scores)
    ranks = rank_ascending(scores)
    return AvssScores(
        variance=var,
        std=standard_deviation(var),
        nvar=nvar,
        sparsity=s,
        nsparsity=ns,
        sparsity_dev=sparsity_deviation(s),
        avss=scores,
        navss=navss,
        rank=ranks,
        cumulative=cumulative_impact(navss, ranks),
        ranking=ranking(scores),
        degraded=degraded,
        guarded=guarded,
        warnings=warnings,
    )


# --------------------------------------------------------------------- stages


def _score_stats(
    stats: Sequence[RunningStats], options: AvssOptions, variance_mode: VarianceMode
) -> tuple[AvssScores, np.ndarray]:
    thresholds = sparsity_thresholds(
        stats, options.sparsity_threshold, options.sparsity_eps, options.sparsity_rel_eps,
        options.sparsity_reference,
    )
    variance = layer_variance(stats, variance_mode)
    return compute_avss(variance, layer_sparsity(stats, thresholds), options.delta), thresholds


def _names(profile: Profile, positions: Sequence[int]) -> list[int]:
    return [profile.layer_indices[i] for i in positions]


@dataclass
class AvssStage:
    """What the avss stage computed: the stored result and, for later stages, the ranking
    (layer indices, lowest AVSS first, with the nAVSS per layer as its scores)."""

    result: StageResult
    scores: AvssScores
    ranking: Ranking


@dataclass
class _LeadingPositions:
    """The same score with the leading token positions toggled (`Profile.alternative_stats`)."""

    scores: AvssScores
    available: bool
    rho: float
    prune: list[int]
    sparsity: dict[str, Any]  # sparsity_provenance of this view's sparsities


def _check_profile(profile: Profile, site: str) -> None:
    if site not in profile.sites:
        raise JobFailed("site_not_profiled", f"AVSS needs the {site!r} capture site, which was not profiled")
    if profile.n_tokens == 0:
        raise JobFailed(
            "no_tokens",
            "no token was counted by the profiler (empty examples, or skip_positions past every example's "
            "end); use longer texts or a smaller skip_positions",
        )


def _leading_positions(profile: Profile, options: AvssOptions, scores: AvssScores, k: int) -> _LeadingPositions:
    # Variance by elements: the per-example pooled variance cannot be split by position.
    alt_stats = profile.alternative_stats(options.site)
    alt_scores, alt_eps = _score_stats(alt_stats, options, "elements")
    available = all(s.count > 0 for s in alt_stats)
    rho = spearman(scores.avss, alt_scores.avss) if available else math.nan
    bounds = layer_sparsity_bounds(alt_stats, alt_eps) if available else np.zeros(0)
    prune = sorted(alt_scores.ranking[:k]) if available else []
    return _LeadingPositions(alt_scores, available, rho, prune, sparsity_provenance(bounds))


def _massive_warning(profile: Profile, massive: list[int], alt: _LeadingPositions) -> str:
    where = "included" if profile.skip_positions == 0 else f"skipped (skip_positions={profile.skip_positions})"
    alt_ranking = _names(profile, alt.scores.ranking) if alt.available else "n/a"
    return (
        f"avss: massive activations (max|a| / median|a| > {MASSIVE_RATIO:g}) in layers "
        f"{_names(profile, massive)}; leading positions are {where} here. With skip_positions="
        f"{profile.alternative_skip} the ranking is {alt_ranking}"
        f" (Spearman {alt.rho:.3f} with this one) and the prune proposal {_names(profile, alt.prune)}; "
        "a threshold relative to the median |a| (sparsity_reference='median') is robust to such outliers"
    )


def _avss_rows(
    profile: Profile, stats: Sequence[RunningStats], scores: AvssScores, eps: np.ndarray,
    prune: set[int], ratios: np.ndarray, massive: list[int], alt: _LeadingPositions,
) -> list[LayerRow]:
    rows: list[LayerRow] = []
    bounds = layer_sparsity_bounds(stats, eps)
    for i, s in enumerate(stats):
        values: dict[str, LayerValue] = {
            "variance": scores.variance[i],
            "std": scores.std[i],
            "nvar": scores.nvar[i],
            "sparsity": scores.sparsity[i],
            "nsparsity": scores.nsparsity[i],
            "sparsity_dev": scores.sparsity_dev[i],
            "sparsity_threshold": eps[i],
            "sparsity_bound": bounds[i],
            "avss": scores.avss[i],
            "navss": scores.navss[i],
            "cumulative": scores.cumulative[i],
            "rank": int(scores.rank[i]),
            "prune": i in prune,
            "variance_elements": s.variance,
            "variance_pooled": s.pooled_variance,
            "mean": s.mean if s.count else math.nan,
            "rms": s.rms,
            "l1": s.l1_norm,
            "l2": s.l2_norm,
            "frobenius": s.frobenius_norm,
            "max_abs": s.max_abs,
            "median_abs": s.median_abs,
            "max_median_ratio": ratios[i],
            "massive": i in massive,
            "count": int(s.count),
            "tokens": int(s.tokens),
            "avss_alt": alt.scores.avss[i] if alt.available else math.nan,
            "rank_alt": int(alt.scores.rank[i]) if alt.available else None,
        }
        rows.append(LayerRow(
            layer=profile.layer_indices[i], block_name=profile.block_names[i], scorer="avss",
            values=typed(values),
        ))
    return rows


def _threshold_info(options: AvssOptions, profile: Profile) -> dict[str, Any]:
    if options.sparsity_threshold == "absolute":
        eps = float(options.sparsity_eps)
        return {"mode": "absolute", "value": eps}
    return {"mode": "relative", "value": float(options.sparsity_rel_eps), "reference": options.sparsity_reference}


def _avss_summary(
    profile: Profile, options: AvssOptions, scores: AvssScores, prune: list[int], massive: list[int],
    alt: _LeadingPositions,
) -> dict[str, Any]:
    return {
        "site": options.site,
        "ranking": _names(profile, scores.ranking),
        "ranking_order": "ascending AVSS: first = least important = first pruning candidate",
        "prune_layers": _names(profile, prune),
        "prune_fraction": float(options.prune_fraction),
        "threshold": _threshold_info(options, profile),
        "variance_mode": options.variance_mode,
        "delta": float(options.delta),
        "degraded_to_variance": scores.degraded,
        "guarded_layers": _names(profile, scores.guarded),
        "skip_positions": profile.skip_positions,
        "massive_activation_layers": _names(profile, massive),
        "leading_positions": {
            "skip_positions": profile.alternative_skip,
            "variance_mode": "elements",
            "ranking": _names(profile, alt.scores.ranking) if alt.available else None,
            "prune_layers": _names(profile, alt.prune) if alt.available else None,
            "spearman": finite_or_none(alt.rho),
            "sparsity": alt.sparsity,
        },
        "n_examples": profile.n_profiled_examples,
        "n_tokens": profile.n_tokens,
        "answer_only": profile.answer_only,
    }


def _avss_metrics(profile: Profile, scores: AvssScores, k: int, massive: list[int], rho: float) -> list[MetricRow]:
    n = len(scores.avss)
    return [
        MetricRow("avss", "layers", float(n), n=n),
        MetricRow("avss", "prune_count", float(k), n=n),
        MetricRow("avss", "zero_sparsity_layers", float(int(np.sum(scores.sparsity == 0))), n=n),
        MetricRow("avss", "mean_sparsity", finite_or_none(float(np.mean(scores.sparsity))), n=n),
        MetricRow("avss", "massive_activation_layers", float(len(massive)), n=n),
        MetricRow("avss", "rank_correlation_leading_positions", finite_or_none(rho), n=n),
        MetricRow("avss", "tokens", float(profile.n_tokens), n=profile.n_profiled_examples),
    ]


def _avss_plots(
    profile: Profile, stats: Sequence[RunningStats], options: AvssOptions, scores: AvssScores, prune: list[int]
) -> list[ArtifactFile]:
    from worker.plots import avss_figure

    label = _threshold_label(_threshold_info(options, profile))
    return avss_figure(
        layers=profile.layer_indices,
        variance=list(scores.variance),
        l1=[s.l1_norm for s in stats],
        l2=[s.l2_norm for s in stats],
        frobenius=[s.frobenius_norm for s in stats],
        sparsity=list(scores.sparsity),
        avss=list(scores.avss),
        prune=_names(profile, prune),
        title=f"AVSS per layer - {options.site}, variance: {options.variance_mode}, threshold: {label}",
        basename="avss_layers",
    )


def avss_stage(profile: Profile, options: AvssOptions) -> AvssStage:
    """AVSS per layer on `options.site` (see `run_avss_stage`), with the typed ranking."""
    _check_profile(profile, options.site)
    stats = profile.site_stats(options.site)
    scores, eps = _score_stats(stats, options, options.variance_mode)
    k = prune_count(len(stats), float(options.prune_fraction))
    prune = sorted(scores.ranking[:k])
    ratios = np.asarray([s.max_median_ratio for s in stats], dtype=np.float64)
    massive = massive_activation_layers(ratios)
    alt = _leading_positions(profile, options, scores, k)
    warnings = [f"avss: {w}" for w in scores.warnings]
    if massive:
        warnings.append(_massive_warning(profile, massive, alt))
    result = StageResult(
        stage="avss",
        layers=_avss_rows(profile, stats, scores, eps, set(prune), ratios, massive, alt),
        metrics=_avss_metrics(profile, scores, k, massive, alt.rho),
        summary=_avss_summary(profile, options, scores, prune, massive, alt),
        warnings=warnings + [f"profile: {w}" for w in profile.warnings],
    )
    result.summary["threshold"].update(sparsity_provenance(layer_sparsity_bounds(stats, eps)))
    if options.plots:
        result.artifacts.extend(_avss_plots(profile, stats, options, scores, prune))
    ranking = Ranking(tuple(_names(profile, scores.ranking)), "lowest", tuple(float(v) for v in scores.navss))
    return AvssStage(result, scores, ranking)


def run_avss_stage(profile: Profile, options: AvssOptions) -> StageResult:
    """AVSS per layer on `options.site` (an `app.schemas.AvssOptions`).

    One LayerRow per block (scorer "avss"), metrics under scope "avss", a summary with
    the ranking (layer indices ascending by AVSS: first = first pruning candidate), the
    proposed `prune_layers` (the floor(prune_fraction x L) lowest-ranked), the threshold
    and variance definitions used, and the same ranking with the leading token positions
    toggled (`leading_positions`), which matters when massive activations sit there.
    """
    return avss_stage(profile, options).result


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _threshold_label(threshold: dict[str, Any]) -> str:
    if threshold["mode"] == "absolute":
        return f"|a| < {threshold['value']:g}"
    return f"|a| < {threshold['value']:g} x {threshold['reference']}"


PROFILE_KEYS = (
    "count",
    "tokens",
    "examples",
    "mean",
    "variance",
    "std",
    "pooled_variance",
    "rms",
    "mean_abs",
    "max_abs",
    "median_abs",
    "max_median_ratio",
    "underflow_fraction",
    "l1",
    "l2",
    "frobenius",
)


def run_profile_stage(profile: Profile) -> StageResult:
    """The raw statistics: one LayerRow per block (scorer "profile"), values keyed
    "<site>.<statistic>" for every profiled site, plus "<site>.sparsity_eps" (|a| < 1e-5,
    the reference threshold) and "<site>.sparsity_rel" (|a| < 0.01 x RMS), each with
    "<site>.sparsity_eps_bound" / "<site>.sparsity_rel_bound", the bound on its absolute
    error (0: an exact count). The whole profile (histograms and fine windows included)
    is attached as `profile.json`."""
    import json

    rows: list[LayerRow] = []
    bounds: dict[str, list[float]] = {}
    for i in range(profile.n_layers):
        values: dict[str, LayerValue] = {}
        for site in profile.sites:
            s = profile.stats[(i, site)]
            stat = s.summary()
            for key in PROFILE_KEYS:
                values[f"{site}.{key}"] = finite_or_none(stat[key])
            for name, t in (("sparsity_eps", PROFILE_SPARSITY_EPS), ("sparsity_rel", PROFILE_SPARSITY_REL_EPS * s.rms)):
                value, bound = s.sparsity_bounded(t)
                values[f"{site}.{name}"] = finite_or_none(value)
                values[f"{site}.{name}_bound"] = finite_or_none(bound)
                bounds.setdefault(name, []).append(bound)
        rows.append(LayerRow(profile.layer_indices[i], profile.block_names[i], "profile", typed(values)))

    massive: dict[str, list[int]] = {}
    for site in profile.sites:
        ratios = [s.max_median_ratio for s in profile.site_stats(site)]
        massive[site] = _names(profile, massive_activation_layers(ratios))
    warnings = [f"profile: {w}" for w in profile.warnings]
    for site, layers in massive.items():
        if layers:
            warnings.append(
                f"profile: massive activations (max|a| / median|a| > {MASSIVE_RATIO:g}) at {site} in layers {layers}"
            )
    summary: dict[str, Any] = {
        "sites": list(profile.sites),
        "n_examples": profile.n_examples,
        "n_profiled_examples": profile.n_profiled_examples,
        "n_tokens": profile.n_tokens,
        "n_batches": profile.n_batches,
        "skip_positions": profile.skip_positions,
        "answer_only": profile.answer_only,
        "histogram": {
            "bins": profile.spec.bins,
            "per_octave": profile.spec.per_octave,
            "lo": profile.spec.lo,
            "hi": profile.spec.hi,
        },
        "sparsity_eps": PROFILE_SPARSITY_EPS,
        "sparsity_rel_eps": PROFILE_SPARSITY_REL_EPS,
        "sparsity": {name: sparsity_provenance(_arr(b)) for name, b in bounds.items()},
        "massive_activation_layers": massive,
    }
    metrics = [
        MetricRow("profile", "tokens", float(profile.n_tokens), n=profile.n_profiled_examples),
        MetricRow("profile", "examples", float(profile.n_profiled_examples), n=profile.n_examples),
        MetricRow("profile", "batches", float(profile.n_batches)),
    ]
    result = StageResult(stage="profile", layers=rows, metrics=metrics, summary=summary, warnings=warnings)
    result.artifacts.append(
        ArtifactFile(
            "profile.json",
            "application/json",
            json.dumps(_json_safe(profile.to_dict()), allow_nan=False).encode(),
        )
    )
    return result
