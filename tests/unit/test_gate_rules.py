"""The gate rule language: parsing (errors name the rule) and evaluation (missing data fails)."""

from __future__ import annotations

import pytest

from app.gates import (
    LayerRecord,
    MetricRecord,
    RuleError,
    RuleIndexError,
    Snapshot,
    evaluate,
    format_path,
    parse_rule,
    parse_rules,
)


def snapshot() -> Snapshot:
    return Snapshot(
        metrics=[
            MetricRecord("prune", "task=perplexity,scorer=avss", "retained_pct", 93.0, 88.5, 96.0, 64),
            MetricRecord("prune", "task=perplexity,scorer=gbis,variant=healed", "retained_pct", 97.0, 95.0, 99.0, 64),
            MetricRecord("prune", "task=perplexity,scorer=avss", "perplexity", 21.5, 20.0, 23.0, 64),
            MetricRecord("prune", "task=perplexity,scorer=random", "retained_pct", 80.0),
            MetricRecord("prune", "scorer=avss", "speedup", 1.3),
            MetricRecord("hallucination", "detector=eavss_probe", "ece", 0.08, 0.05, 0.12, 200),
            MetricRecord("hallucination", "detector=eavss_probe", "acc@12.5", 0.7, 0.6, 0.8, 200),
            MetricRecord("hallucination", "detector=length", "auroc", None, None, None, 200),
            MetricRecord("avss", "avss", "prune_count", 2.0, n=8),
            MetricRecord("mitigate", "delta=eavss-base", "accuracy", -0.023, -0.05, 0.003, 300),
            MetricRecord("mitigate", "variant=eavss", "perplexity", 73.1, 35.2, 174.9, 64),
        ],
        layers=[
            LayerRecord("avss", "avss", i, {"avss": float(i), "block_output.variance": 10.0 - i, "gap": None})
            for i in range(4)
        ],
        warnings=["[profile] something", "[prune] AVSS loses on perplexity"],
        summary={
            "avss": {"prune_layers": [0, 1], "n_layers": 4, "ok": True, "strategy": "one_shot"},
            "profile": {},
            "prune": {"table": [{"task": "perplexity", "original": 20.1}]},
        },
    )


def check(rule: str, snap: Snapshot | None = None) -> dict:
    passed, results = evaluate([parse_rule(rule)], snap or snapshot())
    assert passed == results[0].passed
    return results[0].as_dict()


@pytest.mark.parametrize(
    ("rule", "observed", "passed"),
    [
        ("retained_performance.perplexity >= 0.9", 0.93, True),
        ("retained_performance.perplexity.random >= 0.9", 0.8, False),
        ("retained_performance.perplexity.avss.ci_low >= 0.9", 0.885, False),
        ("retained_performance.perplexity.ci_high >= 0.95", 0.96, True),
        ("retained_performance.perplexity.avss.n >= 64", 64.0, True),
        ("retained_performance.perplexity.gbis.healed.ci_low >= 0.9", 0.95, True),
        ("retained_performance.perplexity.gbis.healed > 0.96", 0.97, True),
        ("hallucination.eavss_probe.ece <= 0.1", 0.08, True),
        ("hallucination.eavss_probe.ece.ci_high <= 0.1", 0.12, False),
        ('hallucination.eavss_probe."acc@12.5" > 0.5', 0.7, True),
        ("layers.avss.warnings == 0", 0.0, True),
        ("layers.prune.warnings == 0", 1.0, False),
        ("warnings.profile <= 1", 1.0, True),
        ("warnings < 2", 2.0, False),
        ("metrics.prune.task=perplexity,scorer=avss.perplexity < 22", 21.5, True),
        ('metrics.prune."task=perplexity,scorer=avss".perplexity.n >= 64', 64.0, True),
        ("metrics.prune.task=perplexity,scorer=avss.perplexity.ci_low >= 20.5", 20.0, False),
        ("metrics.avss.avss.prune_count!=0", 2.0, True),
        ("pruning.avss.speedup > 1.2", 1.3, True),
        ("mitigation.eavss-base.accuracy.ci_low > 0", -0.05, False),
        ("mitigation.eavss-base.accuracy >= -0.03", -0.023, True),
        ("mitigation.eavss.perplexity.n == 64", 64.0, True),
        ("layers.avss.avss.avss.max == 3", 3.0, True),
        ("layers.avss.avss.avss.min == 0", 0.0, True),
        ("layers.avss.avss.avss.mean == 1.5", 1.5, True),
        ("layers.avss.avss.avss.sum == 6", 6.0, True),
        ("layers.avss.avss.avss.count == 4", 4.0, True),
        ("layers.avss.avss.gap.count == 0", 0.0, True),
        ('layers.avss.avss."block_output.variance".2 == 8', 8.0, True),
        ("summary.avss.n_layers == 4", 4.0, True),
        ("summary.avss.prune_layers.length <= 2", 2.0, True),
        ("summary.avss.prune_layers.1 == 1", 1.0, True),
        ("summary.avss.ok == 1", 1.0, True),
        ('summary.avss.strategy == "one_shot"', "one_shot", True),
        ("summary.prune.table.0.original < 25", 20.1, True),
    ],
)
def test_paths_and_aliases(rule: str, observed: float | str, passed: bool) -> None:
    result = check(rule)
    assert result["observed"] == pytest.approx(observed) if isinstance(observed, float) else result["observed"] == observed
    assert result["passed"] is passed, result


