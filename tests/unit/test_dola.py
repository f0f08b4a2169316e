"""Layer-contrast decoding (worker/lm/dola.py): the arithmetic on hand-computed numbers, the
logit lens of every causal family, and DoLa inside `generate` on `tiny-random-llama`,
checked against an independent computation from `output_hidden_states`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from app.config import Settings
from app.schemas import ModelSpec
from tests.unit.test_adapters import CASES
from worker.lm.dola import (
    Dola,
    DolaSpec,
    choose_greedy,
    clear_decoding,
    contrast_scores,
    decoding_of,
    js_divergence,
    plausible_mask,
    repetition_penalty,
    set_decoding,
)
from worker.lm.generate import generate
from worker.modelzoo import adapter_for, load_model
from worker.stage import JobFailed

PROMPTS = [
    "Question: What is the capital of France?\nAnswer:",
    "Question: Who wrote Hamlet?\nAnswer:",
    "Question: What gas do plants take in?\nAnswer:",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    return load_model(ModelSpec(name="tiny-random-llama", device="cpu"),
                      Settings(data_dir=tmp_path_factory.mktemp("ls")))


def _log(p: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(x) for x in p], dtype=torch.float64)[None, :]


# ------------------------------------------------------------------ the arithmetic


def test_contrast_and_plausibility_by_hand() -> None:
    final = _log([0.5, 0.3, 0.16, 0.04])
    premature = _log([0.6, 0.1, 0.2, 0.1])
    # alpha 0.1: plausible where q_N >= 0.05, so token 3 (0.04) is out.
    assert plausible_mask(final, 0.1).tolist() == [[True, True, True, False]]
    assert plausible_mask(final, 0.0).all()
    assert plausible_mask(final, 1.0).tolist() == [[True, False, False, False]]
    f = contrast_scores(final, premature, 0.1)[0]
    assert f[0].item() == pytest.approx(math.log(0.5 / 0.6))
    assert f[1].item() == pytest.approx(math.log(3.0))
    assert f[2].item() == pytest.approx(math.log(0.8))
    assert f[3].item() == -math.inf
    # Greedy on the final layer says token 0; DoLa says token 1 (it grew the most).
    assert choose_greedy(contrast_scores(final, premature, 0.1), final).item() == 1
    # Without the constraint an implausible token can win: q_N = 0.04 against q_j = 0.004.
    tail = _log([0.5, 0.3, 0.16, 0.04])
    low = _log([0.6, 0.1, 0.296, 0.004])
    assert choose_greedy(contrast_scores(tail, low, 0.0), tail).item() == 3
    assert choose_greedy(contrast_scores(tail, low, 0.1), tail).item() == 1


def test_repetition_penalty_divides_gains_and_multiplies_losses() -> None:
    scores = torch.tensor([[1.2, -0.5, 0.6, -math.inf]])
    seen = torch.tensor([[True, True, False, True]])
    out = repetition_penalty(scores, seen, 1.2)
    assert out[0, :3].tolist() == pytest.approx([1.0, -0.6, 0.6])
    assert out[0, 3].item() == -math.inf
    assert torch.equal(repetition_penalty(scores, seen, 1.0), scores)


def test_ties_go_to_the_final_layer() -> None:
    final_logits = torch.tensor([[0.0, 3.0, 2.0, 5.0]])
    scores = torch.tensor([[0.0, 0.0, 0.0, -math.inf]])  # token 3 is best but implausible here
    assert choose_greedy(scores, final_logits).item() == 1


def test_js_divergence_by_hand() -> None:
    p = np.array([0.5, 0.3, 0.16, 0.04])
    q = np.array([0.6, 0.1, 0.2, 0.1])
    m = (p + q) / 2
    expected = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    got = js_divergence(_log(p.tolist()), _log(q.tolist())[None])
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert js_divergence(_log(q.tolist()), _log(p.tolist())[None]).item() == pytest.approx(expected, rel=1e-12)
    assert js_divergence(_log(p.tolist()), _log(p.tolist())[None]).item() == pytest.approx(0.0, abs=1e-15)


def test_spec_validation_and_round_trip() -> None:
    spec = DolaSpec((3, 1), alpha=0.2, repetition_penalty=1.2)
    assert spec.dynamic and DolaSpec.from_dict(spec.to_dict()) == spec
    for bad in [dict(layers=()), dict(layers=(1, 1)), dict(layers=(-1,)), dict(layers=(1,), alpha=1.5),
                dict(layers=(1,), repetition_penalty=0.5)]:
        with pytest.raises(ValueError):
            DolaSpec(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DolaSpec.from_dict({"alpha": 0.1})


# ------------------------------------------------------------------ the logit lens


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("bert", "bert_cls", "distilbert")])
def test_logit_lens_of_the_last_block_is_the_models_logits(case: str) -> None:
    torch.manual_seed(0)
    model = CASES[case][0]().eval()
    adapter = adapter_for(model)
    lens = adapter.logit_lens(model)
    seen: dict[str, torch.Tensor] = {}
    handle = adapter.blocks(model)[-1].sites["block_output"].register(lambda t: seen.__setitem__("h", t))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.randint(0, 100, (2, 5)))
            got = lens(seen["h"])
    finally:
        handle.remove()
    assert torch.allclose(got, out.logits.float(), atol=1e-5), case
    assert lens.norm_path is not None


def test_logit_lens_of_opt_with_a_projection_and_without_a_final_norm() -> None:
    import transformers as tf

    torch.manual_seed(0)
    model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                           vocab_size=128, word_embed_proj_dim=16,
                                           do_layer_norm_before=False)).eval()
    adapter = adapter_for(model)
    lens = adapter.logit_lens(model)
    assert lens.norm is None and lens.projection is not None
    seen: dict[str, torch.Tensor] = {}
    handle = adapter.blocks(model)[-1].sites["block_output"].register(lambda t: seen.__setitem__("h", t))
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 100, (1, 4)))
    handle.remove()
    assert torch.allclose(lens(seen["h"]), out.logits.float(), atol=1e-5)


def test_no_lm_head_is_a_typed_error() -> None:
    model = CASES["bert"][0]()
    with pytest.raises(JobFailed) as exc:
        adapter_for(model).logit_lens(model)
    assert exc.value.error_type == "model_unsupported"


# ------------------------------------------------------------------ inside generate


def _texts(run) -> list[tuple[list[int], list[float], str, str]]:
    return [(g.token_ids, g.logprobs, g.text, g.stop) for g in run.generations]


@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_premature_equal_to_final_reproduces_greedy_exactly(tiny, penalty: float) -> None:
    """Premature layer = the last block: F = 0 on the plausible set, the tie-break picks the
    final layer's argmax, so tokens, log-probabilities and texts equal greedy decoding."""
    last = len(tiny.adapter.blocks(tiny.model)) - 1
    greedy = generate(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=6, batch_size=2)
    dola = generate(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=6, batch_size=2,
                    decoding=DolaSpec((last,), repetition_penalty=penalty))
    assert _texts(dola) == _texts(greedy)
    assert set(dola.dola_layers) == {last} and sum(dola.dola_layers.values()) >= len(PROMPTS)


