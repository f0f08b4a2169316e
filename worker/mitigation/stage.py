"""The `mitigate` stage: apply a mitigation method (`options.method`, one module in
`worker.mitigation.methods`) at the most hallucination-prone blocks, measure before and after
(docs/method.md section 7; paper sections 1 and 4).

Data flow (`run_mitigate_stage`):

1. Split. The hallucination stage's split (same `test_fraction`, `seed`) gives the
   training and the test questions. The training questions are divided again by
   distinct question: `tune_fraction` of them are tuned on (of those,
   `validation_fraction` only decide early stopping), the rest form the *probe part*,
   which gives the few-shot prompt and trains the detectors' probes in every evaluation.
   The test questions are never trained on and are where everything is scored.
2. Base evaluation: `analyze_hallucination(base, probe part, test)` with the detectors in
   `eval_detectors` (no per-layer probes; layer scores profiled in the short
   `Question/Answer` context); perplexity of the general text.
3. Layers: `layers` when given, else the top `top_k` by EAVSS: from the hallucination
   stage when it ran in the same analysis (its training split), else from the base
   evaluation (the probe part). Never from test labels.
4. Candidate groups for the tuning questions: the gold answer as positive; as negatives,
   the base model's own greedy answer when the lexical rules call it wrong, plus
   `negatives` gold answers of other tuning questions (never one the rules would accept).
5. Fit the method at the chosen blocks (`MitigationMethod.fit`: the model is left as it
   was, the result is a `Patch`), evaluate as in 2 with the patch applied, remove it and
   write it (with the recipe) as the artifact. With `control`, the same again for as
   many randomly chosen *other* blocks (same method, data, budget, seed). When `method`
   lists several methods, step 5 runs per method with the same base evaluation, layers,
   control layers and tuning data; the variants are then `<method>_eavss`/`<method>_random`
   and each method writes `mitigation-<method>.safetensors` (`variant_name`,
   `method_artifact_names`).
6. Report: per variant the answer accuracy, perplexity and every detector's metrics with
   bootstrap 95% intervals; paired bootstrap intervals of each variant minus base (and
   each method's EAVSS variant minus its random control) on the same test questions;
   per-answer rows of every variant.

The model is changed in place and always restored (also on failure or cancel), so the
process-level model cache is left as it was.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypedDict

import numpy as np

from app.config import JudgeEndpoint
from app.schemas import HallucinationOptions, MitigateOptions, patch_artifact_name
from worker.evaluation.bootstrap import bootstrap_ci
from worker.evaluation.calibration import auroc, brier, ece
from worker.evaluation.correctness import label_answer
from worker.evaluation.tasks import TaskResult, evaluate_perplexity
from worker.hallucination.answers import QAExample, QAItem
from worker.hallucination.generation import build_prompt, first_alias, generate
from worker.hallucination.stage import (
    HallucinationRun,
    analyze_hallucination,
    qa_item,
    question_key,
    split_examples,
)
from worker.mitigation.contrastive import CandidateGroup
from worker.mitigation.methods import METHODS, MethodInput, MitigationMethod, TuningData
from worker.modelcard import Provenance, write_model_card
from worker.modelzoo import LoadedModel
from worker.progress import PhasedProgress
from worker.scoring.agreement import Ranking
from worker.stage import (
    AnswerRecord,
    ArtifactFile,
    JobContext,
    JobFailed,
    LayerRow,
    MetricRow,
    StageResult,
    finite_or_none,
)

STAGE = "mitigate"
SCORER = "mitigation"
LEXICAL_RULES = ("exact", "contains", "token_f1", "rouge_l")
DELTA_METRICS = {"ece": ece, "brier": brier, "auroc": auroc}
TABLE_DETECTOR_METRICS = ("acc@50", "cov@50", "ece", "brier", "auroc")


class RuleParams(TypedDict):
    """The lexical correctness rules' parameters (`label_answer`'s keywords)."""

    contains_max_tokens: int
    f1_threshold: float
    rouge_threshold: float


# ------------------------------------------------------------------ data


def _split_tuning(
    train_examples: Sequence[QAExample], options: MitigateOptions
) -> tuple[list[QAExample], list[QAExample], list[QAExample]]:
    """(probe part, tuning part, validation part) by distinct question (see module doc)."""
    try:
        probe, tune = split_examples(train_examples, options.tune_fraction, options.seed)
        fit, val = split_examples(tune, options.validation_fraction, options.seed)
    except JobFailed as exc:
        raise JobFailed(
            "dataset_too_small",
            f"the mitigate stage splits the training questions into a probe part, a tuning part and a validation "
            f"part and needs at least 2 distinct questions in each split ({exc.detail}); use more examples",
        ) from exc
    return probe, fit, val


def candidate_groups(
    items: Sequence[QAItem], own_answers: Sequence[str], own_correct: Sequence[bool], n_negatives: int, seed: int,
    rules: Sequence[str], *, contains_max_tokens: int = 5, f1_threshold: float = 0.5, rouge_threshold: float = 0.3,
) -> list[CandidateGroup]:
    """One group per QA item: gold positive; own wrong answer + sampled wrong answers as negatives."""
    rng = np.random.default_rng(seed)
    golds = [first_alias(x.gold) for x in items]
    kw = RuleParams(contains_max_tokens=contains_max_tokens, f1_threshold=f1_threshold,
                    rouge_threshold=rouge_threshold)

    def wrong_for(i: int, answer: str) -> bool:
        text = answer.strip()
        return bool(text) and not label_answer(items[i].question, text, items[i].aliases, rules, None, **kw)[0]

    groups = []
    for i, x in enumerate(items):
        negatives: list[str] = []
        if not own_correct[i] and wrong_for(i, own_answers[i]):
            negatives.append(own_answers[i].strip())
        wanted = len(negatives) + n_negatives
        seen = {a.lower() for a in negatives}
        for j in rng.permutation(len(items)).tolist():
            if len(negatives) >= wanted:
                break
            cand = golds[j]
            if j == i or cand.lower() in seen or not wrong_for(i, cand):
                continue
            negatives.append(cand)
            seen.add(cand.lower())
        if negatives:
            groups.append(CandidateGroup(question=x.question, positive=golds[i], negatives=negatives))
    return groups


# ------------------------------------------------------------------ evaluation


def variant_name(method: str, where: str, several: bool) -> str:
    """A variant's name: `eavss`/`random` (the method at the EAVSS layers, at the control layers),
    `<method>_eavss`/`<method>_random` when the analysis compares several methods."""
    return f"{method}_{where}" if several else where


@dataclass
class Variant:
    """What one model variant (base, or a method at the eavss or random layers) did on the test questions."""

    name: str
    layers: list[int]
    run: HallucinationRun
    ppl: TaskResult | None
    train: dict[str, Any] | None  # the method's report (`Patch.report`)
    cost: dict[str, float] = field(default_factory=dict)  # fit and evaluation seconds, answer tokens (summary.cost)
    method: str | None = None  # None: the base model
    where: str = "base"  # "base", "eavss" or "random"

    @property
    def test_answers(self) -> list[AnswerRecord]:
        return [r for r in self.run.answers if r.split == "test"]

    @property
    def keys(self) -> list[str]:
        return [question_key(r.question) for r in self.test_answers]

    @property
    def correct(self) -> np.ndarray:
        return np.asarray([1.0 if r.correct else 0.0 for r in self.test_answers])

    @property
    def metrics(self) -> dict[tuple[str, str], MetricRow]:
        return {(m.scope, m.name): m for m in self.run.result.metrics}

    def confidence(self, detector: str) -> np.ndarray:
        return np.asarray([np.nan if r.confidence.get(detector) is None else r.confidence[detector]
                           for r in self.test_answers], dtype=np.float64)


def _paired_deltas(a: Variant, b: Variant, detectors: Sequence[str], n_boot: int, seed: int) -> list[MetricRow]:
    """`a` minus `b` on the same test questions, with paired bootstrap intervals."""
    if a.keys != b.keys:
        raise JobFailed("internal_error", "variants were scored on different test questions")
    scope = f"delta={a.name}-{b.name}"
    rows: list[MetricRow] = []

    def add(scope_: str, name: str, fn: Any, *arrays: np.ndarray, batched: bool = False) -> None:
        """A row for `fn(*arrays)` with a bootstrap interval over resampled rows of `arrays`."""
        value = fn(*(x[None, :] for x in arrays))[0] if batched else fn(*arrays)
        ci = bootstrap_ci(fn, *arrays, n_boot=n_boot, seed=seed, batched=batched)
        rows.append(MetricRow(scope=scope_, name=name, value=finite_or_none(value),
                              ci_low=finite_or_none(ci.low), ci_high=finite_or_none(ci.high), n=len(arrays[0])))

    add(scope, "accuracy", lambda ya, yb: ya.mean(axis=1) - yb.mean(axis=1), a.correct, b.correct, batched=True)
    if a.ppl is not None and b.ppl is not None:
        na, ca = (np.asarray(a.ppl.per_example[k]) for k in ("nll_sum", "tokens"))
        nb, cb = (np.asarray(b.ppl.per_example[k]) for k in ("nll_sum", "tokens"))

        def ppl_delta(na_: np.ndarray, ca_: np.ndarray, nb_: np.ndarray, cb_: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return np.exp(na_.sum(1) / ca_.sum(1)) - np.exp(nb_.sum(1) / cb_.sum(1))

        add(scope, "perplexity", ppl_delta, na, ca, nb, cb, batched=True)  # resamples the general texts
    for d in detectors:
        ca_, cb_ = a.confidence(d), b.confidence(d)
        if np.isnan(ca_).any() or np.isnan(cb_).any():
            continue
        for name, metric in DELTA_METRICS.items():
            def diff(c1: np.ndarray, y1: np.ndarray, c2: np.ndarray, y2: np.ndarray, metric: Any = metric) -> float:
                v1, v2 = metric(c1, y1), metric(c2, y2)
                return np.nan if v1 is None or v2 is None else v1 - v2

            add(f"{scope},detector={d}", name, diff, ca_, a.correct, cb_, b.correct)

        def ece_relative(c1: np.ndarray, y1: np.ndarray, c2: np.ndarray, y2: np.ndarray) -> float:
            v1, v2 = ece(c1, y1), ece(c2, y2)
            return np.nan if v1 is None or not v2 else (v1 - v2) / v2

        add(f"{scope},detector={d}", "ece_relative", ece_relative, ca_, a.correct, cb_, b.correct)
    return rows


def _variant_metrics(v: Variant) -> list[MetricRow]:
    scope = f"variant={v.name}"
    rows: list[MetricRow] = []
    # Every detector's report carries the same answer accuracy; take it once.
    acc = next((m for (_, name), m in v.metrics.items() if name == "accuracy"), None)
    if acc is not None:
        rows.append(MetricRow(scope=scope, name="accuracy", value=acc.value, ci_low=acc.ci_low,
                              ci_high=acc.ci_high, n=acc.n))
    if v.ppl is not None:
        ppl = v.ppl.metrics["perplexity"]
        rows.append(MetricRow(scope=scope, name="perplexity", value=ppl.value, ci_low=ppl.ci_low,
                              ci_high=ppl.ci_high, n=ppl.n))
    for (det_scope, name), m in v.metrics.items():
        if det_scope.startswith("detector=") and name != "accuracy":
            rows.append(MetricRow(scope=f"{scope},{det_scope}", name=name, value=m.value, ci_low=m.ci_low,
                                  ci_high=m.ci_high, n=m.n))
    return rows


def _cell(m: MetricRow | None, signed: bool = False) -> str:
    if m is None or m.value is None:
        return "n/a"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    text = fmt.format(m.value)
    if m.ci_low is not None and m.ci_high is not None:
        text += f" [{fmt.format(m.ci_low)}, {fmt.format(m.ci_high)}]"
    return text


def control_pairs(variants: Sequence[Variant]) -> list[tuple[Variant, Variant]]:
    """(method at the EAVSS layers, the same method at the random layers), per method that has its control."""
    random_of = {v.method: v for v in variants if v.where == "random"}
    return [(v, random_of[v.method]) for v in variants if v.where == "eavss" and v.method in random_of]


def before_after_table(metrics: Sequence[MetricRow], variants: Sequence[Variant], detectors: Sequence[str]) -> str:
    """Markdown: rows = metrics, columns = variants, the paired deltas against base, then each
    method's EAVSS variant against its random-layer control."""
    by = {(m.scope, m.name): m for m in metrics}
    cols = [(f"variant={v.name}", f"{v.name}" + (f" (layers {', '.join(map(str, v.layers))})" if v.layers else ""),
             False) for v in variants]
    cols += [(f"delta={v.name}-base", f"{v.name} - base", True) for v in variants if v.name != "base"]
    cols += [(f"delta={a.name}-{b.name}", f"{a.name} - {b.name}", True) for a, b in control_pairs(variants)]
    rows = [("answer accuracy", "", "accuracy"), ("perplexity (general text)", "", "perplexity")]
    for d in detectors:
        rows += [(f"{d} {name}", f",detector={d}", name) for name in TABLE_DETECTOR_METRICS]
    lines = ["| metric | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, suffix, name in rows:
        cells = []
        for scope, _, signed in cols:
            if signed and name in ("acc@50", "cov@50"):
                cells.append("")
                continue
            cells.append(_cell(by.get((scope + suffix, name)), signed))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _choose_layers(
    options: MitigateOptions, n_blocks: int, k: int, control: bool, eavss: Ranking | None, base: HallucinationRun,
) -> tuple[list[int], str, list[int]]:
    """(tuned layers, where their choice came from, control layers drawn from the others)."""
    if options.layers is not None:
        chosen, source = sorted(options.layers), "explicit"
    else:
        ranking = eavss.highest_first() if eavss else base.ranking
        source = "hallucination stage (training split)" if eavss else "base evaluation (probe part)"
        chosen = sorted(int(i) for i in ranking[:k])
    rng = np.random.default_rng(options.seed)
    others = [i for i in range(n_blocks) if i not in chosen]
    control_layers = sorted(int(i) for i in rng.choice(others, size=k, replace=False)) if control else []
    return chosen, source, control_layers


def _tuning_groups(
    loaded: LoadedModel, plan: Plan, shots: Sequence[tuple[str, str]], hopts: HallucinationOptions,
    options: MitigateOptions, ctx: JobContext, on_batch: Callable[[int, int], None],
) -> TuningData:
    """Candidate groups from the base model's own greedy answers (same prompt as the
    evaluation) to the tuning and validation questions, labelled by the lexical rules."""
    fit_items = [qa_item(e, f"tuning example {i}") for i, e in enumerate(plan.fit_part)]
    val_items = [qa_item(e, f"validation example {i}") for i, e in enumerate(plan.val_part)]
    items = fit_items + val_items
    prompts = [build_prompt(x.question, shots, instruction=hopts.instruction, tokenizer=loaded.tokenizer,
                            use_chat_template=hopts.use_chat_template) for x in items]
    own = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=hopts.max_new_tokens,
                   batch_size=hopts.batch_size, seed=options.seed, ctx=ctx, on_batch=on_batch).generations
    rules = [r for r in hopts.correctness_rules if r in LEXICAL_RULES]
    rule_kw = RuleParams(contains_max_tokens=hopts.contains_max_tokens, f1_threshold=hopts.f1_threshold,
                         rouge_threshold=hopts.rouge_threshold)
    own_correct = [label_answer(x.question, g.text, x.aliases, rules, None, **rule_kw)[0]
                   for x, g in zip(items, own, strict=True)]
    groups = candidate_groups(items, [g.text for g in own], own_correct, options.negatives, options.seed,
                              rules, **rule_kw)
    fit_questions = {x.question for x in fit_items}
    return TuningData(
        fit=[g for g in groups if g.question in fit_questions],
        val=[g for g in groups if g.question not in fit_questions],
        own_wrong=sum(1 for c in own_correct if not c),
        negatives_mean=float(np.mean([len(g.negatives) for g in groups])) if groups else 0.0,
    )