def test_metric_rules_report_the_interval_and_n() -> None:
    result = check("hallucination.eavss_probe.ece <= 0.1")
    assert (result["ci_low"], result["ci_high"], result["n"]) == (0.05, 0.12, 200)
    assert result["source"] == "metrics.hallucination.detector=eavss_probe.ece"
    assert result["threshold"] == 0.1 and result["op"] == "<="
    retained = check("retained_performance.perplexity >= 0.9")
    assert retained["source"].endswith("retained_pct / 100")
    # the interval is a fraction too (the verdict shows it, not `-`), with its N
    assert (retained["ci_low"], retained["ci_high"], retained["n"]) == (pytest.approx(0.885), pytest.approx(0.96), 64)
    healed = check("retained_performance.perplexity.avss.healed >= 0.9")
    assert healed["passed"] is False and "variant=healed" in healed["reason"]


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ("hallucination.p_ik.ece <= 0.1", "no metric scope 'detector=p_ik'"),
        ("hallucination.length.auroc >= 0.5", "undefined"),
        ("hallucination.eavss_probe.brier <= 0.3", "no metric 'brier'"),
        ("retained_performance.mmlu >= 0.9", "no metric scope"),
        ("metrics.eval.x.y > 0", "stage 'eval' has no results"),
        ("layers.eval.warnings == 0", "did not run"),
        ("warnings.eval == 0", "did not run"),
        ("layers.avss.avss.gap.max < 1", "no layer of avss/avss has a defined 'gap'"),
        ("layers.avss.avss.nothing.count > 0", "no layer of avss/avss has 'nothing'"),
        ("layers.avss.eavss.avss.max < 1", "no layer rows for scorer 'eavss'"),
        ("layers.avss.avss.avss.9 < 1", "no layer 9"),
        ("summary.avss.missing == 1", "summary.avss has no 'missing'"),
        ("summary.avss.prune_layers == 2", "add .length"),
        ("summary.hallucination.x == 1", "summary has no 'hallucination'"),
        ("mitigation.random-base.accuracy > 0", "no metric scope 'delta=random-base'"),
    ],
)
def test_missing_data_fails_with_a_reason(rule: str, reason: str) -> None:
    result = check(rule)
    assert result["observed"] is None and result["passed"] is False
    assert result["reason"].startswith("missing data") and reason in result["reason"], result["reason"]


def test_missing_data_fails_even_for_not_equal() -> None:
    assert check("hallucination.p_ik.ece != 0.5")["passed"] is False


def test_verdict_passes_only_when_every_rule_passes() -> None:
    rules = parse_rules(["retained_performance.perplexity >= 0.9", "layers.avss.warnings == 0"])
    passed, results = evaluate(rules, snapshot())
    assert passed and all(r.passed for r in results)
    rules.append(parse_rule("hallucination.eavss_probe.ece <= 0.01"))
    passed, results = evaluate(rules, snapshot())
    assert not passed and [r.passed for r in results] == [True, True, False]
    assert evaluate([], snapshot())[0] is False


def test_string_and_number_do_not_compare() -> None:
    result = check('summary.avss.n_layers == "4"')
    assert result["passed"] is False and "cannot compare" in result["reason"]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("", "empty"),
        ("retained_performance.perplexity", "no operator"),
        ("retained_performance.perplexity >=", "no threshold"),
        ("retained_performance.perplexity => 0.9", "cannot parse"),
        ("speed.avss > 1", "unknown path root 'speed'"),
        ("metrics.prune.x > 1", "does not fit metrics.<stage>.<scope>.<name>"),
        ("metrics.prune.a.b.ci_mid > 1", "does not fit"),
        ("layers.avss.avss.avss.median > 1", "does not fit layers"),
        ("mitigation.eavss > 0", "does not fit mitigation.<variant or a-b>.<name>"),
        ("layers.avss > 1", "does not fit"),
        ("hallucination.eavss_probe > 1", "does not fit"),
        ("summary.avss > 1", "does not fit"),
        ("warnings.a.b == 0", "does not fit"),
        ("retained_performance.perplexity.avss.healed.x.n > 1", "does not fit"),
        ("retained_performance.perplexity.avss.x > 1", "does not fit"),
        ('summary.avss.strategy > "a"', "only works with == or !="),
        ("metrics.a.b.c > 1e999", "finite"),
        ("x" * 600 + " > 1", "over 500"),
        ('metrics.a."unterminated.c > 1', "cannot parse"),
    ],
)
def test_bad_rules_are_refused_with_a_reason(rule: str, message: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rule(rule)
    assert message in str(info.value), str(info.value)


def test_parse_rules_names_the_bad_rule() -> None:
    with pytest.raises(RuleIndexError) as info:
        parse_rules(["warnings == 0", "retained_performance.perplexity ~ 0.9"])
    assert info.value.index == 1 and info.value.text == "retained_performance.perplexity ~ 0.9"
    assert "rule 1" in str(info.value)


def test_quoting_round_trips() -> None:
    rule = parse_rule(r'metrics.s."a.b c\"d".n >= 1')
    assert rule.path == ("metrics", "s", 'a.b c"d', "n")
    assert parse_rule(format_path(rule.path) + " >= 1").path == rule.path
    assert parse_rule("metrics.x.seed=1.y==2").path == ("metrics", "x", "seed=1", "y")
    assert parse_rule("warnings==0").threshold == 0.0
    assert parse_rule("warnings >= -1.5e-3").threshold == -1.5e-3