def _independent_first_step(tiny, prompt: str, layers: list[int], alpha: float) -> tuple[int, int]:
    """(DoLa's first token, the premature layer chosen), from `output_hidden_states` with the
    final norm and head applied by hand, not through the hooks and lens of worker/lm/dola.py."""
    ids = tiny.tokenizer([prompt], return_tensors="pt").input_ids
    with torch.no_grad():
        out = tiny.model(input_ids=ids, output_hidden_states=True)
        final = out.logits[0, -1].double()
        lp_n = torch.log_softmax(final, -1)
        n_blocks = len(tiny.model.model.layers)
        prem = {}
        for j in layers:
            if j == n_blocks - 1:
                prem[j] = lp_n
            else:  # hidden_states[j + 1] is block j's output
                h = tiny.model.model.norm(out.hidden_states[j + 1][0, -1])
                prem[j] = torch.log_softmax(tiny.model.lm_head(h).double(), -1)
    p_n = lp_n.exp()
    jsd = {}
    for j, lq in prem.items():
        q = lq.exp()
        m = (p_n + q) / 2
        jsd[j] = float(0.5 * (p_n * (lp_n - m.log())).sum() + 0.5 * (q * (lq - m.log())).sum())
    layer = max(layers, key=lambda j: (jsd[j], -layers.index(j)))
    keep = p_n >= alpha * p_n.max()
    f = torch.where(keep, lp_n - prem[layer], torch.tensor(-math.inf, dtype=torch.float64))
    return int(torch.argmax(f)), layer


