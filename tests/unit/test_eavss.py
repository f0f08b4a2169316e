"""EAVSS (docs/method.md equations 9-12) against a hand-worked 3-layer case and degenerate inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.scoring.eavss import compute_eavss, to_layer_rows

VAR_H = [1.0, 4.0, 2.0]
VAR_C = [1.0, 2.0, 5.0]  # HSAV = [0, 2, 3] -> nHSAV = [0, .4, .6]
S_H = [0.1, 0.5, 0.2]
S_C = [0.3, 0.5, 0.1]  # HSS = [.2, 0, .1] -> nHSS = [2/3, 0, 1/3]
NAVSS = [0.5, 0.3, 0.2]
ENOUGH = {"n_hallucinated": 40, "n_correct": 60}


def test_hand_worked_product():
    r = compute_eavss(VAR_H, VAR_C, S_H, S_C, NAVSS, **ENOUGH)
    assert r.hsav == pytest.approx([0.0, 2.0, 3.0])
    assert r.hss == pytest.approx([0.2, 0.0, 0.1])
    assert r.nhsav == pytest.approx([0.0, 0.4, 0.6])
    assert r.nhss == pytest.approx([2 / 3, 0.0, 1 / 3])
    hcs = [1 / 3, 0.2, 0.3 + 1 / 6]
    assert r.hcs == pytest.approx(hcs)
    prod = [0.5 * hcs[0], 0.3 * hcs[1], 0.2 * hcs[2]]  # [1/6, .06, .09333]
    assert r.eavss == pytest.approx([p / sum(prod) for p in prod])
    assert r.ranking == [0, 2, 1]
    assert r.rank == [1, 3, 2]
    assert r.warnings == []
    assert sum(r.eavss) == pytest.approx(1.0)


def test_weighted_sum_and_alpha_beta():
    r = compute_eavss(VAR_H, VAR_C, S_H, S_C, NAVSS, combine="weighted_sum", beta=0.5, **ENOUGH)
    hcs = [1 / 3, 0.2, 0.3 + 1 / 6]
    assert r.eavss == pytest.approx([0.5 * a + 0.5 * h for a, h in zip(NAVSS, hcs, strict=True)])
    assert sum(r.eavss) == pytest.approx(1.0)
    only_hcs = compute_eavss(VAR_H, VAR_C, S_H, S_C, NAVSS, combine="weighted_sum", beta=0.0, **ENOUGH)
    assert only_hcs.eavss == pytest.approx(hcs)
    assert only_hcs.ranking == [2, 0, 1]
    variance_only = compute_eavss(VAR_H, VAR_C, S_H, S_C, NAVSS, alpha=1.0, **ENOUGH)
    assert variance_only.hcs == pytest.approx([0.0, 0.4, 0.6])
    assert variance_only.options()["alpha"] == 1.0 and variance_only.combine == "product"


def test_navss_is_renormalized():
    a = compute_eavss(VAR_H, VAR_C, S_H, S_C, [5.0, 3.0, 2.0], combine="weighted_sum", **ENOUGH)
    b = compute_eavss(VAR_H, VAR_C, S_H, S_C, NAVSS, combine="weighted_sum", **ENOUGH)
    assert a.eavss == pytest.approx(b.eavss)
    assert a.navss == pytest.approx(NAVSS)


def test_identical_groups_give_uniform_with_a_warning():
    r = compute_eavss(VAR_H, VAR_H, S_H, S_H, NAVSS, **ENOUGH)
    assert r.nhsav == pytest.approx([1 / 3] * 3) and r.nhss == pytest.approx([1 / 3] * 3)
    assert r.eavss == pytest.approx(NAVSS)  # HCS uniform: the ranking is nAVSS's
    assert any("HSAV is 0 on every layer" in w for w in r.warnings)
    assert any("HSS is 0 on every layer" in w for w in r.warnings)


def test_zero_sum_zeros_option():
    r = compute_eavss(VAR_H, VAR_H, S_H, S_C, NAVSS, zero_sum="zeros", **ENOUGH)
    assert r.nhsav == [0.0, 0.0, 0.0]
    assert r.hcs == pytest.approx([0.5 * x for x in [2 / 3, 0.0, 1 / 3]])
    assert sum(r.eavss) == pytest.approx(1.0)  # the product still renormalizes
    assert any("zero_sum='zeros'" in w for w in r.warnings)


def test_product_with_no_overlap_falls_back_to_uniform():
    # HCS is 0 on layer 0, the only layer with nAVSS > 0
    r = compute_eavss([1.0, 2.0], [1.0, 1.0], [0.1, 0.2], [0.1, 0.1], [1.0, 0.0], **ENOUGH)
    assert r.eavss == [0.5, 0.5]
    assert any("nAVSS * HCS is 0" in w for w in r.warnings)
    z = compute_eavss([1.0, 2.0], [1.0, 1.0], [0.1, 0.2], [0.1, 0.1], [1.0, 0.0], zero_sum="zeros", **ENOUGH)
    assert z.eavss == [0.0, 0.0]


def test_small_groups_warn():
    r = compute_eavss(VAR_H, VAR_C, S_H, S_C, NAVSS, n_hallucinated=3, n_correct=19)
    assert any("only 3 hallucinated samples" in w for w in r.warnings)
    assert any("only 19 correct samples" in w for w in r.warnings)
    assert compute_eavss(VAR_H, VAR_C, S_H, S_C, NAVSS, n_hallucinated=20, n_correct=20).warnings == []
    empty = compute_eavss(VAR_H, VAR_C, S_H, S_C, NAVSS, n_hallucinated=0, n_correct=5, min_group=5)
    assert any("no hallucinated samples" in w for w in empty.warnings)
    assert not any("correct samples" in w for w in empty.warnings)


def test_single_layer_and_huge_values_stay_finite():
    one = compute_eavss([2.0], [1.0], [0.2], [0.1], [1.0], **ENOUGH)
    assert one.eavss == [1.0] and one.rank == [1]
    big = compute_eavss([1e308, 1e308, 0.0], [0.0, 0.0, 0.0], S_H, S_C, NAVSS, **ENOUGH)
    assert big.nhsav == pytest.approx([0.5, 0.5, 0.0])
    assert all(math.isfinite(v) for v in big.eavss + big.hcs + big.nhsav)


def test_random_inputs_sum_to_one_both_combines():
    rng = np.random.default_rng(0)
    for combine in ("product", "weighted_sum"):
        for _ in range(20):
            n = int(rng.integers(1, 12))
            r = compute_eavss(
                rng.random(n) * 100,
                rng.random(n) * 100,
                rng.random(n),
                rng.random(n),
                rng.random(n),
                combine=combine,
                **ENOUGH,
            )
            assert sum(r.eavss) == pytest.approx(1.0)
            assert sum(r.hcs) == pytest.approx(1.0)
            assert sorted(r.rank) == list(range(1, n + 1))
            assert [r.eavss[i] for i in r.ranking] == sorted(r.eavss, reverse=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"var_hallucinated": [1.0, float("nan"), 2.0]}, "NaN"),
        ({"var_correct": [1.0, 2.0]}, "layers"),
        ({"sparsity_correct": [0.1, -0.2, 0.3]}, ">= 0"),
        ({"sparsity_hallucinated": [0.1, 1.5, 0.3]}, "<= 1"),
        ({"navss": [0.1, float("inf"), 0.3]}, "inf"),
        ({"var_hallucinated": []}, "non-empty"),
        ({"alpha": 1.5}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"combine": "sum"}, "combine"),
        ({"zero_sum": "skip"}, "zero_sum"),
        ({"n_correct": -1}, "n_correct"),
    ],
)
def test_invalid_inputs(kwargs, match):
    args = {
        "var_hallucinated": VAR_H,
        "var_correct": VAR_C,
        "sparsity_hallucinated": S_H,
        "sparsity_correct": S_C,
        "navss": NAVSS,
        **ENOUGH,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        compute_eavss(**args)


def test_layer_rows():
    r = compute_eavss(VAR_H, VAR_C, S_H, S_C, NAVSS, n_hallucinated=3, n_correct=50)
    rows = to_layer_rows(r, ["model.layers.0", "model.layers.1", "model.layers.2"], layers=[1, 2, 3])
    assert [row.layer for row in rows] == [1, 2, 3]
    assert {row.scorer for row in rows} == {"eavss"}
    assert rows[0].block_name == "model.layers.0"
    assert set(rows[0].values) == {
        "hsav",
        "hss",
        "nhsav",
        "nhss",
        "hcs",
        "eavss",
        "rank",
        "n_correct",
        "n_hallucinated",
    }
    assert rows[0].values["rank"] == 1.0 and rows[1].values["rank"] == 3.0
    assert rows[2].values["n_hallucinated"] == 3.0 and rows[2].values["n_correct"] == 50.0
    assert rows[1].values["eavss"] == pytest.approx(r.eavss[1])
    for row in rows:
        assert all(v is not None and math.isfinite(v) for v in row.values.values())
    with pytest.raises(ValueError, match="block names"):
        to_layer_rows(r, ["a", "b"])
