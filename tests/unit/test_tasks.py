"""Task evaluators: perplexity against direct computations, classification, QA scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers as tf

from app.config import Settings
from app.schemas import ModelSpec
from worker.evaluation.correctness import token_f1
from worker.evaluation.tasks import (
    evaluate_classification,
    evaluate_perplexity,
    evaluate_qa,
    example_field,
    generate_answers,
    sliding_windows,
)
from worker.evaluation.tasks import qa as tasks_mod
from worker.lm.tokens import encode_texts, pad_batch
from worker.modelzoo import load_model
from worker.stage import JobContext, JobFailed

TEXTS = [
    "the cat sat on the mat and looked at the birds outside the window",
    "rivers flow to the sea",
    "hi",
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_model(ModelSpec(name="tiny-random-llama"), Settings(data_dir=tmp_path_factory.mktemp("ls")))


def _nll_direct(model, ids: list[int], context: int | None = None) -> tuple[float, int]:
    """Sum of NLL of tokens 1..n-1, each predicted from at most `context` previous tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for t in range(1, len(ids)):
            lo = 0 if context is None else max(0, t - context)
            x = torch.tensor([ids[lo:t]])
            logp = torch.log_softmax(model(input_ids=x).logits[0, -1].double(), -1)
            total -= float(logp[ids[t]])
            count += 1
    return total, count


# ------------------------------------------------------------------ helpers


def test_sliding_windows_score_every_token_once():
    assert sliding_windows(10, 4, 2) == [(0, 4, 1), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    scored = []
    for begin, end, first in sliding_windows(10, 4, 2):
        scored += list(range(begin + first, end))
    assert scored == list(range(1, 10))
    assert sliding_windows(3, 8, 4) == [(0, 3, 1)]
    assert sliding_windows(1, 8, 4) == []
    # stride == window: disjoint windows, the first token of each window has no context
    assert sliding_windows(6, 3, 3) == [(0, 3, 1), (3, 6, 1)]
    with pytest.raises(ValueError):
        sliding_windows(10, 4, 5)


def test_pad_batch_and_example_field():
    ids, mask = pad_batch([[1, 2, 3], [4]], 0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[1, 2, 3], [4]], 9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert example_field("abc", "text") == "abc" and example_field("abc", "question") is None
    assert example_field({"question": "q"}, "question") == "q"

    class Ex:
        answer = "a"

    assert example_field(Ex(), "answer") == "a" and example_field(Ex(), "text") is None
    from worker.datasets import Example

    ex = Example(text="great film", meta={"columns": {"label": "positive"}})
    assert example_field(ex, "text") == "great film" and example_field(ex, "label") == "positive"
    assert example_field({"text": "t", "meta": {"columns": {"label": 1}}}, "label") == 1


# --------------------------------------------------------------- perplexity


def test_perplexity_full_context_matches_direct_computation(llama):
    encoded = encode_texts(llama.tokenizer, TEXTS, 256)
    total, count = 0.0, 0
    for ids in encoded:
        t, c = _nll_direct(llama.model, ids)
        total, count = total + t, count + c
    result = evaluate_perplexity(llama.model, llama.tokenizer, TEXTS, window=64, batch_size=2, n_boot=200)
    m = result.metrics["perplexity"]
    assert m.value == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.details["tokens_scored"] == count
    assert m.n == 3 and m.ci_low <= m.value <= m.ci_high
    assert result.higher_is_better is False
    # Padding is masked: one text at a time gives the same number.
    single = evaluate_perplexity(llama.model, llama.tokenizer, TEXTS, window=64, batch_size=1, n_boot=0)
    assert single.value == pytest.approx(m.value, rel=1e-5)


def test_perplexity_sliding_window_matches_direct_computation(llama):
    text = TEXTS[0]
    ids = encode_texts(llama.tokenizer, [text], 256)[0]
    assert len(ids) > 8
    # window 6, stride 2: token t (>= 6) is predicted from the window that ends at or after it, which
    # starts at the largest multiple of 2 with begin + 6 >= t + 1; compute it directly.
    total, count = 0.0, 0
    for begin, end, first in sliding_windows(len(ids), 6, 2):
        for t in range(begin + first, end):
            x = torch.tensor([ids[begin:t]])
            with torch.no_grad():
                logp = torch.log_softmax(llama.model(input_ids=x).logits[0, -1].double(), -1)
            total -= float(logp[ids[t]])
            count += 1
    assert count == len(ids) - 1
    result = evaluate_perplexity(llama.model, llama.tokenizer, [text], window=6, stride=2, n_boot=0)
    assert result.value == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.metrics["perplexity"].ci_low is None  # no resamples asked for


def test_perplexity_truncation_progress_and_cancel(llama):
    seen = []
    ctx = JobContext(progress=lambda s, d, t: seen.append((s, d, t)))
    result = evaluate_perplexity(
        llama.model, llama.tokenizer, TEXTS, max_tokens=4, window=8, ctx=ctx, n_boot=0
    )
    assert result.details["tokens_scored"] == 3 + 3 + 1  # ids truncated to 4, 4 and 2 tokens
    assert seen[0][1] == 0 and seen[-1][1] == seen[-1][2]
    cancelled = JobContext(is_cancelled=lambda: True)
    from worker.stage import JobCancelled

    with pytest.raises(JobCancelled):
        evaluate_perplexity(llama.model, llama.tokenizer, TEXTS, ctx=cancelled)


def test_perplexity_refuses_an_encoder(tmp_path):
    bert = load_model(ModelSpec(name="tiny-random-bert"), Settings(data_dir=tmp_path))
    with pytest.raises(JobFailed) as exc:
        evaluate_perplexity(bert.model, bert.tokenizer, TEXTS)
    assert exc.value.error_type == "task_unsupported"
    with pytest.raises(JobFailed) as exc:
        evaluate_classification(bert.model, bert.tokenizer, TEXTS, [0, 1, 0], label_words=["no", "yes"])
    assert exc.value.error_type == "task_unsupported"
    with pytest.raises(JobFailed):
        evaluate_qa(bert.model, bert.tokenizer, ["q?"], ["a"])


# ----------------------------------------------------------- classification


def test_causal_classification_scores_label_words_by_loglik(llama):
    words = ["positive", "negative"]
    prompts = [f"{t}\nSentiment:" for t in TEXTS]
    expected = []
    for p in prompts:
        pid = encode_texts(llama.tokenizer, [p], 256)[0]
        scores = []
        for w in words:
            cont = llama.tokenizer(" " + w, add_special_tokens=False)["input_ids"]
            full = torch.tensor([pid + cont])
            with torch.no_grad():
                logp = torch.log_softmax(llama.model(input_ids=full).logits[0].double(), -1)
            scores.append(sum(float(logp[len(pid) + j - 1, tok]) for j, tok in enumerate(cont)))
        expected.append(int(np.argmax(scores)))
    gold = [expected[0], words[1 - expected[1]], "Positive" if expected[2] == 0 else "NEGATIVE"]
    result = evaluate_classification(llama.model, llama.tokenizer, TEXTS, gold, label_words=words, n_boot=100)
    assert result.metrics["accuracy"].value == pytest.approx(2 / 3)
    assert result.per_example["correct"] == [1.0, 0.0, 1.0]
    assert result.details["method"] == "label_word_loglik"
    with pytest.raises(JobFailed):
        evaluate_classification(llama.model, llama.tokenizer, TEXTS, [0, 1, 5], label_words=words)
    with pytest.raises(JobFailed):
        evaluate_classification(llama.model, llama.tokenizer, TEXTS, [0, 1, 0])  # no label words


def test_encoder_with_head_uses_its_head(llama):
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=len(llama.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=2,
        id2label={0: "NEG", 1: "POS"},
        label2id={"NEG": 0, "POS": 1},
    )
    model = tf.BertForSequenceClassification(cfg).eval()
    enc = llama.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1).tolist()
    gold = ["POS" if p == 1 else "neg" for p in pred]
    result = evaluate_classification(model, llama.tokenizer, TEXTS, gold, batch_size=2, n_boot=0)
    assert result.value == 1.0 and result.details["method"] == "classification_head"


