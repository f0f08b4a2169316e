"""Per-layer figures come back as valid PNG and SVG bytes, whatever the values."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from worker.plots import Panel, avss_figure, render_layer_panels

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