@pytest.mark.parametrize("layers", [[0], [1], [0, 1, 2], [2, 0]])
def test_first_token_and_layer_match_an_independent_computation(tiny, layers: list[int]) -> None:
    for prompt in PROMPTS:
        run = generate(tiny.model, tiny.tokenizer, [prompt], max_new_tokens=1, decoding=DolaSpec(tuple(layers)))
        token, layer = _independent_first_step(tiny, prompt, layers, 0.1)
        assert run.generations[0].token_ids[:1] in ([token], []), (prompt, layers)
        assert run.dola_layers == {layer: 1}, (prompt, layers)


def test_dynamic_selection_equals_static_at_the_chosen_layer(tiny) -> None:
    """Dynamic DoLa at one step is static DoLa at the max-JSD layer it chose."""
    for prompt in PROMPTS:
        dyn = generate(tiny.model, tiny.tokenizer, [prompt], max_new_tokens=1, decoding=DolaSpec((0, 1, 2)))
        (layer,) = dyn.dola_layers
        static = generate(tiny.model, tiny.tokenizer, [prompt], max_new_tokens=1, decoding=DolaSpec((layer,)))
        assert _texts(dyn) == _texts(static)


def test_dola_answers_do_not_depend_on_the_batch(tiny) -> None:
    spec = DolaSpec((0, 2), repetition_penalty=1.2)
    one = generate(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=5, batch_size=1, decoding=spec)
    all_ = generate(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=5, batch_size=3, decoding=spec)
    assert [g.token_ids for g in one.generations] == [g.token_ids for g in all_.generations]
    assert one.dola_layers == all_.dola_layers
    greedy = generate(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=5, batch_size=3)
    assert [g.token_ids for g in greedy.generations] != [g.token_ids for g in all_.generations]
    # the recorded log-probabilities are the final layer's: each is <= 0 and finite
    assert all(math.isfinite(x) and x <= 0 for g in all_.generations for x in g.logprobs)


def test_sampled_dola_is_seeded(tiny) -> None:
    spec = DolaSpec((1,))
    a = generate(tiny.model, tiny.tokenizer, PROMPTS[:2], max_new_tokens=4, temperature=1.0, num_samples=2,
                 seed=3, decoding=spec)
    b = generate(tiny.model, tiny.tokenizer, PROMPTS[:2], max_new_tokens=4, temperature=1.0, num_samples=2,
                 seed=3, decoding=spec)
    assert _texts(a) == _texts(b)


def test_the_models_setting_is_used_and_cleared(tiny) -> None:
    greedy = generate(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=4)
    explicit = generate(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=4, decoding=DolaSpec((1,)))
    set_decoding(tiny.model, DolaSpec((1,)))
    try:
        assert decoding_of(tiny.model) == DolaSpec((1,))
        implicit = generate(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=4)
    finally:
        clear_decoding(tiny.model)
    assert decoding_of(tiny.model) is None
    assert _texts(implicit) == _texts(explicit)
    assert _texts(generate(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=4)) == _texts(greedy)


def test_bad_layers_and_a_wrong_lens_are_typed_errors(tiny) -> None:
    with pytest.raises(JobFailed) as exc:
        generate(tiny.model, tiny.tokenizer, PROMPTS, max_new_tokens=2, decoding=DolaSpec((4,)))
    assert exc.value.error_type == "invalid_layers"
    dola = Dola(tiny.model, tiny.adapter, DolaSpec((1,)))
    dola.lens.norm = None  # as if the final norm had not been found
    ids = tiny.tokenizer(PROMPTS[:1], return_tensors="pt").input_ids
    with torch.no_grad(), dola.hooks():
        logits = tiny.model(input_ids=ids).logits[:, -1].float()
        with pytest.raises(JobFailed) as exc:
            dola.pick(logits, dola.start([[]]), 0.0, None)
    assert exc.value.error_type == "unsupported_architecture"
