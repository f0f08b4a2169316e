"""The `mitigate` stage: tune the most hallucination-prone blocks, measure before and after
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
5. Tune the chosen blocks (`contrastive.train_blocks`), evaluate as in 2, write the patch
   (tuned blocks only, with the recipe) and restore the base weights. With `control`,
   the same again for as many randomly chosen *other* blocks (same data, steps, seed).
6. Report: per variant the answer accuracy, perplexity and every detector's metrics with
   bootstrap 95% intervals; paired bootstrap intervals of each variant minus base (and
   EAVSS minus random) on the same test questions; per-answer rows of every variant.

The model is changed in place and always restored (also on failure or cancel), so the
process-level model cache is left as it was.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.schemas import PATCH_ARTIFACT, HallucinationOptions, MitigateOptions
from worker.evaluation.bootstrap import bootstrap_ci
from worker.evaluation.calibration import auroc, brier, ece
from worker.evaluation.correctness import label_answer
from worker.evaluation.tasks import evaluate_perplexity
from worker.hallucination.generation import build_prompt, first_alias, generate
from worker.hallucination.stage import analyze_hallucination, qa_item, question_key, split_examples
from worker.mitigation.contrastive import CandidateGroup, TrainReport, train_blocks
from worker.mitigation.patch import block_parameters, restore, save_patch, snapshot, tensor_digest
from worker.progress import PhasedProgress
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


# ------------------------------------------------------------------ data


def _split_tuning(train_examples: Sequence[Any], options: MitigateOptions) -> tuple[list, list, list]:
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
    items: Sequence[Any], own_answers: Sequence[str], own_correct: Sequence[bool], n_negatives: int, seed: int,
    rules: Sequence[str], *, contains_max_tokens: int = 5, f1_threshold: float = 0.5, rouge_threshold: float = 0.3,
) -> list[CandidateGroup]:
    """One group per QA item: gold positive; own wrong answer + sampled wrong answers as negatives."""
    rng = np.random.default_rng(seed)
    golds = [first_alias(x.gold) for x in items]
    kw = {"contains_max_tokens": contains_max_tokens, "f1_threshold": f1_threshold, "rouge_threshold": rouge_threshold}

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


class _Variant:
    """What one model variant (base, eavss, random) did on the test questions."""

    def __init__(self, name: str, layers: list[int], run: Any, ppl: Any, train: TrainReport | None) -> None:
        self.name, self.layers, self.run, self.ppl, self.train = name, layers, run, ppl, train
        test = [r for r in run.answers if r.split == "test"]
        self.test_answers = test
        self.keys = [question_key(r.question) for r in test]
        self.correct = np.asarray([1.0 if r.correct else 0.0 for r in test])
        self.metrics = {(m.scope, m.name): m for m in run.result.metrics}

    def confidence(self, detector: str) -> np.ndarray:
        return np.asarray([np.nan if r.confidence.get(detector) is None else r.confidence[detector]
                           for r in self.test_answers], dtype=np.float64)


def _paired_deltas(a: _Variant, b: _Variant, detectors: Sequence[str], n_boot: int, seed: int) -> list[MetricRow]:
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


def _variant_metrics(v: _Variant) -> list[MetricRow]:
    scope = f"variant={v.name}"
    rows: list[MetricRow] = []
    # Every detector's report carries the same answer accuracy; take it once.
    acc = next((m for (_, name), m in v.metrics.items() if name == "accuracy"), None)
    if acc is not None:
        rows.append(MetricRow(scope=scope, name="accuracy", value=acc.value, ci_low=acc.ci_low,
                              ci_high=acc.ci_high, n=acc.n))
    if v.ppl is not None:
        m = v.ppl.metrics["perplexity"]
        rows.append(MetricRow(scope=scope, name="perplexity", value=m.value, ci_low=m.ci_low,
                              ci_high=m.ci_high, n=m.n))
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


def before_after_table(metrics: Sequence[MetricRow], variants: Sequence[_Variant], detectors: Sequence[str]) -> str:
    """Markdown: rows = metrics, columns = variants then the paired deltas against base."""
    by = {(m.scope, m.name): m for m in metrics}
    cols = [(f"variant={v.name}", f"{v.name}" + (f" (layers {', '.join(map(str, v.layers))})" if v.layers else ""),
             False) for v in variants]
    cols += [(f"delta={v.name}-base", f"{v.name} - base", True) for v in variants if v.name != "base"]
    if any(v.name == "random" for v in variants):
        cols.append(("delta=eavss-random", "eavss - random", True))
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
    options: MitigateOptions, n_blocks: int, k: int, control: bool,
    eavss_ranking: Sequence[int] | None, base_ranking: Sequence[int],
) -> tuple[list[int], str, list[int]]:
    """(tuned layers, where their choice came from, control layers drawn from the others)."""
    if options.layers is not None:
        chosen, source = sorted(options.layers), "explicit"
    else:
        ranking = list(eavss_ranking) if eavss_ranking else list(base_ranking)
        source = "hallucination stage (training split)" if eavss_ranking else "base evaluation (probe part)"
        chosen = sorted(int(i) for i in ranking[:k])
    rng = np.random.default_rng(options.seed)
    others = [i for i in range(n_blocks) if i not in chosen]
    control_layers = sorted(int(i) for i in rng.choice(others, size=k, replace=False)) if control else []
    return chosen, source, control_layers


def _tuning_groups(
    loaded: Any, fit_part: Sequence[Any], val_part: Sequence[Any], shots: Sequence[tuple[str, str]],
    hopts: HallucinationOptions, options: MitigateOptions, ctx: JobContext, on_batch: Any,
) -> tuple[list[CandidateGroup], list[CandidateGroup], int, list[CandidateGroup]]:
    """Candidate groups of the tuning and validation questions, from the base model's own
    greedy answers (same prompt as the evaluation) labelled by the lexical rules.
    Returns (tuning groups, validation groups, own wrong answers, all groups)."""
    fit_items = [qa_item(e, f"tuning example {i}") for i, e in enumerate(fit_part)]
    val_items = [qa_item(e, f"validation example {i}") for i, e in enumerate(val_part)]
    items = fit_items + val_items
    prompts = [build_prompt(x.question, shots, instruction=hopts.instruction, tokenizer=loaded.tokenizer,
                            use_chat_template=hopts.use_chat_template) for x in items]
    own = generate(loaded, prompts, max_new_tokens=hopts.max_new_tokens, batch_size=hopts.batch_size,
                   seed=options.seed, ctx=ctx, on_batch=on_batch).generations
    rules = [r for r in hopts.correctness_rules if r in LEXICAL_RULES]
    rule_kw = {"contains_max_tokens": hopts.contains_max_tokens, "f1_threshold": hopts.f1_threshold,
               "rouge_threshold": hopts.rouge_threshold}
    own_correct = [label_answer(x.question, g.text, x.aliases, rules, None, **rule_kw)[0]
                   for x, g in zip(items, own, strict=True)]
    groups = candidate_groups(items, [g.text for g in own], own_correct, options.negatives, options.seed,
                              rules, **rule_kw)
    fit_questions = {x.question for x in fit_items}
    fit_groups = [g for g in groups if g.question in fit_questions]
    val_groups = [g for g in groups if g.question not in fit_questions]
    return fit_groups, val_groups, sum(1 for c in own_correct if not c), groups


# ------------------------------------------------------------------ the stage


def run_mitigate_stage(
    loaded: Any,
    train_examples: Sequence[Any],
    test_examples: Sequence[Any],
    options: MitigateOptions | None = None,
    ctx: JobContext | None = None,
    *,
    hallucination_options: HallucinationOptions | None = None,
    eavss_ranking: Sequence[int] | None = None,
    perplexity_texts: Sequence[str] = (),
    dataset_name: str | None = None,
) -> StageResult:
    """The mitigate stage (module doc). `eavss_ranking`: block indices, most hallucination-prone
    first, from a hallucination stage of the same analysis (None: from the base evaluation)."""
    options = options or MitigateOptions()
    ctx = ctx or JobContext()
    hopts = hallucination_options or HallucinationOptions()
    if not getattr(loaded, "is_causal_lm", False):
        raise JobFailed("model_unsupported", "the mitigate stage generates answers, so it needs a causal language model")
    started = time.monotonic()
    warnings: list[str] = []
    eval_opts = hopts.model_copy(update={
        "detectors": list(options.eval_detectors), "layer_probes": False, "profile_context": "question",
    })
    probe_part, fit_part, val_part = _split_tuning(train_examples, options)
    n_blocks = len(loaded.model.get_submodule(loaded.adapter.block_list_path(loaded.model)))
    if options.layers is not None:
        bad = [i for i in options.layers if i >= n_blocks]
        if bad:
            raise JobFailed("invalid_layers", f"layers {bad} do not exist: the model has blocks 0-{n_blocks - 1}")
    k = len(options.layers) if options.layers is not None else min(options.top_k, n_blocks)
    control = options.control and n_blocks > k
    if options.control and not control:
        warnings.append("control skipped: every block is tuned, so no other blocks are left to choose from")

    units_eval, units_train, units_ppl = 40, 20, 4
    n_variants = 2 + (1 if control else 0)
    progress = PhasedProgress(ctx, STAGE, n_variants * (units_eval + units_ppl) + 5 + (n_variants - 1) * units_train)

    def evaluate(name: str, layers: list[int], train: TrainReport | None) -> _Variant:
        run = analyze_hallucination(loaded, probe_part, test_examples, eval_opts, progress.sub_context(units_eval),
                                    dataset_name=dataset_name)
        ppl = None
        sub = progress.sub_context(units_ppl)
        if perplexity_texts:
            ppl = evaluate_perplexity(loaded.model, loaded.tokenizer, list(perplexity_texts), ctx=sub,
                                      n_boot=options.n_boot, seed=options.seed)
        return _Variant(name, layers, run, ppl, train)

    base = evaluate("base", [], None)
    for w in base.run.result.warnings:
        warnings.append(f"base evaluation: {w}")

    chosen, source, control_layers = _choose_layers(
        options, n_blocks, k, control, eavss_ranking, base.run.result.summary["layer_scores"]["ranking"]
    )
    fit_groups, val_groups, own_wrong, groups = _tuning_groups(
        loaded, fit_part, val_part, base.run.shots, hopts, options, ctx, progress.phase(5)
    )

    # ---------------------------------------------------------------- tune, evaluate, restore
    recipe_base = {
        "base_model": getattr(loaded, "name", None), "base_source": getattr(loaded, "source", None),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "options": options.model_dump(mode="json"),
        "hallucination_options": {k_: v for k_, v in eval_opts.model_dump(mode="json").items() if k_ != "judge"},
        "dataset": dataset_name, "tuning_questions": len(fit_groups), "validation_questions": len(val_groups),
    }
    variants = [base]
    artifacts: list[ArtifactFile] = []
    weight_change: dict[str, dict[int, float]] = {}
    plan = [("eavss", chosen)] + ([("random", control_layers)] if control else [])
    for name, layers in plan:
        params = block_parameters(loaded, layers)
        saved = snapshot(params)
        try:
            report = train_blocks(loaded, layers, fit_groups, val_groups, options, ctx,
                                  on_step=progress.phase(units_train))
            if report.best_epoch == 0:
                warnings.append(f"{name}: no epoch lowered the validation loss; the tuned weights equal the base")
            tuned = snapshot(params)
            weight_change[name] = _relative_change(saved, tuned, loaded)
            variants.append(evaluate(name, list(layers), report))
            if name == "eavss":
                recipe = {**recipe_base, "layers": list(layers), "layer_source": source, "training": report.to_dict()}
                digests = {n: tensor_digest(t) for n, t in saved.items()}
                artifacts.append(ArtifactFile(PATCH_ARTIFACT, "application/octet-stream",
                                              save_patch(tuned, digests, recipe)))
                artifacts.append(ArtifactFile("mitigation_recipe.json", "application/json",
                                              json.dumps(recipe, indent=1, default=str).encode()))
        finally:
            restore(params, saved)

    # ---------------------------------------------------------------- report
    detectors = list(options.eval_detectors)
    metrics: list[MetricRow] = []
    for v in variants:
        metrics.extend(_variant_metrics(v))
    by_name = {v.name: v for v in variants}
    for v in variants[1:]:
        metrics.extend(_paired_deltas(v, base, detectors, options.n_boot, options.seed))
    if "random" in by_name:
        metrics.extend(_paired_deltas(by_name["eavss"], by_name["random"], detectors, options.n_boot, options.seed))
    table = before_after_table(metrics, variants, detectors)
    artifacts.append(ArtifactFile("before_after.md", "text/markdown", table.encode()))

    answers: list[AnswerRecord] = []
    for v in variants:
        for r in v.test_answers:
            answers.append(_with_scope(r, f"variant={v.name}"))

    base_rank = base.run.result.summary["layer_scores"]["ranking"]
    rank_of = {layer: i + 1 for i, layer in enumerate(eavss_ranking or base_rank)}
    blocks = loaded.adapter.blocks(loaded.model)
    layer_rows = [
        LayerRow(layer=b.index, block_name=b.name, scorer=SCORER, values={
            "eavss_rank": float(rank_of[b.index]) if b.index in rank_of else None,
            "tuned": 1.0 if b.index in chosen else 0.0,
            "control": 1.0 if b.index in control_layers else 0.0,
            "weight_change": weight_change.get("eavss", {}).get(b.index, weight_change.get("random", {}).get(b.index)),
        })
        for b in blocks
    ]
    delta = {(m.scope, m.name): m for m in metrics}
    summary = {
        "dataset": dataset_name,
        "model": getattr(loaded, "name", None),
        "layers": chosen,
        "layer_source": source,
        "control_layers": control_layers,
        "counts": {
            "probe_examples": len(probe_part), "tuning_questions": len(fit_groups),
            "validation_questions": len(val_groups), "test_answered": len(base.test_answers),
            "own_wrong_answers_as_negatives": own_wrong,
            "negatives_mean": float(np.mean([len(g.negatives) for g in groups])) if groups else 0.0,
        },
        "training": {v.name: v.train.to_dict() for v in variants if v.train is not None},
        "table_markdown": table,
        "headline": {
            name: {
                "accuracy_delta": _as_dict(delta.get((f"delta={name}-base", "accuracy"))),
                "perplexity_delta": _as_dict(delta.get((f"delta={name}-base", "perplexity"))),
            }
            for name in by_name if name != "base"
        },
        "eval_options": {"detectors": detectors, "profile_context": "question", "layer_probes": False},
        "seconds": round(time.monotonic() - started, 2),
    }
    progress.finish()
    return StageResult(stage=STAGE, layers=layer_rows, metrics=metrics, artifacts=artifacts, summary=summary,
                       warnings=warnings, answers=answers)


def _as_dict(m: MetricRow | None) -> dict[str, Any] | None:
    if m is None:
        return None
    return {"value": m.value, "ci_low": m.ci_low, "ci_high": m.ci_high, "n": m.n}


def _with_scope(record: AnswerRecord, scope: str) -> AnswerRecord:
    from dataclasses import replace

    return replace(record, scope=scope)


def _relative_change(before: dict[str, Any], after: dict[str, Any], loaded: Any) -> dict[int, float]:
    """Per tuned block: ||W_after - W_before|| / ||W_before|| over all its parameters."""
    path = loaded.adapter.block_list_path(loaded.model) + "."
    num: dict[int, float] = {}
    den: dict[int, float] = {}
    for name, b in before.items():
        layer = int(name[len(path):].split(".", 1)[0])
        num[layer] = num.get(layer, 0.0) + float((after[name].double() - b.double()).pow(2).sum())
        den[layer] = den.get(layer, 0.0) + float(b.double().pow(2).sum())
    return {k_: (num[k_] ** 0.5) / (den[k_] ** 0.5 or 1.0) for k_ in num}