# ------------------------------------------------------------------ the stage


@dataclass
class Plan:
    """The data parts and the number of blocks to tune, checked before any work."""

    probe_part: list[QAExample]
    fit_part: list[QAExample]
    val_part: list[QAExample]
    n_blocks: int
    k: int  # blocks per tuned variant
    control: bool  # also tune k random other blocks


def _plan(loaded: LoadedModel, train_examples: Sequence[QAExample], options: MitigateOptions, warnings: list[str]) -> Plan:
    probe_part, fit_part, val_part = _split_tuning(train_examples, options)
    n_blocks = len(loaded.adapter.blocks(loaded.model))
    if options.layers is not None:
        bad = [i for i in options.layers if i >= n_blocks]
        if bad:
            raise JobFailed("invalid_layers", f"layers {bad} do not exist: the model has blocks 0-{n_blocks - 1}")
    k = len(options.layers) if options.layers is not None else min(options.top_k, n_blocks)
    control = options.control and n_blocks > k
    if options.control and not control:
        warnings.append("control skipped: every block is tuned, so no other blocks are left to choose from")
    return Plan(probe_part, fit_part, val_part, n_blocks, k, control)


@dataclass
class _Evaluation:
    """How every variant is evaluated: the hallucination analysis on the probe part and
    the test split (module doc, step 2), and perplexity of the general text."""

    loaded: LoadedModel
    test_examples: Sequence[QAExample]
    probe_part: list[QAExample]
    options: HallucinationOptions  # the hallucination options with the mitigate evaluation's changes
    perplexity_texts: list[str]
    n_boot: int
    seed: int
    dataset_name: str | None
    progress: PhasedProgress
    judges: Mapping[str, JudgeEndpoint] | None = None
    UNITS: ClassVar[int] = 40
    PPL_UNITS: ClassVar[int] = 4

    def __call__(self, name: str, layers: list[int], train: dict[str, Any] | None) -> Variant:
        started = time.monotonic()
        run = analyze_hallucination(self.loaded, self.probe_part, self.test_examples, self.options,
                                    self.progress.sub_context(self.UNITS), dataset_name=self.dataset_name,
                                    judges=self.judges)
        seconds = time.monotonic() - started
        tokens = sum(r.n_tokens for r in run.answers)
        cost = {"eval_seconds": round(seconds, 2), "answers": float(len(run.answers)), "answer_tokens": float(tokens),
                "answer_tokens_per_eval_second": round(tokens / seconds, 3) if seconds > 0 else 0.0}
        sub = self.progress.sub_context(self.PPL_UNITS)
        ppl = None
        if self.perplexity_texts:
            ppl = evaluate_perplexity(self.loaded.model, self.loaded.tokenizer, self.perplexity_texts, ctx=sub,
                                      n_boot=self.n_boot, seed=self.seed)
        return Variant(name, layers, run, ppl, train, cost)


