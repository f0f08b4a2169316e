"""Per-layer figures come back as valid PNG and SVG bytes, whatever the values."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from worker.plots import (
    Panel,
    avss_figure,
    hallucination_figure,
    mitigation_figure,
    prune_figure,
    reliability_bins,
    render_layer_panels,
    stage_figures,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png_svg(files) -> None:  # type: ignore[no-untyped-def]
    by_type = {f.media_type: f for f in files}
    png, svg = by_type["image/png"], by_type["image/svg+xml"]
    assert png.data.startswith(PNG_MAGIC) and png.data[12:16] == b"IHDR" and len(png.data) > 1000
    root = ET.fromstring(svg.data)
    assert root.tag.endswith("svg")


def test_render_panels_png_and_svg() -> None:
    files = render_layer_panels(
        [Panel("variance", [1.0, 2.0, 3.0]), Panel("score", [0.1, 0.2, 0.3], kind="bar")],
        layers=[0, 1, 2],
        title="t",
        basename="fig",
        highlight=[1],
    )
    assert [f.name for f in files] == ["fig.png", "fig.svg"]
    check_png_svg(files)


def test_gaps_logs_and_degenerate_values() -> None:
    files = render_layer_panels(
        [
            Panel("with gaps", [None, float("nan"), float("inf"), 1.0]),
            Panel("wide range", [1e-6, 1.0, 1e4, 5.0]),  # log scale
            Panel("all missing", [None, None, None, None], kind="bar"),
            Panel("zeros", [0.0, 0.0, 0.0, 0.0], log=True),
        ],
        layers=[0, 1, 2, 3],
        title="degenerate",
        basename="d",
    )
    check_png_svg(files)


def test_svg_is_deterministic() -> None:
    def make() -> bytes:
        panels = [Panel("v", [1.0, 2.0])]
        return render_layer_panels(panels, layers=[0, 1], title="t", basename="x", formats=("svg",))[0].data

    assert make() == make()


def test_avss_figure_and_errors() -> None:
    files = avss_figure(
        layers=[0, 1, 2],
        variance=[1, 2, 3],
        l1=[1, 1, 1],
        l2=[2, 2, 2],
        frobenius=[3, 3, 3],
        sparsity=[0.1, 0.2, 0.0],
        avss=[0.5, None, 2.0],
        prune=[0],
    )
    assert {f.name for f in files} == {"avss_layers.png", "avss_layers.svg"}
    check_png_svg(files)
    with pytest.raises(ValueError):
        render_layer_panels([Panel("v", [1.0])], layers=[0, 1], title="t", basename="x")
    with pytest.raises(ValueError):
        render_layer_panels([], layers=[0], title="t", basename="x")


def test_tradeoff_figure_lines_bands_and_gaps() -> None:
    from worker.plots import tradeoff_figure

    point = lambda k, v, lo, hi: {"removed": k, "retained_pct": v, "ci": [lo, hi]}  # noqa: E731
    curve = {
        "blocks": [1, 2, 4],
        "tasks": {
            "perplexity": {"metric": "perplexity", "scorers": {
                "avss": [point(1, 95.0, 93.0, 97.0), point(2, 80.0, 75.0, 85.0), point(4, None, None, None)],
                "random": [point(1, 90.0, 85.0, 94.0), point(2, 60.0, 50.0, 70.0), point(4, 20.0, 10.0, 30.0)],
            }},
            "multiple_choice": {"metric": "acc", "scorers": {"avss": [point(1, 101.0, 99.0, 103.0)]}},
        },
    }
    files = tradeoff_figure(curve, basename="curve")
    assert [f.name for f in files] == ["curve.png", "curve.svg"]
    check_png_svg(files)
    assert b"random (median of seeds)" in files[1].data and b"blocks removed" in files[1].data
    with pytest.raises(ValueError):
        tradeoff_figure({"blocks": [1], "tasks": {}})


# ------------------------------------------------ the dashboard's stage panels as files


def _svg_text(files) -> str:  # type: ignore[no-untyped-def]
    return next(f for f in files if f.media_type == "image/svg+xml").data.decode()


def test_prune_figure_draws_retained_grid_and_agreement() -> None:
    from worker.stage import LayerRow, MetricRow

    metrics = [MetricRow("task=perplexity,scorer=avss", "retained_pct", 80.0, 70.0, 90.0, 8),
               MetricRow("task=perplexity,scorer=gbis", "retained_pct", None),  # undefined: a gap, no crash
               MetricRow("task=perplexity,scorer=random", "retained_pct", 50.0),
               MetricRow("task=perplexity,scorer=random", "retained_pct_seed_min", 40.0),
               MetricRow("task=perplexity,scorer=random", "retained_pct_seed_max", 60.0)]
    layers = [LayerRow(i, f"b{i}", s, {"rank": i + 1, "prune": i == k}) for s, k in (("avss", 0), ("gbis", 2))
              for i in range(4)]
    files = prune_figure(metrics, layers, {"avss|gbis": {"spearman": -0.4, "kendall": -0.33}}, tasks=["perplexity"])
    assert [f.name for f in files] == ["prune.png", "prune.svg"]
    check_png_svg(files)
    svg = _svg_text(files)
    assert "random: seeds&#39; range" in svg or "random: seeds' range" in svg
    assert "-0.40" in svg and "layers removed" in svg and "rank agreement" in svg


def test_reliability_bins_and_hallucination_figure() -> None:
    from worker.stage import AnswerRecord, LayerRow, MetricRow

    assert reliability_bins([0.05, 0.15, 0.12, None, 1.0], [True, False, True, True, True]) == [
        (0.05, 1.0, 1), (pytest.approx(0.135), 0.5, 2), (1.0, 1.0, 1)]
    answers = [AnswerRecord(i, "test" if i % 2 else "train", f"q{i}", ["a"], "a", i % 3 == 0, None, 1, "eos",
                            {"length": i / 10, "p_ik": None}) for i in range(10)]
    layers = [LayerRow(i, f"b{i}", "eavss", {"eavss": 0.1 * (i + 1), "rank": 4 - i}) for i in range(4)]
    layers += [LayerRow(i, f"b{i}", "layer_probe", {"auroc": 0.6, "auroc_ci_low": 0.5, "auroc_ci_high": 0.7})
               for i in range(4)]
    files = hallucination_figure(layers, answers, [MetricRow("detector=length", "ece", 0.12)],
                                 detectors=["length", "p_ik"])
    assert [f.name for f in files] == ["hallucination.png", "hallucination.svg"]
    check_png_svg(files)
    svg = _svg_text(files)
    assert "length (ECE 0.120)" in svg and "5 test answers" in svg and "layer probe AUROC" in svg
    for row in layers[4:]:
        row.values["auroc"] = None
    assert "AUROC undefined" in _svg_text(hallucination_figure(layers, answers, [], detectors=["length"]))


def test_mitigation_figure_marks_intervals_that_exclude_zero() -> None:
    from worker.stage import MetricRow

    metrics = [MetricRow(f"variant={v}", "accuracy", a, a - 0.05, a + 0.05, 100)
               for v, a in (("base", 0.3), ("eavss", 0.4), ("random", 0.31))]
    metrics += [MetricRow(f"variant={v}", "perplexity", 30.0) for v in ("base", "eavss", "random")]
    metrics += [MetricRow(f"variant={v},detector=p_ik", "ece", 0.1) for v in ("base", "eavss", "random")]
    metrics += [MetricRow("delta=eavss-base", "accuracy", 0.1, 0.05, 0.15, 100),
                MetricRow("delta=random-base", "accuracy", 0.01, -0.03, 0.05, 100)]
    files = mitigation_figure(metrics, detectors=["p_ik"])
    assert [f.name for f in files] == ["mitigation.png", "mitigation.svg"]
    check_png_svg(files)
    assert "p_ik ECE" in _svg_text(files) and "eavss-base" in _svg_text(files)


def test_a_figure_that_fails_is_a_warning() -> None:
    warnings: list[str] = []

    def broken() -> list:
        raise ValueError("no data")

    assert stage_figures(warnings, "prune", broken) == [] and warnings == ["prune: figures skipped (ValueError: no data)"]
