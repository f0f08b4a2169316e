"""The lm_eval task: lm-evaluation-harness really runs on a tiny config-built model with fixture
tasks of a few rows written here (offline: local files), agrees with our multiple_choice task
on the same rows, and fails with stable error types."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from app.config import Settings
from app.schemas import LmEvalOptions, ModelSpec, PruneOptions
from worker.evaluation.lm_eval_tasks.utils import build_items, parse_record
from worker.evaluation.tasks import TASKS, TaskRun
from worker.evaluation.tasks.lm_eval_task import (
    _simple_evaluate,
    evaluate_lm_eval,
    manager_for,
    resolve_paths,
)
from worker.evaluation.tasks.multiple_choice import MCItem, evaluate_multiple_choice
from worker.modelzoo import load_model
from worker.stage import JobContext, JobFailed

ROWS = [
    {"question": "What color is the sky?", "choices": ["blue", "a very long and winding answer"], "label": 0},
    {"question": "Which animal barks?", "choices": ["cat", "dog", "the small brown cow"], "label": 1},
    {"question": "How many legs does a spider have?", "choices": ["eight", "six"], "label": 1},
    {"question": "Where do fish live?", "choices": ["in the deep blue sea water", "trees"], "label": 0},
    {"question": "What do bees make?", "choices": ["honey", "milk", "silk"], "label": 0},
]
PROMPT = "Question: {question}\nAnswer:"


def write_task(folder, rows=ROWS, name="fixture_mc"):
    data = folder / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    yaml = folder / f"{name}.yaml"
    yaml.write_text(textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
          - metric: acc_norm
            aggregation: mean
            higher_is_better: true
        """), encoding="utf-8")
    return yaml, data


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_model(ModelSpec(name="tiny-random-llama"), Settings(data_dir=tmp_path_factory.mktemp("ls")))


@pytest.fixture(scope="module")
def fixture_task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("tasks"))


def test_harness_runs_the_fixture_yaml_on_the_model_object(llama, fixture_task) -> None:
    yaml, _ = fixture_task
    result = evaluate_lm_eval(llama.model, llama.tokenizer, LmEvalOptions(task=str(yaml)), batch_size=2, n_boot=200)
    assert result.task == "lm_eval" and result.primary == "acc" and list(result.metrics) == ["acc", "acc_norm"]
    reported = result.details["lm_eval"]["results"]["fixture_mc"]
    for name in ("acc", "acc_norm"):
        m = result.metrics[name]
        assert m.n == len(ROWS) and len(result.per_example[name]) == len(ROWS)
        assert m.value == pytest.approx(reported[f"{name},none"])  # ours = lm-eval's mean
        assert reported[f"{name}_stderr,none"] is not None  # lm-eval's stderr kept beside ours
        assert m.ci_low is not None and m.ci_low <= m.value <= m.ci_high
        assert result.example_values(name) is not None  # a paired interval can be computed
    assert result.details["lm_eval"]["n-samples"]["fixture_mc"]["effective"] == len(ROWS)


def test_lm_eval_and_our_multiple_choice_agree_on_the_same_rows(llama, fixture_task) -> None:
    yaml, _ = fixture_task
    lm = LmEvalOptions(task=str(yaml))
    theirs = evaluate_lm_eval(llama.model, llama.tokenizer, lm, batch_size=3, n_boot=0)
    items = [MCItem(r["question"], r["choices"], r["label"]) for r in ROWS]
    ours = evaluate_multiple_choice(llama.model, llama.tokenizer, items, prompt_template=PROMPT, batch_size=2,
                                    n_boot=0)
    assert theirs.per_example["acc"] == ours.per_example["acc"]
    assert theirs.per_example["acc_norm"] == ours.per_example["acc_norm"]
    assert theirs.metrics["acc"].value == ours.metrics["acc"].value
    # and the log-likelihoods themselves, document by document
    out, _ = _simple_evaluate(llama.model, llama.tokenizer, "fixture_mc", str(yaml), manager=manager_for(str(yaml)),
                              limit=None, num_fewshot=None, batch_size=4, auto_batch=False, ctx=JobContext(),
                              stage="t", n_boot=0, seed=0)
    docs = sorted(out["samples"]["fixture_mc"], key=lambda s: s["doc_id"])
    lm_lls = [[float(r[0][0]) for r in d["resps"]] for d in docs]
    np.testing.assert_allclose(np.concatenate(lm_lls), np.concatenate(ours.details["loglikelihoods"]), atol=1e-4)