# ---------------------------------------------------------------------- QA


def test_token_f1_is_squad_f1():
    assert token_f1("The cat sat", "cat sat on the mat") == pytest.approx(2 * (2 / 2) * (2 / 4) / (1 + 0.5))
    assert token_f1("Paris.", "paris") == 1.0


def test_qa_scores_max_over_aliases(monkeypatch, llama):
    preds = ["Paris", "the number four", "blue whale"]
    monkeypatch.setattr(tasks_mod, "generate_answers", lambda *a, **k: list(preds))
    result = evaluate_qa(
        llama.model,
        llama.tokenizer,
        ["capital?", "2+2?", "largest animal?"],
        ["paris; Paris, France", "4; four", "elephant"],
        n_boot=100,
    )
    f1 = result.per_example["f1"]
    assert f1[0] == 1.0 and f1[1] == pytest.approx(2 * 0.5 * 1 / 1.5) and f1[2] == 0.0
    assert result.per_example["exact_match"] == [1.0, 0.0, 0.0]
    assert result.metrics["f1"].value == pytest.approx(np.mean(f1))
    assert result.metrics["exact_match"].value == pytest.approx(1 / 3)
    assert result.primary == "f1" and result.metrics["f1"].n == 3


def test_generation_is_batch_invariant_and_stops_at_newline(llama):
    prompts = ["Question: what is the capital of france?\nAnswer:", "Question: hi?\nAnswer:", "Q: x\nA:"]
    batched = generate_answers(llama.model, llama.tokenizer, prompts, max_new_tokens=5, batch_size=3)
    single = generate_answers(llama.model, llama.tokenizer, prompts, max_new_tokens=5, batch_size=1)
    assert batched == single
    assert all("\n" not in a for a in batched)


def test_qa_answers_are_the_shared_generators(llama):
    """One generator for the QA task and the hallucination stage: the same answers by the same rule."""
    from worker.lm.generate import generate

    prompts = ["Question: what is the capital of france?\nAnswer:", "Question: hi?\nAnswer:"]
    run = generate(llama.model, llama.tokenizer, prompts, max_new_tokens=5, batch_size=2)
    assert generate_answers(llama.model, llama.tokenizer, prompts, max_new_tokens=5) == [g.text for g in run.generations]
    with pytest.raises(JobFailed):  # the MiniLM tokenizer has no chat template
        generate_answers(llama.model, llama.tokenizer, ["q?"], max_new_tokens=2, chat_template=True)
