"""What the MLflow run holds: metric keys, intervals as separate metrics, per-layer column tables."""

from __future__ import annotations

import math

from worker.service.mlflow_registry import layer_tables, metric_key, metric_values


def test_metric_key_replaces_what_mlflow_keys_may_not_hold() -> None:
    assert metric_key("prune", "task=perplexity,scorer=avss", "retained_pct") == "prune.task_perplexity_scorer_avss.retained_pct"
    assert metric_key("avss", "", "prune_count") == "avss.prune_count"


def test_intervals_and_n_are_separate_metrics_and_non_finite_values_are_left_out() -> None:
    rows = [
        {"stage": "prune", "scope": "task=qa,scorer=avss", "name": "f1", "value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 32},
        {"stage": "prune", "scope": "scorer=avss", "name": "speedup", "value": math.inf, "ci_low": None, "ci_high": None,
         "n": None},
    ]
    assert metric_values(rows) == {
        "prune.task_qa_scorer_avss.f1": 0.5, "prune.task_qa_scorer_avss.f1.ci_low": 0.4,
        "prune.task_qa_scorer_avss.f1.ci_high": 0.6, "prune.task_qa_scorer_avss.f1.n": 32.0,
    }


def test_layer_tables_one_per_stage_and_scorer_in_layer_order() -> None:
    rows = [
        {"stage": "prune", "scorer": "gbis", "layer": 1, "block_name": "model.layers.1", "values": {"score": 0.2}},
        {"stage": "prune", "scorer": "gbis", "layer": 0, "block_name": "model.layers.0", "values": {"score": 0.9, "rank": 1}},
        {"stage": "avss", "scorer": "avss", "layer": 0, "block_name": "model.layers.0", "values": {"avss": 1.5}},
    ]
    tables = layer_tables(rows)
    assert set(tables) == {"prune-gbis", "avss-avss"}
    assert tables["prune-gbis"] == {"layer": [0, 1], "block": ["model.layers.0", "model.layers.1"],
                                    "rank": [1, None], "score": [0.9, 0.2]}