def test_limit_and_the_registry_task(llama, fixture_task) -> None:
    yaml, _ = fixture_task
    options = PruneOptions(tasks=["lm_eval"], lm_eval=LmEvalOptions(task=str(yaml), limit=3), n_boot=0)
    task = TASKS["lm_eval"]
    data = task.prepare(llama.model, [], None, options)
    assert not isinstance(data, str)
    run = TaskRun(max_tokens=64, batch_size=2, ctx=JobContext(), progress_stage="t", n_boot=0, seed=0, limit=2)
    result = task.evaluate(llama.model, llama.tokenizer, data, options, run)
    assert result.metrics["acc"].n == 2  # the smaller of lm_eval.limit and the stage's limit
    assert isinstance(task.prepare(llama.model, [], None, PruneOptions()), str)  # no lm_eval options: skipped


def test_shipped_litcab_task_reads_the_data_file_it_is_given(llama, tmp_path) -> None:
    qa = "".join(f"Question number {i}?\nanswer {i}\n\n" for i in range(6))
    (tmp_path / "sciq.txt").write_text(qa, encoding="utf-8")
    settings = Settings(data_dir=tmp_path, data_roots=[tmp_path])
    options = PruneOptions(tasks=["lm_eval"], lm_eval=LmEvalOptions(task="layerscope_sciq_mc", data_files="sciq.txt"))
    resolved = resolve_paths(options, settings)
    assert resolved.lm_eval is not None and resolved.lm_eval.data_files == str((tmp_path / "sciq.txt").resolve())
    result = evaluate_lm_eval(llama.model, llama.tokenizer, resolved.lm_eval, batch_size=8, n_boot=0)
    assert result.metrics["acc"].n == 6 and 0.0 <= result.value <= 1.0
    with pytest.raises(JobFailed) as missing:
        evaluate_lm_eval(llama.model, llama.tokenizer, LmEvalOptions(task="layerscope_truthfulqa_mc"))
    assert missing.value.error_type == "task_invalid" and "data_files" in missing.value.detail


def test_multiple_choice_built_from_short_answers() -> None:
    records = [parse_record(f"Q{i}?\nA{i}; alias{i}") for i in range(10)]
    assert records[0] == ("Q0?", ["A0", "alias0"]) and parse_record("only one line") is None
    items = build_items([r for r in records if r is not None])
    assert items == build_items([r for r in records if r is not None])  # deterministic
    for i, it in enumerate(items):
        assert it["choices"][it["label"]] == f"A{i}" and len(it["choices"]) == 4
        assert len({c.lower() for c in it["choices"]}) == 4
    assert len({it["label"] for it in items}) > 1  # the gold is not always first


def test_paths_outside_the_data_roots_and_unknown_tasks_fail_clearly(tmp_path, fixture_task) -> None:
    settings = Settings(data_dir=tmp_path, data_roots=[tmp_path / "data"])
    (tmp_path / "data").mkdir()
    yaml, data = fixture_task
    for lm in (LmEvalOptions(task=str(yaml)), LmEvalOptions(task="sciq", data_files=str(data))):
        with pytest.raises(JobFailed) as outside:
            resolve_paths(PruneOptions(tasks=["lm_eval"], lm_eval=lm), settings)
        assert outside.value.error_type == "path_not_allowed"
    with pytest.raises(JobFailed) as absent:
        resolve_paths(PruneOptions(tasks=["lm_eval"], lm_eval=LmEvalOptions(task="nope.yaml")), settings)
    assert absent.value.error_type == "task_not_found"
    with pytest.raises(ValueError, match="lm_eval"):
        PruneOptions(tasks=["lm_eval"])


