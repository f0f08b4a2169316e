"""The prune stage's optional healing step (`PruneOptions.heal`; docs/method.md section 3.5).

For every scorer's pruned model and for the random control (the first `heal.random_seeds`
seeds, default all), the same pruning is applied to the loaded model in place, LoRA adapters
are trained on it (`worker.healing.healed`, the same budget and seed for every model), every
task is evaluated again, and the adapters are removed. Each distinct set of removed layers is
healed once. What is stored, per task:

- scope `task=<task>,scorer=<scorer>,variant=healed`: every metric of the healed model with
  its interval and N; `retained_pct` = healed / original (original / healed for perplexity)
  x 100 with a paired bootstrap interval over the same examples (`retained_metric`); and
  `heal_gain_pct` = retained_pct after healing minus before (percentage points), its interval
  from resampling the examples of the original, the pruned and the healed model together;
- the random control as for the unhealed models: each healed seed
  (`...,scorer=random,seed=<s>,variant=healed`) and the median over the healed seeds
  (`...,scorer=random,variant=healed`, `median_retained`);
- per model `scorer=<scorer>,variant=healed`: the healing loss before and after on a fixed
  sample of the corpus, seconds, trainable parameters;
- in the summary table, `healed` inside every row; `summary.healing`: the corpus, each
  model's training report and whether AVSS still loses after healing.

The healing corpus is never an evaluated text: texts of the healing set that equal, contain
or are contained in any text, question or answer of the analysis dataset, the QA set or the
held-out perplexity set, or any string of a task's prepared data (e.g. multiple-choice
choices), are left out (`worker.healing.disjoint_texts`), and their number is reported. An
lm-eval task's own documents are not visible here (a warning says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from worker.evaluation.bootstrap import paired_bootstrap_ci
from worker.evaluation.tasks import MetricValue, TaskResult, example_field
from worker.healing import HealReport, disjoint_texts, export_healed_model, healed
from worker.lm.model import is_causal_lm
from worker.modelcard import Provenance, write_export_card
from worker.modelzoo.surgery import pruned_view
from worker.stage import ArtifactFile, JobFailed, MetricRow, finite_or_none

if TYPE_CHECKING:
    from app.schemas import DatasetSpec, HealOptions
    from worker.pruning import _Measured, _Prune, _Selection

__all__ = ["default_heal_dataset", "HealStep", "heal_gain", "heal_pruned_models", "healing_texts"]

def default_heal_dataset() -> DatasetSpec:
    """The default healing corpus: every line of the built-in chatterbot conversations."""
    from app.schemas import DatasetSpec

    return DatasetSpec(name="chatterbot-conversations", limit=100_000)


def _texts_of(examples: Sequence[Any]) -> list[str]:
    out: list[str] = []
    for ex in examples:
        text, q, a = (example_field(ex, k) for k in ("text", "question", "answer"))
        if isinstance(text, str) and text.strip():
            out.append(text)
        elif isinstance(q, str) and q.strip():
            out.append(f"{q} {a}" if isinstance(a, str) and a.strip() else q)
    return out


def _fields_of(examples: Sequence[Any]) -> list[str]:
    return [
        v for ex in examples for k in ("text", "question", "answer")
        if isinstance(v := example_field(ex, k), str) and v.strip()
    ]


def _strings(obj: Any, depth: int = 0) -> Iterator[str]:
    """Every string inside a task's prepared data (lists, tuples, mappings, dataclasses)."""
    if isinstance(obj, str):
        yield obj
    elif depth >= 6:
        return
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _strings(v, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _strings(v, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _strings(getattr(obj, f.name), depth + 1)


def healing_texts(
    heal_examples: Sequence[Any], examples: Sequence[Any], qa_examples: Sequence[Any] | None,
    *, perplexity_examples: Sequence[Any] | None = None, task_data: Sequence[Any] = (),
) -> tuple[list[str], int]:
    """The healing corpus without anything the analysis evaluates (see module doc): every text,
    question and answer of the analysis dataset, the QA set and the held-out perplexity set, and
    every string in the tasks' prepared data. Also how many texts were left out."""
    held_out = _fields_of(examples) + _fields_of(qa_examples or []) + _fields_of(perplexity_examples or [])
    held_out += [t for data in task_data for t in _strings(data)]
    return disjoint_texts(_texts_of(heal_examples), held_out)


def default_heal_examples() -> list[Any]:
    from app.config import Settings
    from worker.datasets import load_examples

    return load_examples(default_heal_dataset(), Settings())


def heal_gain(
    original: TaskResult, pruned: TaskResult, healed_res: TaskResult, metric: str | None = None, *,
    n_boot: int = 1000, seed: int = 0,
) -> MetricValue:
    """retained_pct(healed) - retained_pct(pruned) in percentage points, with a 95% interval
    from resampling the examples of the three results with the same indices (None when
    they carry no per-example values over the same examples)."""
    from worker.pruning import retained_pct

    name = metric or original.primary
    orig_mv = original.metrics[name]
    hib = orig_mv.higher_is_better
    before = retained_pct(orig_mv.value, pruned.metrics[name].value, hib)
    after = retained_pct(orig_mv.value, healed_res.metrics[name].value, hib)
    value = finite_or_none(after - before) if after is not None and before is not None else None
    out = MetricValue("heal_gain_pct", value, None, None, orig_mv.n, True)
    stat = original.statistics.get(name)
    arrays = [r.example_values(name) for r in (original, pruned, healed_res)]
    if (
        stat is None or value is None or n_boot == 0
        or any(a is None or a[0].shape != arrays[0][0].shape for a in arrays)  # type: ignore[index]
        or any(r.statistics.get(name) != stat for r in (pruned, healed_res))
    ):
        return out
    a0, a1, a2 = arrays
    assert a0 is not None and a1 is not None and a2 is not None
    width = len(a1)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        n, d = (num, den) if hib else (den, num)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return np.where((d != 0) & np.isfinite(n) & np.isfinite(d), 100.0 * n / d, np.nan)

    def fn(a_blocks: list[np.ndarray], b_blocks: list[np.ndarray]) -> np.ndarray:
        base = stat(*a_blocks)
        return ratio(stat(*b_blocks[width:]), base) - ratio(stat(*b_blocks[:width]), base)

    ci = paired_bootstrap_ci(fn, a0, [*a1, *a2], n_boot=n_boot, seed=seed)
    out.ci_low, out.ci_high = finite_or_none(ci.low), finite_or_none(ci.high)
    return out


@dataclass
class HealStep:
    """What the healing step adds to the prune stage's result."""

    metrics: list[MetricRow] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    artifacts: list[ArtifactFile] = field(default_factory=list)


def _labels(selection: _Selection, heal: HealOptions) -> tuple[dict[str, tuple[int, ...]], list[tuple[int, tuple[int, ...]]]]:
    scorers = {name: tuple(d) for name, d in selection.dropped_by.items()}
    n_random = len(selection.random_sets) if heal.random_seeds is None else heal.random_seeds
    return scorers, [(s, tuple(d)) for s, d in selection.random_sets[:n_random]]


def _export_fits(job: _Prune, measured: _Measured, key: tuple[int, ...], heal: HealOptions) -> bool:
    size = sum(p.numel() * (4 if heal.export_dtype == "float32" else p.element_size()) for p in job.model.parameters())
    est = size * measured.params_after[key] / max(measured.n_params, 1)
    if est > job.options.export_max_bytes:
        job.warnings.append(f"healed export skipped: the merged model is about {est / 1e6:.0f} MB, above export_max_bytes")
        return False
    return True


def heal_pruned_models(
    job: _Prune,
    tasks: Mapping[str, Any],
    original: Mapping[str, TaskResult],
    selection: _Selection,
    measured: _Measured,
    table: list[dict[str, Any]],
    heal_examples: Sequence[Any] | None,
    examples: Sequence[Any],
    qa_examples: Sequence[Any] | None,
    perplexity_examples: Sequence[Any] | None = None,
) -> HealStep:
    """Heal every pruned model, evaluate it again, and fill `table`'s rows (module doc).
    `heal_examples`: the healing set (default: `default_heal_dataset()`, loaded here)."""
    heal = job.options.heal
    assert heal is not None
    if not is_causal_lm(job.model):
        job.warnings.append(f"healing skipped: it trains the LM loss and {type(job.model).__name__} is not a causal LM")
        return HealStep()
    if heal_examples is None:
        heal_examples = default_heal_examples()
    texts, left_out = healing_texts(
        heal_examples, examples, qa_examples, perplexity_examples=perplexity_examples, task_data=list(tasks.values())
    )
    if not texts:
        raise JobFailed(
            "heal_no_data",
            f"no healing text is left: all {left_out} texts of the healing set overlap the evaluated data; "
            "give heal.dataset another corpus",
        )
    if "lm_eval" in tasks:
        job.warnings.append(
            "healing: the corpus is checked for overlap with the analysis dataset and qa_dataset, not with the "
            "lm_eval task's own documents; use a healing corpus unrelated to that benchmark"
        )
    scorers, randoms = _labels(selection, heal)
    keys = sorted(set(scorers.values()) | {k for _, k in randoms})
    export_key = scorers.get(job.options.export_scorer) if heal.export else None
    if heal.export and export_key is None:
        job.warnings.append(f"healed export skipped: scorer {job.options.export_scorer} produced no ranking")
    if export_key is not None and not _export_fits(job, measured, export_key, heal):
        export_key = None
    results: dict[tuple[int, ...], dict[str, TaskResult]] = {}
    reports: dict[tuple[int, ...], HealReport] = {}
    step = HealStep()
    for i, key in enumerate(keys):
        job.ctx.check_cancelled()
        with pruned_view(job.model, key, adapter=job.adapter), contextlib.ExitStack() as attached:
            with job.phase():  # the training: one phase of the stage's bar
                h = attached.enter_context(healed(
                    job.model, job.tokenizer, texts, heal, adapter=job.adapter, ctx=job.ctx,
                    progress_stage=f"prune:heal {i + 1}/{len(keys)}", seed=job.options.seed,
                    texts_left_out=left_out,
                ))
            reports[key] = h.report
            results[key] = {}
            for task, data in tasks.items():
                with job.phase():
                    results[key][task] = job.evaluate(task, data, stage=f"prune:healed {i + 1}/{len(keys)}")
            if key == export_key:
                job.ctx.check_cancelled()
                archive = f"healed-model-{job.options.export_scorer}.tar.gz"
                standalone: list[ArtifactFile] = []
                blob = export_healed_model(h, job.tokenizer, dtype=heal.export_dtype,
                                           card=_card(job, key, h.report, results[key], archive, standalone))
                step.artifacts += [ArtifactFile(archive, "application/gzip", blob), *standalone]

    for label, key in [*scorers.items(), *((f"random,seed={s}", k) for s, k in randoms)]:
        r = reports[key]
        scope = f"scorer={label},variant=healed"
        step.metrics.append(MetricRow(scope, "heal_loss_before", finite_or_none(r.loss_before)))
        step.metrics.append(MetricRow(scope, "heal_loss_after", finite_or_none(r.loss_after)))
        step.metrics.append(MetricRow(scope, "heal_seconds", finite_or_none(r.seconds)))
        step.metrics.append(MetricRow(scope, "heal_trainable_parameters", float(r.trainable_parameters)))
        if r.loss_before is not None and r.loss_after is not None and r.loss_after >= r.loss_before:
            job.warnings.append(
                f"healing did not lower the training loss of {label} ({r.loss_before:.4g} -> {r.loss_after:.4g}); "
                "try another heal.learning_rate or more heal.steps"
            )

    beaten: dict[str, list[str]] = {}
    for entry in table:
        task = entry["task"]
        orig = original[task]
        rows = {row["scorer"]: row for row in entry["rows"]}
        for name, key in scorers.items():
            if name in rows:
                rows[name]["healed"] = _scorer_healed(job, task, name, orig, measured.evaluated[key][task],
                                                      results[key][task], step.metrics)
        if randoms and "random" in rows:
            rows["random"]["healed"] = _random_healed(job, task, orig, randoms, measured, results, step.metrics)
        beaten[task] = _avss_beaten_after(job, task, orig, rows)

    step.summary = {
        "corpus": {
            "texts": len(texts),
            "left_out_overlapping_evaluated": left_out,
            "sequences": next(iter(reports.values())).sequences if reports else 0,
        },
        "models": {
            **{name: reports[key].to_dict() for name, key in scorers.items()},
            **{f"random,seed={s}": reports[k].to_dict() for s, k in randoms},
        },
        "random_seeds_healed": [s for s, _ in randoms],
        "avss_beaten_by_after_healing": beaten,
        "choices": {
            "retained_pct": "healed / original x 100 (original / healed for perplexity), paired bootstrap interval",
            "heal_gain_pct": "retained_pct after minus before healing, percentage points; the original, pruned "
            "and healed models' examples resampled together",
            "corpus": "texts overlapping any evaluated text, question or answer are left out",
            "precision": "float32 LoRA adapters whatever the model's dtype",
        },
    }
    return step


def _scorer_healed(
    job: _Prune, task: str, name: str, orig: TaskResult, pruned: TaskResult, res: TaskResult,
    metrics: list[MetricRow],
) -> dict[str, Any]:
    from worker.pruning import retained_metric

    options = job.options
    scope = f"task={task},scorer={name},variant=healed"
    out: dict[str, Any] = {}
    for mname, mv in res.metrics.items():
        suffix = "" if mname == res.primary else f"_{mname}"
        kept, _ = retained_metric(orig, res, mname, n_boot=options.n_boot, seed=options.seed)
        gain = heal_gain(orig, pruned, res, mname, n_boot=options.n_boot, seed=options.seed)
        metrics.append(MetricRow(scope, mname, mv.value, mv.ci_low, mv.ci_high, mv.n))
        metrics.append(MetricRow(scope, f"retained_pct{suffix}", kept.value, kept.ci_low, kept.ci_high, kept.n))
        metrics.append(MetricRow(scope, f"heal_gain_pct{suffix}", gain.value, gain.ci_low, gain.ci_high, gain.n))
        out[mname] = mv.value
        out[f"{mname}_ci"] = [mv.ci_low, mv.ci_high]
        out[f"retained_pct{suffix}"] = kept.value
        out[f"retained_pct{suffix}_ci"] = [kept.ci_low, kept.ci_high]
        out[f"heal_gain_pct{suffix}"] = gain.value
        out[f"heal_gain_pct{suffix}_ci"] = [gain.ci_low, gain.ci_high]
    return out


def _random_healed(
    job: _Prune, task: str, orig: TaskResult, randoms: list[tuple[int, tuple[int, ...]]], measured: _Measured,
    results: dict[tuple[int, ...], dict[str, TaskResult]], metrics: list[MetricRow],
) -> dict[str, Any]:
    """Each healed seed as a scorer row; over them the median metric and `median_retained`."""
    from worker.pruning import median_retained

    options = job.options
    per_seed = {s: _scorer_healed(job, task, f"random,seed={s}", orig, measured.evaluated[k][task],
                                  results[k][task], metrics) for s, k in randoms}
    scope = f"task={task},scorer=random,variant=healed"
    out: dict[str, Any] = {"seeds": [s for s, _ in randoms]}
    healed_results = [results[k][task] for _, k in randoms]
    for mname in orig.metrics:
        suffix = "" if mname == orig.primary else f"_{mname}"
        values = [v for v in (r.metrics[mname].value for r in healed_results) if v is not None]
        mid = float(statistics.median(values)) if values else None
        kept, kept_seeds = median_retained(orig, healed_results, mname, n_boot=options.n_boot, seed=options.seed)
        metrics.append(MetricRow(scope, mname, finite_or_none(mid), n=len(values)))
        metrics.append(MetricRow(scope, f"retained_pct{suffix}", kept.value, kept.ci_low, kept.ci_high, kept.n))
        gains = [per_seed[s].get(f"heal_gain_pct{suffix}") for s, _ in randoms]
        defined = [g for g in gains if g is not None]
        gain = float(statistics.median(defined)) if defined else None
        metrics.append(MetricRow(scope, f"heal_gain_pct{suffix}", finite_or_none(gain), n=len(defined)))
        out[mname] = finite_or_none(mid)
        out[f"{mname}_per_seed"] = values
        out[f"retained_pct{suffix}"] = kept.value
        out[f"retained_pct{suffix}_ci"] = [kept.ci_low, kept.ci_high]
        out[f"retained_pct{suffix}_per_seed"] = kept_seeds
        out[f"heal_gain_pct{suffix}"] = finite_or_none(gain)
    return out


def _avss_beaten_after(job: _Prune, task: str, orig: TaskResult, rows: Mapping[str, dict[str, Any]]) -> list[str]:
    """The scorers (and the random control) whose healed model retains more than AVSS's healed one."""
    avss = rows.get("avss", {}).get("healed", {}).get("retained_pct")
    if avss is None:
        return []
    better = [
        name for name, row in rows.items()
        if name != "avss" and (v := row.get("healed", {}).get("retained_pct")) is not None and v > avss
    ]
    if better:
        job.warnings.append(
            f"AVSS still loses on {task} after healing: healed retained {avss:.4g}% against "
            + ", ".join(f"{n} {rows[n]['healed']['retained_pct']:.4g}%" for n in better)
        )
    return better


def _card(
    job: Any, key: tuple[int, ...], report: HealReport, evaluated: Mapping[str, TaskResult], archive: str,
    standalone: list[ArtifactFile],
) -> Any:
    """The healed export's model card (worker.modelcard): removed layers, the blocks LoRA tuned, the
    healing recipe and its loss, and each task's metrics on the healed model with their intervals.
    The card is also appended to `standalone` as the artifact `<archive stem>.card.md`, the copy the
    gate verdicts are written into."""
    n_blocks = len(job.block_names)
    metrics = [
        {"stage": "prune", "scope": f"task={task},scorer={job.options.export_scorer},variant=healed", "name": name,
         "value": mv.value, "ci_low": mv.ci_low, "ci_high": mv.ci_high, "n": mv.n}
        for task, res in evaluated.items() for name, mv in res.metrics.items()
    ]
    provenance = job.provenance or Provenance(base_model="unknown")

    def write(folder: Any) -> None:
        standalone.append(write_export_card(
            folder, provenance, archive, job.options.heal.push_to_hub, job.warnings, kind="healed",
            removed_layers=list(key), tuned_layers=[i for i in range(n_blocks) if i not in key], metrics=metrics,
            extra={"scorer": job.options.export_scorer, "healing": {
                k: v for k, v in vars(report).items() if isinstance(v, (int, float, str, bool, type(None)))}},
            notes=["tuned_layers are the original indices of the blocks that kept LoRA updates (merged)."],
        ))

    return write
