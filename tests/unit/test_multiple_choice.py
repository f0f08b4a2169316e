"""The multiple_choice task against log-likelihoods computed by hand from the model's logits,
and its data: choices, gold indices and the rows a dataset file gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app.config import Settings
from app.schemas import DatasetSpec, ModelSpec, PruneOptions
from worker.datasets import load_examples
from worker.evaluation.tasks import TASKS, TaskRun
from worker.evaluation.tasks.multiple_choice import (
    MCItem,
    evaluate_multiple_choice,
    gold_index,
    mc_items,
    parse_choices,
)
from worker.modelzoo import load_model
from worker.stage import JobContext, JobFailed

PROMPT = "Question: {question}\nAnswer:"
ITEMS = [
    MCItem("What color is the sky?", ["blue", "a very long and winding answer about the weather"], 0),
    MCItem("Which animal barks?", ["cat", "dog", "the small brown cow"], 1),
    MCItem("How many legs does a spider have?", ["eight", "six"], 1),
    MCItem("Where do fish live?", ["in the deep blue sea water", "trees"], 0),
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_model(ModelSpec(name="tiny-random-llama"), Settings(data_dir=tmp_path_factory.mktemp("ls")))


def _by_hand(model, tokenizer, question: str, choice: str) -> float:
    """log P(" " + choice | prompt): the pair run alone, log-softmax of its logits, summed over
    the continuation's tokens (those after the prompt's own tokens)."""
    context = PROMPT.format(question=question)
    whole = tokenizer(context + " " + choice)["input_ids"]
    n_context = len(tokenizer(context)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(n_context, len(whole)))


def test_acc_and_acc_norm_against_hand_computed_loglikelihoods(llama) -> None:
    model, tok = llama.model, llama.tokenizer
    lls = [[_by_hand(model, tok, it.question, c) for c in it.choices] for it in ITEMS]
    acc = [float(int(np.argmax(ll)) == it.gold) for it, ll in zip(ITEMS, lls, strict=True)]
    acc_norm = [
        float(int(np.argmax([v / len(c) for v, c in zip(ll, it.choices, strict=True)])) == it.gold)
        for it, ll in zip(ITEMS, lls, strict=True)
    ]
    # batch_size 3 mixes items and pads rows of different lengths
    result = evaluate_multiple_choice(model, tok, ITEMS, prompt_template=PROMPT, batch_size=3, n_boot=200)
    np.testing.assert_allclose(
        np.concatenate(result.details["loglikelihoods"]), np.concatenate(lls), rtol=1e-4, atol=1e-4
    )
    assert result.per_example["acc"] == acc and result.per_example["acc_norm"] == acc_norm
    assert result.primary == "acc" and result.value == pytest.approx(np.mean(acc))
    assert result.metrics["acc_norm"].value == pytest.approx(np.mean(acc_norm))
    assert result.metrics["acc"].n == len(ITEMS)
    paired = result.example_values("acc_norm")
    assert paired is not None and list(paired[0]) == acc_norm
    m = result.metrics["acc"]
    assert m.ci_low is not None and m.ci_high is not None and m.ci_low <= m.value <= m.ci_high
    # the long choices make the two rules disagree somewhere on this random model, so both are exercised
    preds = [int(np.argmax(ll)) for ll in lls]
    preds_norm = [int(np.argmax([v / len(c) for v, c in zip(ll, it.choices, strict=True)])) for it, ll in
                  zip(ITEMS, lls, strict=True)]
    assert preds != preds_norm


def test_gold_is_the_label_index_or_the_answer_text_or_index() -> None:
    choices = ["red", "green", "7"]
    assert gold_index(2, None, choices, "r") == 2
    assert gold_index("1", "red", choices, "r") == 1  # label wins
    assert gold_index(None, "green", choices, "r") == 1
    assert gold_index(None, "0", choices, "r") == 0
    assert gold_index(None, "7", choices, "r") == 2  # a choice's text
    assert gold_index(None, "1", ["0", "1"], "r") == 1  # text and index agree
    with pytest.raises(JobFailed, match="out of range"):
        gold_index(None, 5, choices, "r")
    with pytest.raises(JobFailed, match="none of the choices"):
        gold_index(None, "blue", choices, "r")
    with pytest.raises(JobFailed, match="both a choice and an index"):
        gold_index(None, "1", ["1", "0"], "r")  # choice 0's text, and index 1
    assert parse_choices('["a", "b"]') == ["a", "b"] and parse_choices("['a', 'b']") == ["a", "b"]
    assert parse_choices("a, b") is None and parse_choices([]) is None


def test_rows_from_a_dataset_file_become_items(tmp_path) -> None:
    rows = [
        {"question": "Who proposed evolution by natural selection?", "choices": ["darwin", "newton"], "answer": 0},
        {"question": "What are arteries examples of?", "choices": ["rocks", "blood vessels"], "answer": "blood vessels"},
        {"question": "Not a choice row", "answer": "x"},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    examples = load_examples(DatasetSpec(path=str(path), seed=0), Settings(data_dir=tmp_path, data_roots=[tmp_path]))
    items = sorted(mc_items(examples), key=lambda it: it.question)
    assert [(it.choices, it.gold) for it in items] == [(["rocks", "blood vessels"], 1), (["darwin", "newton"], 0)]


def test_prepare_reads_qa_dataset_first_and_says_why_it_cannot_run(llama) -> None:
    task, options = TASKS["multiple_choice"], PruneOptions(n_boot=0)
    mc = [{"question": "q?", "choices": ["a", "b"], "label": 1}]
    assert isinstance(task.prepare(llama.model, [{"text": "no choices"}], None, options), str)
    data = task.prepare(llama.model, [{"text": "no choices"}], mc, options)
    assert not isinstance(data, str) and data.items[0].gold == 1
    run = TaskRun(max_tokens=16, batch_size=1, ctx=JobContext(), progress_stage="t", n_boot=0, seed=0)
    result = task.evaluate(llama.model, llama.tokenizer, data, options, run)
    assert result.metrics["acc"].n == 1 and result.metrics["acc"].ci_low is None