def test_unknown_task_name_is_task_not_found_with_the_closest_names(llama) -> None:
    # builds lm-eval's whole task index (its thousands of YAMLs), once
    with pytest.raises(JobFailed) as unknown:
        TASKS["lm_eval"].prepare(llama.model, [], None, PruneOptions(tasks=["lm_eval"], lm_eval={"task": "sciqq"}))
    assert unknown.value.error_type == "task_not_found"
    assert "did you mean 'sciq'" in unknown.value.detail and "YAML" in unknown.value.detail
    # a hub task's data cannot be replaced by a local file: copy its YAML with dataset_path: json
    hub = PruneOptions(tasks=["lm_eval"], lm_eval={"task": "sciq", "data_files": "/data/sciq.jsonl"})
    with pytest.raises(JobFailed) as not_local:
        TASKS["lm_eval"].prepare(llama.model, [], None, hub)
    assert not_local.value.error_type == "task_invalid" and "dataset_path: json" in not_local.value.detail


def test_lm_eval_paths_outside_the_data_roots_are_a_422_at_submit(tmp_path) -> None:
    from app.api.precheck import check_submit
    from app.problems import Problem
    from app.schemas import AnalysisSpec

    settings = Settings(data_dir=tmp_path, data_roots=[tmp_path])
    lm_eval = {"task": "/elsewhere/task.yaml", "data_files": "/elsewhere/data.jsonl"}
    spec = AnalysisSpec.model_validate({
        "model": {"name": "tiny-random-llama"}, "dataset": {"name": "chatterbot-trivia"},
        "stages": {"prune": {"tasks": ["lm_eval"], "lm_eval": lm_eval}},
    })
    with pytest.raises(Problem) as refused:
        check_submit(spec, settings)
    assert refused.value.status == 422
    assert [e["field"] for e in refused.value.extra["errors"]] == [
        "stages.prune.lm_eval.task", "stages.prune.lm_eval.data_files"]
    inside = {"task": "sciq", "data_files": "sciq/validation.txt"}  # relative: under a root
    check_submit(AnalysisSpec.model_validate({**spec.model_dump(), "stages": {"prune": {
        "tasks": ["lm_eval"], "lm_eval": inside}}}), settings)


def test_prune_stage_runs_both_tasks_with_paired_retained_intervals(tmp_path) -> None:
    """Through the pipeline: the stage resolves the YAML and data file under the data roots, and
    multiple_choice and lm_eval on the same rows give the same original acc and paired intervals."""
    from worker.pipeline import run_pipeline

    data = tmp_path / "data"
    data.mkdir()
    yaml, _ = write_task(data)
    rows = [{"question": r["question"], "choices": r["choices"], "label": r["label"]} for r in ROWS]
    spec = {
        "model": {"name": "tiny-random-llama"},
        "dataset": {"rows": [{"text": f"sentence number {i} about the layers of a model"} for i in range(6)],
                    "max_tokens": 32},
        "stages": {"prune": {
            "scorers": ["block_influence"], "tasks": ["multiple_choice", "lm_eval"], "random_seeds": 1,
            "timing_runs": 0, "n_boot": 50, "scoring_examples": 3, "qa_dataset": {"rows": rows, "limit": 5},
            "lm_eval": {"task": yaml.name, "data_files": "fixture_mc.jsonl"},
        }},
    }
    saved: dict = {}
    from app.schemas import AnalysisSpec

    run_pipeline(AnalysisSpec.model_validate(spec), JobContext(), Settings(data_dir=tmp_path, data_roots=[data]),
                 lambda r: saved.__setitem__(r.stage, r))
    prune = saved["prune"]
    json.dumps(prune.summary)  # lm-eval's details are stored as JSON
    by = {(m.scope, m.name): m for m in prune.metrics}
    mc = by[("task=multiple_choice,scorer=original", "acc")]
    lm = by[("task=lm_eval,scorer=original", "acc")]
    assert mc.value == lm.value and mc.n == lm.n == len(ROWS)
    for task in ("multiple_choice", "lm_eval"):
        kept = by[(f"task={task},scorer=block_influence", "retained_pct")]
        assert kept.n == len(ROWS) and (kept.value is None or kept.ci_low is not None)
    entry = next(t for t in prune.summary["table"] if t["task"] == "lm_eval")
    assert entry["details"]["lm_eval"]["results"]["fixture_mc"]["acc_stderr,none"] is not None