def run_mitigate_stage(
    loaded: LoadedModel,
    train_examples: Sequence[QAExample],
    test_examples: Sequence[QAExample],
    options: MitigateOptions | None = None,
    ctx: JobContext | None = None,
    *,
    hallucination_options: HallucinationOptions | None = None,
    eavss: Ranking | None = None,
    perplexity_texts: Sequence[str] = (),
    dataset_name: str | None = None,
    judges: Mapping[str, JudgeEndpoint] | None = None,
    provenance: Provenance | None = None,
) -> StageResult:
    """The mitigate stage (module doc). `eavss`: the EAVSS ranking of a hallucination stage of
    the same analysis (None: ranked by the base evaluation). `judges`: the operator's
    (`Settings.judges`), for the evaluations when the hallucination options name one.
    `provenance`: for the model card that travels with the patch (`mitigation_card.md`)."""
    options = options or MitigateOptions()
    ctx = ctx or JobContext()
    hopts = hallucination_options or HallucinationOptions()
    if not loaded.is_causal_lm:
        raise JobFailed("model_unsupported", "the mitigate stage generates answers, so it needs a causal language model")
    started = time.monotonic()
    warnings: list[str] = []
    methods = [METHODS[name] for name in options.methods]
    plan = _plan(loaded, train_examples, options, warnings)
    fits_per_method = 2 if plan.control else 1
    units_eval = _Evaluation.UNITS + _Evaluation.PPL_UNITS
    progress = PhasedProgress(ctx, STAGE, (1 + len(methods) * fits_per_method) * units_eval + 5
                              + fits_per_method * sum(m.units for m in methods))
    evaluate = _Evaluation(
        loaded, test_examples, plan.probe_part,
        hopts.model_copy(update={"detectors": list(options.eval_detectors), "layer_probes": False,
                                 "profile_context": "question"}),
        list(perplexity_texts), options.n_boot, options.seed, dataset_name, progress, judges,
    )
    base = evaluate("base", [], None)
    warnings.extend(f"base evaluation: {w}" for w in base.run.result.warnings)
    chosen, source, control_layers = _choose_layers(options, plan.n_blocks, plan.k, plan.control, eavss, base.run)
    data = _tuning_groups(loaded, plan, base.run.shots, hopts, options, ctx, progress.phase(5))
    recipe = {
        "base_model": loaded.name, "base_source": loaded.source,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "options": options.model_dump(mode="json"),
        "hallucination_options": {k_: v for k_, v in evaluate.options.model_dump(mode="json").items() if k_ != "judge"},
        "dataset": dataset_name, "tuning_questions": len(data.fit), "validation_questions": len(data.val),
        "layer_source": source,
    }
    variants: list[Variant] = []
    artifacts: list[ArtifactFile] = []
    weight_change: dict[str, dict[int, float]] = {}
    several = options.compares_methods
    for method in methods:
        tuned = [("eavss", chosen)] + ([("random", control_layers)] if plan.control else [])
        fitted = _fit_and_evaluate(method, loaded, tuned, data, options, ctx, progress, evaluate,
                                   {**recipe, "method": method.name}, warnings, several)
        variants += fitted.variants
        artifacts += fitted.artifacts
        weight_change.update(fitted.weight_change)
    metrics = _report_metrics([base, *variants], options)
    table = before_after_table(metrics, [base, *variants], options.eval_detectors)
    artifacts.append(ArtifactFile("before_after.md", "text/markdown", table.encode()))
    for method in methods:
        artifacts.append(_patch_card(provenance or Provenance(base_model=loaded.name, source=loaded.source),
                                     method.name, chosen, metrics, several))
    from worker.plots import mitigation_figure, stage_figures  # matplotlib only when a stage draws

    artifacts.extend(stage_figures(warnings, STAGE, lambda: mitigation_figure(metrics, detectors=options.eval_detectors)))
    answers = [replace(r, scope=f"variant={v.name}") for v in (base, *variants) for r in v.test_answers]
    rank_of = {layer: i + 1 for i, layer in enumerate(eavss.highest_first() if eavss else base.run.ranking)}
    layer_rows = _layer_rows(loaded, rank_of, chosen, control_layers, weight_change)
    summary = _summary(loaded, plan, data, [base, *variants], metrics, table, chosen, source, control_layers,
                       options, dataset_name)
    summary["seconds"] = round(time.monotonic() - started, 2)
    progress.finish()
    return StageResult(stage=STAGE, layers=layer_rows, metrics=metrics, artifacts=artifacts, summary=summary,
                       warnings=warnings, answers=answers)


