"""Per-layer figures like the paper's appendix E/F (variance, L1, L2, Frobenius,
sparsity, AVSS per layer), rendered in memory as PNG and SVG artifacts.

Matplotlib's object API with the Agg canvas only (no pyplot, no global state), so it
is safe in worker threads and never opens a window.
"""

from __future__ import annotations

import io
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg", force=False)

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from worker.stage import ArtifactFile  # noqa: E402

FORMATS: dict[str, str] = {"png": "image/png", "svg": "image/svg+xml"}


@dataclass
class Panel:
    """One subplot: a value per layer (None/NaN/inf are drawn as gaps)."""

    title: str
    values: Sequence[float | None]
    kind: Literal["line", "bar"] = "line"
    log: bool | None = None  # None: log scale when the positive values span more than 3 decades


def _clean(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        try:
            x = float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            x = math.nan
        out.append(x if math.isfinite(x) else math.nan)
    return out


def _use_log(values: list[float], log: bool | None) -> bool:
    finite = [v for v in values if not math.isnan(v)]
    if not finite or any(v <= 0 for v in finite):
        return False
    if log is not None:
        return log
    return max(finite) / min(finite) > 1e3


def render_layer_panels(
    panels: Sequence[Panel],
    *,
    layers: Sequence[int],
    title: str,
    basename: str,
    highlight: Collection[int] = (),
    columns: int = 3,
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 110,
) -> list[ArtifactFile]:
    """One figure, one subplot per panel, x = layer index; layers in `highlight` are
    marked (e.g. the pruning proposal). Returns one ArtifactFile per format."""
    if not panels:
        raise ValueError("no panels to plot")
    layers = [int(x) for x in layers]
    highlight = {int(x) for x in highlight}
    cols = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / cols)
    height = 3.0 * rows + 0.7
    fig = Figure(figsize=(4.2 * cols, height))
    FigureCanvasAgg(fig)
    # Fixed margins: constrained layout would double the rendering time.
    fig.subplots_adjust(
        left=0.07, right=0.98, bottom=0.45 / height + 0.02, top=1 - 0.75 / height, wspace=0.32, hspace=0.55
    )
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, panel in enumerate(panels):
        ax = axes[k // cols][k % cols]
        values = _clean(panel.values)
        if len(values) != len(layers):
            raise ValueError(f"panel {panel.title!r} has {len(values)} values for {len(layers)} layers")
        colors = ["tab:red" if layer in highlight else "tab:blue" for layer in layers]
        if panel.kind == "bar":
            ax.bar(layers, [0.0 if math.isnan(v) else v for v in values], color=colors, width=0.8)
        else:
            ax.plot(layers, values, marker="o", markersize=3, linewidth=1.2, color="tab:blue")
            marked = [
                (x, v) for x, v in zip(layers, values, strict=True) if x in highlight and not math.isnan(v)
            ]
            if marked:
                ax.scatter([m[0] for m in marked], [m[1] for m in marked], color="tab:red", zorder=3, s=18)
        if _use_log(values, panel.log):
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("layer", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    if highlight:
        title = f"{title}  (red: {sorted(highlight)})"
    fig.suptitle(title, fontsize=11)
    return [
        ArtifactFile(f"{basename}.{fmt}", FORMATS[fmt], figure_bytes(fig, fmt, dpi=dpi)) for fmt in formats
    ]


def figure_bytes(fig: Figure, fmt: str, *, dpi: int = 110) -> bytes:
    """The figure encoded in `fmt` ("png" or "svg"), without timestamps."""
    if fmt not in FORMATS:
        raise ValueError(f"unsupported format {fmt!r}")
    buf = io.BytesIO()
    metadata: dict[str, Any] = {"Date": None} if fmt == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.hashsalt": "layerscope", "svg.fonttype": "none"}):
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=metadata)
    return buf.getvalue()


def avss_figure(
    *,
    layers: Sequence[int],
    variance: Sequence[float | None],
    l1: Sequence[float | None],
    l2: Sequence[float | None],
    frobenius: Sequence[float | None],
    sparsity: Sequence[float | None],
    avss: Sequence[float | None],
    prune: Collection[int] = (),
    title: str = "AVSS per layer",
    basename: str = "avss_layers",
) -> list[ArtifactFile]:
    """The appendix E/F panels (variance, L1, L2, Frobenius, sparsity) plus AVSS,
    with the proposed pruning layers marked."""
    panels = [
        Panel("activation variance", variance),
        Panel("L1 norm (mean per token)", l1),
        Panel("L2 norm (mean per token)", l2),
        Panel("Frobenius norm (mean per example)", frobenius),
        Panel("sparsity", sparsity),
        Panel("AVSS", avss, kind="bar"),
    ]
    return render_layer_panels(panels, layers=layers, title=title, basename=basename, highlight=prune)


def tradeoff_figure(
    curve: Mapping[str, Any],
    *,
    title: str = "Pruning trade-off",
    basename: str = "prune_tradeoff",
    formats: Sequence[str] = ("png", "svg"),
    dpi: int = 110,
) -> list[ArtifactFile]:
    """Retained performance (%) against blocks removed, one subplot per task, a line per
    scorer with its 95% interval as a band; the random control dashed (median over seeds,
    its interval shaded grey). `curve` is the prune stage's `summary["curve"]`."""
    tasks: Mapping[str, Any] = curve.get("tasks", {})
    if not tasks:
        raise ValueError("no curve to plot")
    cols = max(1, min(3, len(tasks)))
    rows = math.ceil(len(tasks) / cols)
    height = 3.4 * rows + 0.8
    fig = Figure(figsize=(5.0 * cols, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=0.08, right=0.98, bottom=0.55 / height + 0.03, top=1 - 0.75 / height, wspace=0.28, hspace=0.6
    )
    axes = fig.subplots(rows, cols, squeeze=False)
    palette = ["tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    for i, (task, entry) in enumerate(tasks.items()):
        ax = axes[i // cols][i % cols]
        scorers: Mapping[str, Sequence[Mapping[str, Any]]] = entry.get("scorers", {})
        colors = iter(palette * 4)
        for name, points in scorers.items():
            xs = [float(p["removed"]) for p in points]
            ys = _clean([p.get("retained_pct") for p in points])
            lo = _clean([(p.get("ci") or [None, None])[0] for p in points])
            hi = _clean([(p.get("ci") or [None, None])[1] for p in points])
            random = name == "random"
            color = "0.35" if random else next(colors)
            ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.4, color=color,
                    linestyle="--" if random else "-", label="random (median of seeds)" if random else name)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.12 if not random else 0.18, linewidth=0)
        ax.axhline(100.0, color="black", linewidth=0.8, alpha=0.6)
        ax.set_title(f"{task} ({entry.get('metric', '')})", fontsize=10)
        ax.set_xlabel("blocks removed", fontsize=9)
        ax.set_ylabel("retained %", fontsize=9)
        ax.set_xticks([float(k) for k in curve.get("blocks", [])])
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    for k in range(len(tasks), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    fig.suptitle(f"{title}: retained performance with paired 95% intervals", fontsize=11)
    return [ArtifactFile(f"{basename}.{fmt}", FORMATS[fmt], figure_bytes(fig, fmt, dpi=dpi)) for fmt in formats]
