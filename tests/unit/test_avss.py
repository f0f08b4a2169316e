"""AVSS equations 1-8 against hand-computed values, and the AVSS / profile stages."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from app.layervalues import kind
from app.schemas import AvssOptions, ProfileOptions
from tests.unit.test_profiler_fixtures import TEXTS, Loaded
from tests.unit.test_profiler_fixtures import loaded as loaded  # noqa: F401  (fixture)
from worker.profiler import RunningStats, profile
from worker.scoring.avss import (
    avss_scores,
    compute_avss,
    cumulative_impact,
    layer_sparsity,
    layer_variance,
    massive_activation_layers,
    normalize,
    normalized_avss,
    normalized_sparsity,
    normalized_variance,
    prune_count,
    rank_ascending,
    ranking,
    run_avss_stage,
    run_profile_stage,
    sparsity_deviation,
    sparsity_thresholds,
    spearman,
    standard_deviation,
)
from worker.stage import JobContext, JobFailed

VAR = [2.0, 1.0, 4.0, 3.0]
SPARSITY = [0.5, 0.25, 0.125, 0.125]


def test_equations_by_hand() -> None:
    assert np.allclose(standard_deviation(VAR), [math.sqrt(2), 1, 2, math.sqrt(3)])  # (2)
    assert np.allclose(normalized_variance(VAR), [0.2, 0.1, 0.4, 0.3])  # (3): sum 10
    assert np.allclose(normalized_sparsity(SPARSITY), SPARSITY)  # (5): sum 1
    assert np.allclose(sparsity_deviation(SPARSITY), [0.25, 0.0, 0.125, 0.125])  # (6): mean 0.25
    scores, degraded = avss_scores([0.2, 0.1, 0.4, 0.3], SPARSITY, delta=1e-6)  # (7)
    assert not degraded and np.allclose(scores, [0.4, 0.4, 3.2, 2.4])
    assert np.allclose(normalized_avss(scores), [0.0625, 0.0625, 0.5, 0.375])  # (8): sum 6.4
    # ranks ascending, ties by block order: layer 0, 1, 3, 2
    assert ranking(scores) == [0, 1, 3, 2]
    assert list(rank_ascending(scores)) == [1, 2, 4, 3]
    # cumulative impact in RANK order: 0.0625, 0.125, then layer 3 (0.5), then layer 2 (1.0)
    assert np.allclose(
        cumulative_impact(normalized_avss(scores), rank_ascending(scores)), [0.0625, 0.125, 1.0, 0.5]
    )


def test_compute_avss_bundles_everything() -> None:
    r = compute_avss(VAR, SPARSITY, delta=1e-6)
    assert np.allclose(r.avss, [0.4, 0.4, 3.2, 2.4]) and np.allclose(r.cumulative, [0.0625, 0.125, 1.0, 0.5])
    assert r.ranking == [0, 1, 3, 2] and list(r.rank) == [1, 2, 4, 3] and not r.degraded and not r.warnings
    assert np.allclose(r.std, standard_deviation(VAR)) and np.allclose(
        r.sparsity_dev, [0.25, 0, 0.125, 0.125]
    )
    # the reference code's variance / sparsity ranks the same way
    assert ranking(np.asarray(VAR) / np.asarray(SPARSITY)) == r.ranking


def test_cumulative_is_in_rank_not_layer_order() -> None:
    navss = [0.5, 0.1, 0.4]
    ranks = rank_ascending(navss)  # layer 1 lowest, then 2, then 0
    assert np.allclose(cumulative_impact(navss, ranks), [1.0, 0.1, 0.5])
    assert not np.allclose(cumulative_impact(navss, ranks), np.cumsum(navss))  # the reference code's bug


def test_delta_guard_on_zero_sparsity_layer() -> None:
    r = compute_avss([1.0, 1.0, 2.0], [0.0, 0.5, 0.5], delta=1e-3)
    # nvar = [.25, .25, .5], nS = [0, .5, .5] -> AVSS = [.25 / 1e-3, .5, 1.0]
    assert np.allclose(r.avss, [250.0, 0.5, 1.0]) and r.guarded == [0] and not r.degraded
    assert r.ranking == [1, 2, 0] and any("delta" in w for w in r.warnings)


def test_all_zero_sparsity_degrades_to_variance_with_warning() -> None:
    r = compute_avss([1.0, 3.0, 4.0], [0.0, 0.0, 0.0])
    assert r.degraded and np.allclose(r.avss, [0.125, 0.375, 0.5]) and np.allclose(r.navss, r.avss)
    assert r.ranking == [0, 1, 2] and any("degrades to the normalized variance" in w for w in r.warnings)
    for arr in (r.nvar, r.nsparsity, r.sparsity_dev, r.avss, r.navss, r.cumulative):
        assert np.all(np.isfinite(arr))
    assert np.allclose(r.nsparsity, 0.0)


def test_all_zero_everything_is_finite() -> None:
    r = compute_avss([0.0, 0.0], [0.0, 0.0])
    assert all(np.all(np.isfinite(a)) for a in (r.nvar, r.avss, r.navss, r.cumulative))
    assert len(r.warnings) == 2
    r = compute_avss([float("nan"), 1.0], [0.1, float("inf")])
    assert all(np.all(np.isfinite(a)) for a in (r.nvar, r.avss, r.navss, r.cumulative)) and r.warnings


def test_near_zero_sparsity_warns() -> None:
    r = compute_avss([1.0, 2.0], [1e-6, 2e-6])
    assert not r.degraded and any("fragile" in w for w in r.warnings)


def test_normalize_and_small_helpers() -> None:
    assert np.allclose(normalize([1, 3]), [0.25, 0.75]) and np.allclose(normalize([0, 0]), [0, 0])
    assert prune_count(30, 0.25) == 7 and prune_count(10, 0.3) == 3 and prune_count(4, 0.0) == 0
    assert massive_activation_layers([5.0, 150.0, float("inf"), float("nan"), 100.0]) == [1, 2]
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert ranking([1.0, float("nan"), 0.5]) == [2, 0, 1]


def stats_from(values: list[list[float]]) -> list[RunningStats]:
    out = []
    for v in values:
        s = RunningStats(thresholds=(0.5,))
        s.update(torch.tensor([v]))
        out.append(s)
    return out


def test_layer_variance_sparsity_and_thresholds() -> None:
    stats = stats_from([[0.0, 1.0, -1.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    assert np.allclose(layer_variance(stats, "elements"), [np.var([0, 1, -1, 2]), 0.0])
    assert np.allclose(layer_variance(stats, "pooled"), [np.var([0, 1, -1, 2]), 0.0])  # one token per example
    with pytest.raises(ValueError):
        layer_variance(stats, "bogus")  # type: ignore[arg-type]
    assert np.allclose(sparsity_thresholds(stats, "absolute", eps=0.5), [0.5, 0.5])
    assert np.allclose(layer_sparsity(stats, [0.5, 0.5]), [0.25, 0.0])  # exact: counted at update
    rms = [math.sqrt(6 / 4), 3.0]
    assert np.allclose(
        sparsity_thresholds(stats, "relative", rel_eps=0.1, reference="rms"), [0.1 * r for r in rms]
    )
    med = sparsity_thresholds(stats, "relative", rel_eps=1.0, reference="median")
    assert med[1] == pytest.approx(3.0, rel=0.5)  # from the histogram: within the bin holding 3


# ------------------------------------------------------------------ stages


@pytest.fixture(scope="module")
def tiny_profile(loaded: Loaded):  # noqa: F811
    return profile(
        loaded,
        TEXTS,
        ProfileOptions(sites=["block_output", "mlp_activation"], batch_size=3),
        JobContext(),
        max_tokens=24,
        thresholds=[1e-5],
    )


def all_finite_or_none(values: dict) -> bool:
    """Every value null, a finite float, or an int/bool where app.layervalues types the key so."""
    return all(
        v is None or (isinstance(v, float) and math.isfinite(v)) or type(v) is {"integer": int, "boolean": bool}.get(kind(k))
        for k, v in values.items()
    )


def test_run_avss_stage(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    result = run_avss_stage(tiny_profile, AvssOptions(prune_fraction=0.34, plots=True))
    assert result.stage == "avss" and len(result.layers) == 3
    assert {r.scorer for r in result.layers} == {"avss"} and [r.layer for r in result.layers] == [0, 1, 2]
    keys = {
        "variance",
        "std",
        "nvar",
        "sparsity",
        "nsparsity",
        "sparsity_dev",
        "sparsity_bound",
        "avss",
        "navss",
        "cumulative",
        "rank",
        "prune",
        "l1",
        "l2",
        "frobenius",
        "max_abs",
        "max_median_ratio",
        "count",
    }
    for row in result.layers:
        assert keys <= set(row.values) and all_finite_or_none(row.values)
    ranks = sorted(r.values["rank"] for r in result.layers)
    assert ranks == [1.0, 2.0, 3.0]
    s = result.summary
    assert s["prune_layers"] == [s["ranking"][0]]  # floor(0.34 * 3) = 1 lowest-ranked
    assert [r.values["prune"] for r in result.layers].count(1.0) == 1
    threshold = s["threshold"]
    assert {k: threshold[k] for k in ("mode", "value", "reference")} == {"mode": "relative", "value": 0.01,
                                                                         "reference": "rms"}
    # read off the fine histogram window: exact only where the threshold's bins are empty
    assert threshold["exact"] is (threshold["max_bound"] == 0.0)
    assert max(r.values["sparsity_bound"] for r in result.layers) == threshold["max_bound"] <= 1e-4
    assert s["variance_mode"] == "elements" and s["site"] == "block_output"
    assert max(r.values["cumulative"] for r in result.layers) == pytest.approx(1.0)
    json.dumps(s, allow_nan=False)
    names = {a.name: a for a in result.artifacts}
    assert names["avss_layers.png"].data.startswith(b"\x89PNG\r\n\x1a\n")
    assert b"<svg" in names["avss_layers.svg"].data[:2000]
    assert {m.name for m in result.metrics} >= {"prune_count", "layers", "massive_activation_layers"}
    assert all(m.scope == "avss" for m in result.metrics)


def test_run_avss_stage_options(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    opts = AvssOptions(
        site="mlp_activation",
        variance_mode="pooled",
        sparsity_threshold="absolute",
        sparsity_eps=1e-5,
        plots=False,
    )
    result = run_avss_stage(tiny_profile, opts)
    assert result.summary["threshold"] == {"mode": "absolute", "value": 1e-5, "exact": True, "method": "exact",
                                           "max_bound": 0.0}
    assert result.summary["variance_mode"] == "pooled" and not result.artifacts
    for row, s in zip(result.layers, tiny_profile.site_stats("mlp_activation"), strict=True):
        assert row.values["variance"] == pytest.approx(s.pooled_variance)
        assert row.values["sparsity"] == pytest.approx(s.below[0] / s.count)
    median = run_avss_stage(tiny_profile, AvssOptions(sparsity_reference="median", plots=False))
    assert median.summary["threshold"]["reference"] == "median"


def test_run_avss_stage_all_zero_sparsity_never_nan(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    result = run_avss_stage(
        tiny_profile, AvssOptions(sparsity_threshold="absolute", sparsity_eps=1e-30, plots=False)
    )
    assert result.summary["degraded_to_variance"] is True
    assert any("degrades to the normalized variance" in w for w in result.warnings)
    for row in result.layers:
        assert all_finite_or_none(row.values) and row.values["sparsity"] == 0.0
        assert row.values["avss"] == pytest.approx(row.values["nvar"])
    json.dumps(result.summary, allow_nan=False)


def test_massive_activation_warning_and_ranking_both_ways(loaded: Loaded) -> None:  # noqa: F811
    block = loaded.model.model.layers[1]

    def spike(module, args, output):  # type: ignore[no-untyped-def]
        out = output[0] if isinstance(output, tuple) else output
        out = out.clone()
        out[:, 0, :] = out[:, 0, :] + 500.0  # a massive activation at the first position
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handle = block.register_forward_hook(spike)
    try:
        prof = profile(loaded, TEXTS, ProfileOptions(batch_size=4), JobContext(), max_tokens=24)
    finally:
        handle.remove()
    result = run_avss_stage(prof, AvssOptions(plots=False))
    assert 1 in result.summary["massive_activation_layers"]
    assert any("massive activations" in w for w in result.warnings)
    lead = result.summary["leading_positions"]
    assert lead["skip_positions"] == 1 and sorted(lead["ranking"]) == [0, 1, 2]
    row = result.layers[1].values
    assert row["massive"] == 1.0 and row["max_median_ratio"] > 100
    # without position 0 the variance of layer 1 collapses
    alt = prof.alternative_stats("block_output")[1]
    assert alt.variance < prof.site_stats("block_output")[1].variance / 10


def test_run_avss_stage_errors(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(JobFailed):
        run_avss_stage(tiny_profile, AvssOptions(site="attention_output"))


def test_run_profile_stage(tiny_profile) -> None:  # type: ignore[no-untyped-def]
    result = run_profile_stage(tiny_profile)
    assert result.stage == "profile" and len(result.layers) == 3
    row = result.layers[0].values
    assert {
        "block_output.variance",
        "mlp_activation.variance",
        "block_output.sparsity_rel",
        "mlp_activation.l1",
        "block_output.max_median_ratio",
    } <= set(row)
    assert all(r.scorer == "profile" for r in result.layers) and all_finite_or_none(row)
    names = {a.name: a for a in result.artifacts}
    back = json.loads(names["profile.json"].data)
    assert back["sites"] == ["block_output", "mlp_activation"] and back["n_tokens"] == tiny_profile.n_tokens
    assert set(names) == {"profile.json"}
    assert result.summary["n_tokens"] == tiny_profile.n_tokens
