"""Per-layer figures like the paper's appendix E/F (variance, L1, L2, Frobenius,
sparsity, AVSS per layer), rendered in memory as PNG and SVG artifacts.

Matplotlib's object API with the Agg canvas only (no pyplot, no global state), so it
is safe in worker threads and never opens a window.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Collection, Mapping, Sequence
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
    width = max(5.0 * cols, 7.5)  # room for the title over a single task
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=0.6 / width, right=0.98, bottom=0.55 / height + 0.03, top=1 - 0.75 / height, wspace=0.28, hspace=0.6
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


# ------------------------------------------------ the stage panels of the dashboard, as files


def _metric(metrics: Sequence[Any], scope: str, name: str) -> Any | None:
    return next((m for m in metrics if m.scope == scope and m.name == name), None)


def _errorbar(value: float | None, lo: float | None, hi: float | None) -> tuple[float, float]:
    """(below, above) for an error bar; 0 where the interval is unknown."""
    if value is None or not math.isfinite(value):
        return 0.0, 0.0
    below = value - lo if lo is not None and math.isfinite(lo) else 0.0
    above = hi - value if hi is not None and math.isfinite(hi) else 0.0
    return max(0.0, below), max(0.0, above)


def _new_figure(width: float, height: float, panels: int) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width * panels, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.2, top=0.82, wspace=0.35)
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def _files(fig: Figure, basename: str, formats: Sequence[str], dpi: int) -> list[ArtifactFile]:
    return [ArtifactFile(f"{basename}.{fmt}", FORMATS[fmt], figure_bytes(fig, fmt, dpi=dpi)) for fmt in formats]


def prune_figure(
    metrics: Sequence[Any], layers: Sequence[Any], agreement: Mapping[str, Mapping[str, Any]], *,
    tasks: Sequence[str], basename: str = "prune", formats: Sequence[str] = ("png", "svg"), dpi: int = 110,
) -> list[ArtifactFile]:
    """The dashboard's prune panel: per task, each scorer's retained performance (%) with its 95%
    interval against the original model (100 %) and the random control (its seeds' range shaded,
    their mean dashed); the layers each scorer removed (layers x scorers); the scorers' Spearman
    rank agreement. `metrics` and `layers` are the stage's MetricRows and LayerRows."""
    scorers = list(dict.fromkeys(r.scorer for r in layers))
    fig, axes = _new_figure(4.6, 3.9, len(tasks) + 2)
    for ax, task in zip(axes, tasks, strict=False):
        names = [s for s in scorers if _metric(metrics, f"task={task},scorer={s}", "retained_pct")]
        values, bars = [], []
        for s in names:
            m = _metric(metrics, f"task={task},scorer={s}", "retained_pct")
            values.append(m.value if m and m.value is not None else math.nan)
            bars.append(_errorbar(m.value, m.ci_low, m.ci_high) if m else (0.0, 0.0))
        xs = list(range(len(names)))
        ax.bar(xs, [0.0 if math.isnan(v) else v for v in values], color="tab:blue", width=0.6,
               yerr=[[b[0] for b in bars], [b[1] for b in bars]] if bars else None, capsize=3)
        rnd = _metric(metrics, f"task={task},scorer=random", "retained_pct")
        lo = _metric(metrics, f"task={task},scorer=random", "retained_pct_seed_min")
        hi = _metric(metrics, f"task={task},scorer=random", "retained_pct_seed_max")
        if lo is not None and hi is not None and lo.value is not None and hi.value is not None:
            ax.axhspan(lo.value, hi.value, color="0.6", alpha=0.25, label="random: seeds' range")
        if rnd is not None and rnd.value is not None:
            ax.axhline(rnd.value, color="0.3", linestyle="--", linewidth=1, label="random: mean")
        ax.axhline(100.0, color="black", linewidth=1, label="original")
        ax.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("retained %", fontsize=9)
        ax.set_title(f"{task}: retained performance (95% CI)", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(True, axis="y", alpha=0.3)
    grid_ax, agree_ax = axes[len(tasks)], axes[len(tasks) + 1]
    ids = sorted({r.layer for r in layers})
    grid = [[1.0 if any(r.scorer == s and r.layer == i and r.values.get("prune") for r in layers) else 0.0
             for i in ids] for s in scorers]
    if scorers and ids:
        grid_ax.imshow(grid, cmap="Reds", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    grid_ax.set_yticks(range(len(scorers)), scorers, fontsize=8)
    grid_ax.set_xticks(range(len(ids)), [str(i) for i in ids], fontsize=7 if len(ids) <= 32 else 5, rotation=90)
    grid_ax.set_xlabel("layer", fontsize=9)
    grid_ax.set_title("layers removed (red)", fontsize=10)
    names = list(dict.fromkeys(n for pair in agreement for n in pair.split("|")))
    matrix = [[1.0 if a == b else math.nan for b in names] for a in names]
    for pair, stats in agreement.items():
        a, _, b = pair.partition("|")
        rho = stats.get("spearman")
        if a in names and b in names and isinstance(rho, int | float):
            matrix[names.index(a)][names.index(b)] = matrix[names.index(b)][names.index(a)] = float(rho)
    if names:
        agree_ax.imshow(matrix, cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    agree_ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    agree_ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    agree_ax.set_yticks(range(len(names)), names, fontsize=8)
    agree_ax.set_title("rank agreement (Spearman ρ)", fontsize=10)
    fig.suptitle("Pruning: retained performance per scorer against random layers", fontsize=11)
    return _files(fig, basename, formats, dpi)


def reliability_bins(confidence: Sequence[float | None], correct: Sequence[bool], bins: int = 10
                     ) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) of each non-empty equal-width confidence bin (the
    dashboard's reliability diagram); answers without a confidence are left out."""
    out = []
    pairs = [(float(c), bool(y)) for c, y in zip(confidence, correct, strict=True)
             if c is not None and math.isfinite(float(c))]
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = [(c, y) for c, y in pairs if lo <= min(max(c, 0.0), 1.0) < hi or (b == bins - 1 and c >= 1.0)]
        if inside:
            out.append((sum(c for c, _ in inside) / len(inside), sum(y for _, y in inside) / len(inside), len(inside)))
    return out


def hallucination_figure(
    layers: Sequence[Any], answers: Sequence[Any], metrics: Sequence[Any], *, detectors: Sequence[str],
    basename: str = "hallucination", formats: Sequence[str] = ("png", "svg"), dpi: int = 110,
) -> list[ArtifactFile]:
    """The dashboard's hallucination panel: EAVSS by layer, each layer probe's test AUROC with its
    95% interval (when probes ran), and a reliability diagram per detector (the test answers in
    ten equal confidence bins, accuracy against mean confidence, the detector's ECE in the legend)."""
    eavss = sorted((r for r in layers if r.scorer == "eavss"), key=lambda r: r.layer)
    probes = sorted((r for r in layers if r.scorer == "layer_probe"), key=lambda r: r.layer)
    fig, axes = _new_figure(4.6, 3.9, 3 if probes else 2)
    ax = axes[0]
    ax.bar([r.layer for r in eavss], [float(r.values.get("eavss") or 0.0) for r in eavss], color="tab:red", width=0.8)
    ax.set_xlabel("layer", fontsize=9)
    ax.set_ylabel("EAVSS", fontsize=9)
    ax.set_title("EAVSS by layer", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if probes:
        ax = axes[1]
        auroc = [r.values.get("auroc") for r in probes]
        bars = [_errorbar(r.values.get("auroc"), r.values.get("auroc_ci_low"), r.values.get("auroc_ci_high"))
                for r in probes]
        ax.errorbar([r.layer for r in probes], _clean(auroc), yerr=[[b[0] for b in bars], [b[1] for b in bars]],
                    fmt="o-", markersize=3, capsize=2, color="tab:blue")
        ax.axhline(0.5, color="0.4", linestyle="--", linewidth=1, label="chance")
        ax.set_xlim(min(r.layer for r in probes) - 0.5, max(r.layer for r in probes) + 0.5)
        if all(math.isnan(v) for v in _clean(auroc)):  # e.g. a test split of one class
            ax.text(0.5, 0.6, "AUROC undefined on this test split", transform=ax.transAxes, ha="center", fontsize=8)
        ax.set_xlabel("layer", fontsize=9)
        ax.set_ylabel("AUROC (test)", fontsize=9)
        ax.set_title("layer probe AUROC (95% CI)", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    ax = axes[-1]
    test = [a for a in answers if a.split == "test"]
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="perfect calibration")
    for d in detectors:
        points = reliability_bins([a.confidence.get(d) for a in test], [a.correct for a in test])
        if not points:
            continue
        ece = _metric(metrics, f"detector={d}", "ece")
        label = f"{d} (ECE {ece.value:.3f})" if ece is not None and ece.value is not None else d
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, linewidth=1.2, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence", fontsize=9)
    ax.set_ylabel("accuracy", fontsize=9)
    ax.set_title(f"reliability ({len(test)} test answers, 10 bins)", fontsize=10)
    ax.legend(fontsize=6, loc="upper left")
    ax.grid(True, alpha=0.3)
    fig.suptitle("Hallucination: layer scores and detector calibration", fontsize=11)
    return _files(fig, basename, formats, dpi)


def mitigation_figure(
    metrics: Sequence[Any], *, detectors: Sequence[str], basename: str = "mitigation",
    formats: Sequence[str] = ("png", "svg"), dpi: int = 110,
) -> list[ArtifactFile]:
    """The dashboard's mitigate panel: accuracy, general-text perplexity and each detector's ECE
    for the base model and every variant (a method at the EAVSS layers or at random ones), with
    95% intervals; and the paired accuracy differences (each variant - base, eavss - random) with theirs."""
    variants = [m.scope.removeprefix("variant=") for m in metrics
                if m.scope.startswith("variant=") and "," not in m.scope and m.name == "accuracy"]
    palette = {"base": "0.55", "eavss": "tab:red", "random": "tab:blue"}
    cycle = ["tab:red", "tab:blue", "tab:orange", "tab:cyan", "tab:purple", "tab:olive", "tab:brown", "tab:pink"]
    colors = {v: palette.get(v, cycle[i % len(cycle)]) for i, v in enumerate(v for v in variants if v != "base")}
    colors["base"] = palette["base"]
    quantities = [("accuracy", "", "answer accuracy"), ("perplexity", "", "perplexity (general text)")]
    quantities += [("ece", f",detector={d}", f"{d} ECE") for d in detectors]
    fig, axes = _new_figure(max(3.4, 0.55 * len(variants) + 1.2), 3.6, len(quantities) + 1)
    for ax, (name, extra, title) in zip(axes, quantities, strict=False):
        for i, v in enumerate(variants):
            m = _metric(metrics, f"variant={v}{extra}", name)
            value = m.value if m is not None and m.value is not None else math.nan
            err = _errorbar(value, m.ci_low, m.ci_high) if m is not None else (0.0, 0.0)
            ax.bar([i], [0.0 if math.isnan(value) else value], color=colors[v], width=0.6,
                   yerr=[[err[0]], [err[1]]], capsize=3)
        ax.set_xticks(range(len(variants)), variants, fontsize=8, rotation=20 if len(variants) > 3 else 0,
                      ha="right" if len(variants) > 3 else "center")
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    ax = axes[-1]
    deltas = [m.scope.removeprefix("delta=") for m in metrics
              if m.scope.startswith("delta=") and "," not in m.scope and m.name == "accuracy"]
    for i, d in enumerate(deltas):
        m = _metric(metrics, f"delta={d}", "accuracy")
        value = m.value if m is not None and m.value is not None else math.nan
        err = _errorbar(value, m.ci_low, m.ci_high) if m is not None else (0.0, 0.0)
        excludes = m is not None and m.ci_low is not None and m.ci_high is not None and (m.ci_low > 0 or m.ci_high < 0)
        ax.errorbar([i], [value], yerr=[[err[0]], [err[1]]], fmt="o", capsize=4,
                    color="tab:green" if excludes else "0.3")
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_xticks(range(len(deltas)), deltas, rotation=20, ha="right", fontsize=8)
    ax.set_title("accuracy difference (paired 95% CI;\ngreen: excludes 0)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Mitigation: before and after tuning, against the random-layer control", fontsize=11)
    return _files(fig, basename, formats, dpi)


def stage_figures(warnings: list[str], stage: str, make: Callable[[], list[ArtifactFile]]) -> list[ArtifactFile]:
    """A stage's figures; a figure that cannot be drawn is a warning, never a failed job."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - plotting must not lose a finished analysis
        warnings.append(f"{stage}: figures skipped ({type(exc).__name__}: {exc})")
        return []