def method_artifact_names(method: str, several: bool) -> tuple[str, str, str]:
    """(patch, recipe, card) artifact names of a method's EAVSS variant."""
    suffix = f"-{method}" if several else ""
    return patch_artifact_name(method if several else None), f"mitigation_recipe{suffix}.json", \
        f"mitigation_card{suffix}.md"


@dataclass
class _Fitted:
    variants: list[Variant]
    artifacts: list[ArtifactFile]
    weight_change: dict[str, dict[int, float]]  # variant name -> block -> relative weight change


def _fit_and_evaluate(
    method: MitigationMethod, loaded: LoadedModel, tuned: Sequence[tuple[str, list[int]]], data: TuningData,
    options: MitigateOptions, ctx: JobContext, progress: PhasedProgress, evaluate: _Evaluation,
    recipe: dict[str, Any], warnings: list[str], several: bool,
) -> _Fitted:
    """Per (where, layers) of `tuned`: fit the method at the layers, evaluate with the patch applied
    and remove it (also on failure or cancel), and write the eavss variant's patch (module doc, step 5)."""
    out = _Fitted([], [], {})
    for where, layers in tuned:
        name = variant_name(method.name, where, several)
        started = time.monotonic()
        patch = method.fit(MethodInput(loaded, where, list(layers), data, options, ctx,
                                       on_step=progress.phase(method.units)))
        fit_seconds = time.monotonic() - started
        warnings.extend(f"{name}: {w}" for w in patch.warnings)
        change = patch.weight_change(loaded)
        if change is not None:
            out.weight_change[name] = change
        with patch.applied(loaded):
            out.variants.append(replace(evaluate(name, list(layers), patch.report), method=method.name, where=where))
        out.variants[-1].cost["fit_seconds"] = round(fit_seconds, 2)
        if where == "eavss":
            full = {**recipe, "layers": list(layers), "training": patch.report}
            patch_name, recipe_name, _ = method_artifact_names(method.name, several)
            out.artifacts.append(ArtifactFile(patch_name, "application/octet-stream", patch.to_bytes(full)))
            out.artifacts.append(ArtifactFile(recipe_name, "application/json",
                                              json.dumps(full, indent=1, default=str).encode()))
    return out


