"""The plug-in registries against the schema (app/ never imports torch, so the names in
app/schemas.py are checked here), and a contract test over every registered task."""

from __future__ import annotations

from typing import get_args

import pytest

from app.config import Settings
from app.schemas import (
    ALL_SCORERS,
    MitigateOptions,
    MitigationMethodName,
    ModelSpec,
    PruneOptions,
    ScorerName,
    TaskName,
)
from worker.evaluation.tasks import TASKS, TaskRun
from worker.mitigation.methods import METHODS
from worker.modelzoo import load_model
from worker.scoring.scorers import SCORERS
from worker.stage import JobContext


def test_schema_names_are_the_registries() -> None:
    assert get_args(ScorerName) == tuple(SCORERS) == ALL_SCORERS
    assert get_args(TaskName) == tuple(TASKS)
    for name, scorer in SCORERS.items():
        assert scorer.name == name and scorer.description
        assert scorer.from_stage is None or not (scorer.needs_causal_lm or scorer.needs_gradients)
        scorer.options(PruneOptions())  # every scorer reads its options from the prune options
    for name, task in TASKS.items():
        assert task.name == name and task.description
    assert get_args(MitigationMethodName) == tuple(METHODS)
    fields = set(MitigateOptions.model_fields)
    for name, method in METHODS.items():
        assert method.name == name and method.description and method.units > 0
        assert set(method.options) <= fields, (name, set(method.options) - fields)


EXAMPLES = [
    {"text": "the cat sat on the mat", "label": 1},
    {"text": "rivers flow to the sea", "label": 0},
    {"question": "What is two plus two?", "answer": "four"},
    {"question": "Which is a color?", "choices": ["red", "dog"], "answer": "red"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("ls"))
    return {n: load_model(ModelSpec(name=f"tiny-random-{n}"), settings) for n in ("llama", "bert")}


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_prepares_or_says_why_and_evaluates_as_declared(models, name, tmp_path) -> None:
    task = TASKS[name]
    (tmp_path / "mc.jsonl").write_text('{"question": "Which is a color?", "choices": ["red", "dog"], "label": 0}')
    (tmp_path / "mc.yaml").write_text(
        f"task: contract_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
    )
    options = PruneOptions(
        label_words=["bad", "good"], n_boot=10, qa_max_new_tokens=2, tasks=list(TASKS),
        lm_eval={"task": str(tmp_path / "mc.yaml")},
    )
    # A bare encoder runs none of them: each says why instead of failing.
    assert isinstance(task.prepare(models["bert"].model, EXAMPLES, None, options), str)
    if name != "lm_eval":  # its documents come from its own task, not from the examples
        assert isinstance(task.prepare(models["llama"].model, [{"text": "x"}][:0], None, options), str)
    loaded = models["llama"]
    data = task.prepare(loaded.model, EXAMPLES, None, options)
    assert not isinstance(data, str)
    run = TaskRun(max_tokens=32, batch_size=2, ctx=JobContext(), progress_stage=f"t:{name}", n_boot=10, seed=0)
    result = task.evaluate(loaded.model, loaded.tokenizer, data, options, run)
    assert result.task == name and result.higher_is_better == task.higher_is_better
    assert result.value is not None and result.metrics[result.primary].n > 0
