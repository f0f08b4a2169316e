"""Hallucination stage building blocks without a real model: prompts, stopping at a
newline (a scripted fake model), verbalized parsing, self-consistency counting, the
logistic probe, shots and the train/test split."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from app.schemas import HallucinationOptions
from worker.evaluation.calibration import auroc
from worker.hallucination.detectors import (
    answers_match,
    length_features,
    probe_confidence,
    self_consistency,
    sequence_likelihood,
    verbalized_confidence,
)
from worker.hallucination.generation import (
    VERBALIZED_QUESTION,
    Generation,
    build_prompt,
    first_alias,
    generate,
    parse_verbalized,
    pick_shots,
    verbalized_prompt,
)
from worker.hallucination.probe import LogisticProbe, fit_probe
from worker.hallucination.stage import split_examples
from worker.stage import JobCancelled, JobContext

SHOTS = [("What is 2+2?", "4"), ("Capital of\nFrance?", "Paris")]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small matrices: one thread is faster, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- prompts


def test_plain_prompt_layout() -> None:
    p = build_prompt("Who wrote\nHamlet?", SHOTS, instruction="Be brief.")
    assert p == (
        "Be brief.\n\n"
        "Question: What is 2+2?\nAnswer: 4\n\n"
        "Question: Capital of France?\nAnswer: Paris\n\n"
        "Question: Who wrote Hamlet?\nAnswer:"
    )
    assert build_prompt("Q?", [], instruction="") == "Question: Q?\nAnswer:"


class _ChatTok:
    chat_template = "{{ fake }}"

    def __init__(self) -> None:
        self.calls: list[list[dict[str, str]]] = []

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert tokenize is False and add_generation_prompt is True
        self.calls.append(messages)
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"


def test_chat_prompt_and_fallback() -> None:
    tok = _ChatTok()
    p = build_prompt("Q3?", SHOTS, instruction="Be brief.", tokenizer=tok, use_chat_template=True)
    roles = [m["role"] for m in tok.calls[0]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert tok.calls[0][0]["content"] == "Be brief.\n\nQuestion: What is 2+2?"
    assert tok.calls[0][-1]["content"] == "Question: Q3?"
    assert p.endswith("|assistant:")
    v = verbalized_prompt("Q3?", "an answer", SHOTS, tokenizer=tok, use_chat_template=True)
    assert tok.calls[-1][-2] == {"role": "assistant", "content": "an answer"}
    assert tok.calls[-1][-1]["content"] == VERBALIZED_QUESTION
    assert v.endswith("|assistant:")
    # no template: the plain format
    plain = build_prompt("Q3?", SHOTS, tokenizer=SimpleNamespace(chat_template=None), use_chat_template=True)
    assert plain == build_prompt("Q3?", SHOTS)


def test_verbalized_prompt_plain() -> None:
    v = verbalized_prompt("Q?", " Paris ", [("a", "b")], instruction="")
    assert v == f"Question: a\nAnswer: b\n\nQuestion: Q?\nAnswer: Paris\n{VERBALIZED_QUESTION}\nConfidence (0-100):"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("85", 0.85),
        (" 85%", 0.85),
        ("I am 90 percent sure", 0.90),
        ("Confidence: 70/100", 0.70),
        ("100", 1.0),
        ("0", 0.0),
        ("42.5", 0.425),
        ("150 then 60", 0.60),
        ("abc", None),
        ("", None),
        ("v2.0", None),
    ],
)
def test_parse_verbalized(text: str, expected: float | None) -> None:
    got = parse_verbalized(text)
    assert (got is None) if expected is None else got == pytest.approx(expected)


def test_verbalized_counts_unparseable() -> None:
    conf, bad = verbalized_confidence(["80", "no idea", "", "55%"])
    assert conf.tolist() == pytest.approx([0.8, 0.5, 0.5, 0.55])
    assert bad == 2


def test_self_consistency_counting() -> None:
    greedy = ["Paris", "", "blue whale"]
    samples = [["paris", "The Paris.", "London", ""], ["", "", "x", ""], ["whale", "a blue whale", "shark", "BLUE WHALE"]]
    got = self_consistency(greedy, samples)
    assert got.tolist() == pytest.approx([0.5, 0.75, 0.75])
    assert answers_match("", "") and not answers_match("", "x")
    with pytest.raises(ValueError):
        self_consistency(["a"], [[]])


def test_sequence_likelihood_and_length() -> None:
    gens = [
        Generation("a b", " a b", [1, 2], [np.log(0.5), np.log(0.125)], "newline"),
        Generation("", "", [], [], "newline"),
    ]
    assert sequence_likelihood(gens).tolist() == pytest.approx([0.25, 0.0])
    assert length_features(gens).tolist() == [[2.0], [0.0]]


def test_first_alias_and_shots() -> None:
    assert first_alias("a; b") == "a" and first_alias(["", " c "]) == "c" and first_alias("") == ""
    s1 = pick_shots(10, 4, seed=3)
    assert s1 == pick_shots(10, 4, seed=3) and len(set(s1)) == 4
    assert pick_shots(10, 4, seed=4) != s1
    assert set(pick_shots(5, 9, seed=0, eligible=[1, 0, 1, 0, 1])) == {0, 2, 4}
    assert pick_shots(5, 0, seed=0) == []


def test_split_is_disjoint_by_question_and_deterministic() -> None:
    ex = [{"question": f"Q{i % 30}?", "answer": "a"} for i in range(45)]  # 15 repeated questions
    train, test = split_examples(ex, 0.3, seed=1)
    assert len(train) + len(test) == 45
    qtrain = {e["question"] for e in train}
    qtest = {e["question"] for e in test}
    assert not qtrain & qtest
    assert len(qtest) == 9
    assert split_examples(ex, 0.3, seed=1) == (train, test)
    assert split_examples(ex, 0.3, seed=2) != (train, test)


def test_options_validation() -> None:
    o = HallucinationOptions()
    assert o.detectors[0] == "sequence_likelihood" and o.judge is None and o.n_shots == 15
    with pytest.raises(ValueError):
        HallucinationOptions(correctness_rules=["judge"])
    with pytest.raises(ValueError):
        HallucinationOptions(detectors=["p_ik", "p_ik"])
    with pytest.raises(ValueError):
        HallucinationOptions(unknown=1)
    with pytest.raises(ValueError):
        HallucinationOptions(q_values=[0.0])
    j = HallucinationOptions(judge={"name": "gpt"})
    assert j.correctness_rules[-1] == "judge"
    with pytest.raises(ValueError, match="LAYERSCOPE_JUDGES"):  # endpoints are server configuration
        HallucinationOptions(judge={"base_url": "http://127.0.0.1:9/v1", "model": "m"})


# --------------------------------------------------------------------------- probe


def _separable(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(float)
    x = rng.normal(size=(n, d)) * 5.0 + 100.0  # far from standardized, on purpose
    x[:, 0] += np.where(y == 1, 15.0, -15.0)
    return x, y


def test_probe_learns_separable_case() -> None:
    x_tr, y_tr = _separable(120, 20, 0)
    x_te, y_te = _separable(80, 20, 1)
    conf, probe = probe_confidence(x_tr, y_tr, x_te, seed=0)
    assert conf.shape == (80,) and np.all((conf >= 0) & (conf <= 1))
    assert auroc(conf, y_te) > 0.98
    assert ((conf > 0.5) == (y_te == 1)).mean() > 0.95
    assert probe.cv_losses is not None and probe.l2 in probe.cv_losses
    again, _ = probe_confidence(x_tr, y_tr, x_te, seed=0)
    assert np.array_equal(conf, again)  # deterministic


def test_probe_flags_a_strength_at_the_end_of_the_grid() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(90, 40)), (rng.random(90) < 0.4).astype(float)  # labels unrelated to x
    _, noise = probe_confidence(x, y, x[:5], seed=0, l2_grid=(0.1, 1.0, 10.0))
    assert noise.l2 == 10.0 and noise.at_grid_edge  # the strongest penalty wins on noise: an edge
    _, fixed = probe_confidence(x, y, x[:5], l2=10.0)
    assert not fixed.at_grid_edge  # a given strength is no choice


def test_probe_regularization_and_degenerate() -> None:
    x, y = _separable(60, 5, 2)
    weak = LogisticProbe.fit(x, y, l2=0.1)
    strong = LogisticProbe.fit(x, y, l2=1e4)
    assert np.linalg.norm(strong.weight) < np.linalg.norm(weak.weight)
    const = fit_probe(x, np.ones(60))
    assert const.degenerate and np.allclose(const.predict_proba(x), 61 / 62)
    flat = LogisticProbe.fit(np.ones((10, 3)), np.array([0, 1] * 5, dtype=float), l2=1.0)
    assert np.allclose(flat.predict_proba(np.ones((2, 3))), 0.5)
    with pytest.raises(ValueError):
        LogisticProbe.fit(np.full((4, 2), np.nan), np.array([0, 1, 0, 1.0]))
    with pytest.raises(ValueError):
        LogisticProbe.fit(x, np.full(60, 2.0))


# --------------------------------------------------------------------------- generation (scripted model)

VOCAB = ["<pad>", "<eos>", "q", "w", "e", "x", "\n", "y", "z", "is.\nmore", "Par", "\n\nQuestion"]


class _Tok:
    pad_token_id = 0
    eos_token_id = 1
    chat_template = None

    def __len__(self) -> int:
        return len(VOCAB)

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[VOCAB.index(w) for w in t.split(" ")] for t in texts]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(VOCAB[i] for i in ids if not (skip_special_tokens and i < 2))

    def batch_decode(self, seqs):
        return [self.decode(s) for s in seqs]


class _Cache:
    def __init__(self, b: int) -> None:
        self.rows = torch.arange(b)

    def batch_repeat_interleave(self, n: int) -> None:
        self.rows = self.rows.repeat_interleave(n)

    def batch_select_indices(self, idx: torch.Tensor) -> None:
        self.rows = self.rows[idx]


class _ScriptedLM(torch.nn.Module):
    """Emits SCRIPT[next absolute position] (a token name), whatever the input."""

    def __init__(self, script: dict[int, str]) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.script = script
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.calls: list[tuple[int, int]] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=True, output_hidden_states=False, logits_to_keep=0):
        b, s = input_ids.shape
        self.calls.append((b, s))
        if position_ids is None:
            position_ids = torch.arange(s)[None].expand(b, s)
        nxt = position_ids[:, -1] + 1
        logits = torch.full((b, s, len(VOCAB)), -30.0)
        for r in range(b):
            logits[r, -1, VOCAB.index(self.script.get(int(nxt[r]), "z"))] = 30.0
        cache = past_key_values if past_key_values is not None else _Cache(b)
        hidden = (position_ids[..., None].float().expand(b, s, 3),)
        return SimpleNamespace(logits=logits, past_key_values=cache, hidden_states=hidden)


def test_generation_stops_at_newline_eos_and_cap() -> None:
    # prompts of 3, 5 and 7 tokens sharing the prefix "q w"
    prompts = ["q w e", "q w e e e", "q w x x x x x", "q w e e e e e e e"]
    script = {3: "Par", 4: "is.\nmore", 5: "y", 6: "\n", 7: "<eos>", 9: "z", 10: "z"}
    model = _ScriptedLM(script)
    seen: list[tuple[int, int]] = []
    run = generate(model, _Tok(), prompts, max_new_tokens=3, batch_size=4, capture_last_hidden=True,
                   on_batch=lambda d, t: seen.append((d, t)))
    g = run.generations
    assert run.shared_prefix_tokens == 2 and run.prompt_tokens == [3, 5, 7, 9]
    # row 0: "Par" + "is.\nmore" -> answer "Paris." (the newline token carries text), stop newline
    assert (g[0].text, g[0].stop, g[0].n_tokens) == ("Paris.", "newline", 2)
    # row 1: "y" then "\n" -> "y", the bare newline token is not part of the answer
    assert (g[1].text, g[1].stop, g[1].token_ids) == ("y", "newline", [VOCAB.index("y")])
    # row 2: EOS at once -> empty answer
    assert (g[2].text, g[2].stop, g[2].n_tokens, g[2].logprobs) == ("", "eos", 0, [])
    # row 3: never stops -> cut at max_new_tokens
    assert (g[3].text, g[3].stop, g[3].n_tokens) == ("zzz", "max_tokens", 3)
    assert all(lp <= 0 for x in g for lp in x.logprobs)
    assert seen == [(4, 4)]  # one batch; progress counts rows (AutoBatch.progress), never backwards
    # last prompt token's hidden state = its position (the fake model's hidden state)
    assert run.last_hidden is not None and run.last_hidden[:, 0].tolist() == [2, 4, 6, 8]
    # the shared prefix ran once (batch 1, 2 tokens); decoding dropped finished rows
    assert model.calls[0] == (1, 2) and model.calls[1] == (4, 7)
    assert [b for b, s in model.calls[2:]] == [3, 1]


def test_generation_samples_are_seeded_and_cancellable() -> None:
    class Uniform(_ScriptedLM):
        def forward(self, input_ids, **kw):
            out = super().forward(input_ids, **kw)
            out.logits = torch.zeros_like(out.logits)
            out.logits[..., 0:2] = -30.0  # never pad/eos
            return out

    model, tok = Uniform({}), _Tok()
    a = generate(model, tok, ["q w", "q e"], max_new_tokens=4, batch_size=3, temperature=1.0, num_samples=3, seed=5)
    b = generate(model, tok, ["q w", "q e"], max_new_tokens=4, batch_size=3, temperature=1.0, num_samples=3, seed=5)
    c = generate(model, tok, ["q w", "q e"], max_new_tokens=4, batch_size=3, temperature=1.0, num_samples=3, seed=6)
    assert len(a.generations) == 6
    assert [x.token_ids for x in a.generations] == [x.token_ids for x in b.generations]
    assert [x.token_ids for x in a.generations] != [x.token_ids for x in c.generations]
    ctx = JobContext(is_cancelled=lambda: True)
    with pytest.raises(JobCancelled):
        generate(model, tok, ["q w"], max_new_tokens=2, ctx=ctx)


def test_generation_without_shared_prefix() -> None:
    model = _ScriptedLM({2: "y", 3: "\n", 4: "x", 5: "\n"})
    run = generate(model, _Tok(), ["q w", "w q e e"], max_new_tokens=5, batch_size=2)
    assert run.shared_prefix_tokens == 0
    assert [g.text for g in run.generations] == ["y", "x"]
    assert model.calls[0] == (2, 4)  # no prefix pass: the first call is the padded batch


def test_generation_keeps_the_end_of_answer_token_apart() -> None:
    """Every step puts 0.6 on the scripted token and 0.4 / 11 on each other one: the answer
    tokens and the token that ended the answer carry log 0.6 and the same entropy."""

    class Soft(_ScriptedLM):
        def forward(self, input_ids, **kw):
            out = super().forward(input_ids, **kw)
            top = out.logits > 0
            out.logits = torch.where(top, torch.tensor(np.log(0.6)), torch.tensor(np.log(0.4 / 11)))
            return out

    h = -(0.6 * np.log(0.6) + 11 * (0.4 / 11) * np.log(0.4 / 11))
    # row 0: "y" "y" "\n" (newline ends it); row 1: "Par" "is.\nmore" (the newline inside the
    # last answer token: no end token apart); row 2: "y" "<eos>"; row 3: cut at the cap
    prompts = ["q w", "q w", "q w", "q w"]
    runs = [generate(Soft(s), _Tok(), prompts[:1], max_new_tokens=3, batch_size=1).generations[0]
            for s in ({2: "y", 3: "y", 4: "\n"}, {2: "Par", 3: "is.\nmore"}, {2: "y", 3: "<eos>"}, {})]
    ended, inside, eos, capped = runs
    assert ended.logprobs == pytest.approx([np.log(0.6)] * 2) and ended.entropies == pytest.approx([h, h])
    assert ended.end_logprob == pytest.approx(np.log(0.6)) and ended.end_entropy == pytest.approx(h)
    assert ended.logprobs_with_end == pytest.approx([np.log(0.6)] * 3)
    assert inside.n_tokens == 2 and inside.end_logprob is None and inside.logprobs_with_end == inside.logprobs
    assert (eos.stop, eos.n_tokens, eos.end_logprob) == ("eos", 1, pytest.approx(np.log(0.6)))
    assert (capped.stop, capped.n_tokens, capped.end_logprob, capped.end_entropy) == ("max_tokens", 3, None, None)
    assert capped.entropies_with_end == pytest.approx([h] * 3)


def test_choose_layers_takes_the_informative_layer_from_training_rows_only() -> None:
    from worker.hallucination.detectors import LayerFeatures, choose_layers, layer_candidates

    rng = np.random.default_rng(0)
    n_train, n = 60, 90
    y = (rng.random(n) < 0.5).astype(float)
    pooled = rng.normal(size=(n, 4, 3))
    pooled[:, 2, 0] += 3.0 * (2 * y - 1)  # layer 2 tells the classes apart
    pooled[n_train:] = rng.normal(size=(n - n_train, 4, 3))  # test rows: noise, never read
    f = LayerFeatures(pooled, top_layers=[0], layer_ids=[10, 11, 12, 13])
    chosen, probe, ranking = choose_layers(f, y[:n_train], n_train, window=1, l2=1.0, seed=0)
    assert chosen == (2,) and ranking[0][0] == (2,) and len(ranking) == 4
    assert set(f.layer_probes) == {0, 1, 2, 3} and f.layer_probes[2] is probe
    assert all(ranking[i][1] <= ranking[i + 1][1] for i in range(3))
    assert layer_candidates(4, 3) == [(0,), (1,), (2,), (3,), (0, 1, 2), (1, 2, 3)]
    assert layer_candidates(2, 3) == [(0,), (1,)]
    # a window holding layer 2 may win too; the choice reads the training rows only
    chosen_w, _, ranking_w = choose_layers(f, y[:n_train], n_train, window=2, l2=1.0, seed=0)
    assert 2 in chosen_w and len(ranking_w) == 4 + 3