def _patch_card(
    provenance: Provenance, method: str, layers: Sequence[int], metrics: Sequence[MetricRow], several: bool,
) -> ArtifactFile:
    """The model card of the patched model (base + the method's patch through `model.patch`):
    base model, analysis, tuned layers, the method and its before/after metrics with intervals
    (with several methods, only base and this method's variants)."""
    patch_name, _, card_name = method_artifact_names(method, several)
    if several:
        mine = ("variant=base", f"variant={method}_", f"delta={method}_")
        metrics = [m for m in metrics if m.scope.startswith(mine)]
    selector = f", `model.patch.method: {method}`" if several else ""
    with tempfile.TemporaryDirectory() as folder:
        path = write_model_card(
            folder, provenance, kind="patched", tuned_layers=list(layers), metrics=metrics,
            extra={"method": method, "patch_artifact": patch_name},
            notes=[f"The weights are the base model's with `{patch_name}` applied at load (`model.patch`{selector}); "
                   "the patch refuses any other base."],
            card_artifact=card_name,
        )
        return ArtifactFile(card_name, "text/markdown", path.read_bytes())


# ------------------------------------------------------------------ report


def _report_metrics(variants: Sequence[Variant], options: MitigateOptions) -> list[MetricRow]:
    """Per variant its metrics, then each tuned variant minus base, then each method's eavss minus random."""
    detectors = list(options.eval_detectors)
    base = variants[0]
    metrics = [m for v in variants for m in _variant_metrics(v)]
    for v in variants[1:]:
        metrics.extend(_paired_deltas(v, base, detectors, options.n_boot, options.seed))
    for eavss, control in control_pairs(variants):
        metrics.extend(_paired_deltas(eavss, control, detectors, options.n_boot, options.seed))
    return metrics


def _layer_rows(
    loaded: LoadedModel, rank_of: dict[int, int], chosen: Sequence[int], control_layers: Sequence[int],
    weight_change: dict[str, dict[int, float]],
) -> list[LayerRow]:
    return [
        LayerRow(layer=b.index, block_name=b.name, scorer=SCORER, values={
            "eavss_rank": int(rank_of[b.index]) if b.index in rank_of else None,
            "tuned": b.index in chosen,
            "control": b.index in control_layers,
            # The first variant that changed the block's weights (eavss and its control tune disjoint blocks).
            "weight_change": next((c[b.index] for c in weight_change.values() if b.index in c), None),
        })
        for b in loaded.adapter.blocks(loaded.model)
    ]


def _summary(
    loaded: LoadedModel, plan: Plan, data: TuningData, variants: Sequence[Variant], metrics: Sequence[MetricRow],
    table: str, chosen: list[int], source: str, control_layers: list[int], options: MitigateOptions,
    dataset_name: str | None,
) -> dict[str, Any]:
    delta = {(m.scope, m.name): m for m in metrics}
    return {
        "dataset": dataset_name,
        "model": loaded.name,
        "layers": chosen,
        "layer_source": source,
        "control_layers": control_layers,
        "counts": {
            "probe_examples": len(plan.probe_part), "tuning_questions": len(data.fit),
            "validation_questions": len(data.val), "test_answered": len(variants[0].test_answers),
            "own_wrong_answers_as_negatives": data.own_wrong, "negatives_mean": data.negatives_mean,
        },
        "method": options.method,
        "methods": options.methods,
        "training": {v.name: v.train for v in variants if v.train is not None},
        # Cost per variant: the method's fit and the evaluation (the hallucination analysis of the probe
        # part and the test split: answers, profile, probes); for a decoding method the evaluation's
        # answer tokens per second against base's is its decoding cost (bench/bench_generation.py
        # times the generation alone).
        "cost": {v.name: v.cost for v in variants},
        "table_markdown": table,
        "headline": {
            v.name: {
                "accuracy_delta": _as_dict(delta.get((f"delta={v.name}-base", "accuracy"))),
                "perplexity_delta": _as_dict(delta.get((f"delta={v.name}-base", "perplexity"))),
            }
            for v in variants[1:]
        },
        "eval_options": {"detectors": list(options.eval_detectors), "profile_context": "question",
                         "layer_probes": False},
    }


def _as_dict(m: MetricRow | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {"value": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high, "n": m.n}
