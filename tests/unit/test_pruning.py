"""Layer pruning: block removal round-trips, selection strategies, the prune stage."""

from __future__ import annotations

import io
import math
import tarfile

import numpy as np
import pytest
import torch
import transformers as tf

from app.config import Settings
from app.schemas import ModelSpec
from worker.evaluation.tasks import ExampleStatistic, MetricValue, TaskResult
from worker.modelzoo import load_model
from worker.pruning import (
    PruneOptions,
    block_count,
    count_parameters,
    export_pruned_model,
    measure_speedup,
    median_retained,
    pruned_view,
    remove_blocks,
    retained_pct,
    run_prune_stage,
    select_cumulative,
    select_fraction,
    select_iterative,
    speedup_interval,
    wilson_interval,
)
from worker.scoring.agreement import Ranking
from worker.stage import JobContext, JobFailed

V = 128


def _llama() -> tf.PreTrainedModel:
    return tf.LlamaForCausalLM(
        tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=V,
            max_position_embeddings=64,
        )
    )


def _gpt2() -> tf.PreTrainedModel:
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=V, n_positions=64))


def _gemma3() -> tf.PreTrainedModel:
    types = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    return tf.Gemma3ForCausalLM(
        tf.Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=V,
            sliding_window=4,
            layer_types=types,
            max_position_embeddings=64,
        )
    )


def _neox() -> tf.PreTrainedModel:
    return tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=V,
            max_position_embeddings=64,
        )
    )


def _opt() -> tf.PreTrainedModel:
    return tf.OPTForCausalLM(
        tf.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=V,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        )
    )


def _bert() -> tf.PreTrainedModel:
    return tf.BertModel(
        tf.BertConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=V
        )
    )


CAUSAL = {"llama": _llama, "gpt2": _gpt2, "gemma3": _gemma3, "gpt_neox": _neox, "opt": _opt}


def _build(factory):
    torch.manual_seed(0)
    return factory().eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding on row 1
    return ids, mask


def _layer_idxs(model) -> list[int]:
    """The attention modules' KV-cache indices, in block order."""
    return [
        m.layer_idx
        for name, m in model.named_modules()
        if name.endswith(("self_attn", ".attn", ".attention"))
        and isinstance(getattr(m, "layer_idx", None), int)
    ]


# ------------------------------------------------------------ round trips


@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_prune_save_load_generate_round_trip(arch, tmp_path):
    model = _build(CAUSAL[arch])
    n = block_count(model)
    drop = [1, 2] if n == 4 else [0, 2, 3]
    ids, mask = _inputs()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits

    pruned = remove_blocks(model, drop)
    assert block_count(pruned) == n - len(drop)
    assert block_count(model) == n  # the original is untouched (deepcopy)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)

    pruned.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert block_count(loaded) == n - len(drop)
    assert loaded.config.num_hidden_layers == n - len(drop)
    with torch.no_grad():
        a = pruned(input_ids=ids, attention_mask=mask).logits
        b = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    g_mem = pruned.generate(ids[:1], attention_mask=mask[:1], **kw)
    g_loaded = loaded.generate(ids[:1], attention_mask=mask[:1], **kw)
    g_nocache = pruned.generate(ids[:1], attention_mask=mask[:1], use_cache=False, **kw)
    assert torch.equal(g_mem, g_loaded)
    assert torch.equal(g_mem, g_nocache)  # the KV cache (renumbered layer_idx) gives the same tokens


def test_gemma3_layer_types_are_subset_and_reload():
    model = _build(_gemma3)
    types = list(model.config.layer_types)
    pruned = remove_blocks(model, [0, 2, 3])
    assert pruned.config.layer_types == [types[1], types[4], types[5]]
    assert pruned.config.num_hidden_layers == 3
    assert model.config.layer_types == types


def test_layer_idx_renumbered_and_config_updated():
    model = _build(_llama)
    pruned = remove_blocks(model, [0, 2])
    assert _layer_idxs(pruned) == [0, 1]
    assert _layer_idxs(model) == [0, 1, 2, 3]
    gpt = remove_blocks(_build(_gpt2), [3])
    assert gpt.config.n_layer == 3 and _layer_idxs(gpt) == [0, 1, 2]


def test_pruned_bert_round_trip(tmp_path):
    model = _build(_bert)
    ids, mask = _inputs()
    pruned = remove_blocks(model, [0])
    pruned.save_pretrained(tmp_path)
    loaded = tf.BertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = pruned(input_ids=ids, attention_mask=mask).last_hidden_state
        b = loaded(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert loaded.config.num_hidden_layers == 3


def test_pruned_view_restores_everything_even_on_error():
    model = _build(_gemma3)
    ids, mask = _inputs()
    types = list(model.config.layer_types)
    blocks = list(model.model.layers)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        with pruned_view(model, [1, 4]):
            assert block_count(model) == 4 and model.config.num_hidden_layers == 4
            inside = model(input_ids=ids, attention_mask=mask).logits
        with pytest.raises(RuntimeError), pruned_view(model, [0]):
            raise RuntimeError("boom")
        after = model(input_ids=ids, attention_mask=mask).logits
    assert list(model.model.layers) == blocks
    assert model.config.layer_types == types and model.config.num_hidden_layers == 6
    assert _layer_idxs(model) == list(range(6))
    assert torch.equal(before, after)
    copy_pruned = remove_blocks(model, [1, 4])
    with torch.no_grad():
        torch.testing.assert_close(copy_pruned(input_ids=ids, attention_mask=mask).logits, inside)


def test_remove_blocks_refuses_bad_requests():
    model = _build(_llama)
    with pytest.raises(JobFailed) as exc:
        remove_blocks(model, [0, 1, 2, 3])
    assert exc.value.error_type == "prune_unsupported"
    with pytest.raises(JobFailed) as exc:
        remove_blocks(model, [7])
    assert exc.value.error_type == "prune_invalid"
    cfg = tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=V, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(JobFailed):
        remove_blocks(tf.GPT2LMHeadModel(cfg), [0])


def test_parameter_count_drops_by_the_removed_blocks():
    model = _build(_llama)
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    pruned = remove_blocks(model, [1, 3])
    assert count_parameters(model) - count_parameters(pruned) == 2 * per_block


def test_export_is_a_loadable_tarball(tmp_path):
    model = _build(_llama)
    pruned = remove_blocks(model, [2])
    blob = export_pruned_model(pruned)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    loaded = tf.LlamaForCausalLM.from_pretrained(tmp_path / "pruned-model").eval()
    ids, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits,
            pruned(input_ids=ids, attention_mask=mask).logits,
        )


# ------------------------------------------------------------- strategies


def test_fraction_drops_floor_of_p_times_l_lowest():
    order = [4, 3, 6, 1, 0, 7, 2, 5]  # least important first
    assert select_fraction(order, 0.25) == [3, 4]
    assert select_fraction(order, 0.3) == [3, 4]  # floor(2.4)
    assert select_fraction(order, 0.1) == []
    assert select_fraction(list(range(30))[::-1], 0.25) == [23, 24, 25, 26, 27, 28, 29]  # floor(7.5) = 7


def test_cumulative_threshold_on_normalized_scores():
    scores = [4.0, 1.0, 2.0, 3.0]  # normalized 0.4 0.1 0.2 0.3; ascending: l1 0.1, l2 0.3, l3 0.6, l0 1.0
    dropped, cumulative, warnings = select_cumulative(scores, tau=0.3)
    assert dropped == [1, 2]
    assert cumulative == pytest.approx([1.0, 0.1, 0.3, 0.6])
    assert warnings == []
    assert select_cumulative(scores, tau=0.05)[0] == []
    # Negative scores are shifted (with a warning): -1 0 1 2 -> 0 1 2 3 -> /6
    dropped, cumulative, warnings = select_cumulative([-1.0, 0.0, 1.0, 2.0], tau=0.2)
    assert dropped == [0, 1] and warnings
    # Never every layer
    assert len(select_cumulative([1.0, 1.0], tau=0.99)[0]) == 1


def test_iterative_removes_restores_and_stops_on_budget():
    # Higher is better. Removing layer 3 costs 0.01, layer 2 costs 0.2 (restore), layer 1 costs 0.02.
    cost = {3: 0.01, 2: 0.2, 1: 0.02, 0: 0.5}
    calls = []

    def evaluate(dropped):
        calls.append(tuple(dropped))
        return 1.0 - sum(cost[i] for i in dropped)

    res = select_iterative([3, 2, 1, 0], evaluate, higher_is_better=True, delta=0.05, budget=2)
    assert res.dropped == [1, 3]
    assert res.kept_after_trial == [2]
    assert res.stop_reason == "budget"
    assert res.final == pytest.approx(0.97)
    assert [s.removed for s in res.steps] == [True, False, True]
    assert calls == [(), (3,), (2, 3), (1, 3)]


def test_iterative_lambda_tolerance_lower_is_better_and_epsilon():
    ppl = {(): 10.0, (3,): 10.4, (2, 3): 12.0, (1, 3): 10.45, (0, 1, 3): 30.0}
    res = select_iterative([3, 2, 1, 0], lambda d: ppl[tuple(d)], higher_is_better=False, lam=0.05)
    # tolerance = 0.05 x 10 = 0.5: remove 3 (+0.4), restore 2 (+1.6), remove 1 (+0.05), restore 0
    assert res.tolerance == pytest.approx(0.5)
    assert res.dropped == [1, 3] and res.kept_after_trial == [2, 0]
    assert res.stop_reason == "exhausted"
    # epsilon: stop when the relative change is below 1%: after removing 1 (10.4 -> 10.45, 0.5%)
    res = select_iterative(
        [3, 2, 1, 0], lambda d: ppl[tuple(d)], higher_is_better=False, lam=0.05, epsilon=0.01
    )
    assert res.dropped == [1, 3] and res.stop_reason == "converged"


def test_retained_pct_directions():
    assert retained_pct(0.8, 0.6, True) == pytest.approx(75.0)
    assert retained_pct(10.0, 12.5, False) == pytest.approx(80.0)
    assert retained_pct(0.0, 0.5, True) is None
    assert retained_pct(None, 1.0, True) is None


def test_prune_options_validation():
    PruneOptions()
    assert PruneOptions(curve_blocks=[4, 1, 1, 2]).curve_blocks == [1, 2, 4]
    with pytest.raises(ValueError, match="curve_blocks"):
        PruneOptions(curve_blocks=[0, 2])
    with pytest.raises(ValueError):
        PruneOptions(qa_prompt="no placeholder")
    with pytest.raises(ValueError):
        PruneOptions(scorers=["gbis", "gbis"])
    with pytest.raises(ValueError):
        PruneOptions(ppl_window=8, ppl_stride=16)
    with pytest.raises(ValueError):
        PruneOptions(export=True, export_scorer="cim", scorers=["avss"])
    with pytest.raises(ValueError):
        PruneOptions(bogus=1)


# -------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return load_model(ModelSpec(name="tiny-random-llama"), Settings(data_dir=tmp_path_factory.mktemp("ls")))


TEXTS = [
    {"text": "the cat sat on the mat and looked at the birds outside"},
    {"text": "rivers flow down from the mountains to the sea every spring"},
    {"text": "a short line"},
]
QA = [
    {"question": "what is the capital of france?", "answer": "paris"},
    {"question": "two plus two?", "answer": "4; four"},
]


def test_run_prune_stage_table(tiny_llama):
    before = {n: p.detach().clone() for n, p in tiny_llama.model.named_parameters()}
    seen = []
    ctx = JobContext(progress=lambda stage, done, total: seen.append(stage))
    options = PruneOptions(
        fraction=0.5, random_seeds=2, n_boot=50, timing_runs=1, qa_max_new_tokens=3, export=True,
        curve_blocks=[8, 1, 2, 3],
    )
    result = run_prune_stage(
        tiny_llama,
        TEXTS,
        options,
        ctx,
        {"avss": Ranking((1, 2, 3, 0), "lowest", (0.4, 0.1, 0.2, 0.3))},
        qa_examples=QA,
    )
    assert result.stage == "prune"
    # The shared model is untouched.
    assert block_count(tiny_llama.model) == 4
    for n, p in tiny_llama.model.named_parameters():
        assert torch.equal(p, before[n])

    removed = result.summary["layers_removed"]
    assert removed["avss"] == [1, 2]
    assert set(removed) == {"avss", "gbis", "lrp", "cim", "block_influence", "angular_distance"}
    assert all(len(v) == 2 for v in removed.values())

    table = {e["task"]: e for e in result.summary["table"]}
    assert set(table) == {"perplexity", "qa"}
    ppl = table["perplexity"]
    assert ppl["higher_is_better"] is False and ppl["original"] > 1
    rows = {r["scorer"]: r for r in ppl["rows"]}
    assert set(rows) == set(removed) | {"random"}
    for name, row in rows.items():
        assert math.isfinite(row["perplexity"])
        if name != "random":  # random: the median of the seeds' retained (below)
            assert row["retained_pct"] == pytest.approx(100 * ppl["original"] / row["perplexity"])
        assert 0 < row["parameter_reduction_pct"] < 100
    assert rows["random"]["seeds"] == [0, 1] and len(rows["random"]["perplexity_per_seed"]) == 2
    assert "f1" in {r["scorer"]: r for r in table["qa"]["rows"]}["avss"]

    scopes = {(m.scope, m.name) for m in result.metrics}
    assert ("task=perplexity,scorer=original", "perplexity") in scopes
    assert ("task=perplexity,scorer=avss", "retained_pct") in scopes
    assert ("task=qa,scorer=cim", "exact_match") in scopes
    assert ("task=perplexity,scorer=random", "perplexity") in scopes
    assert ("task=perplexity,scorer=random,seed=1", "perplexity") in scopes
    assert ("scorer=avss", "parameter_reduction_pct") in scopes
    assert ("scorer=gbis", "speedup") in scopes
    ppl_row = next(
        m for m in result.metrics if m.scope == "task=perplexity,scorer=avss" and m.name == "perplexity"
    )
    assert ppl_row.ci_low <= ppl_row.value <= ppl_row.ci_high and ppl_row.n == 3
    by = {(m.scope, m.name): m for m in result.metrics}
    # Every ratio carries an interval and its N: retained (paired bootstrap), parameter
    # reduction (exact), the random median (over seeds, interval over examples).
    for scope in ("task=perplexity,scorer=avss", "task=perplexity,scorer=random", "task=perplexity,scorer=cim"):
        kept = by[(scope, "retained_pct")]
        assert kept.ci_low is not None and kept.ci_low <= kept.value <= kept.ci_high and kept.n >= 2
    red = by[("scorer=avss", "parameter_reduction_pct")]
    assert red.ci_low == red.value == red.ci_high and red.n == sum(p.numel() for p in tiny_llama.model.parameters())
    seeds = [by[(f"task=perplexity,scorer=random,seed={s}", "retained_pct")].value for s in (0, 1)]
    assert by[("task=perplexity,scorer=random", "retained_pct")].value == pytest.approx(float(np.median(seeds)))
    assert rows["random"]["retained_pct_per_seed"] == pytest.approx(seeds)
    share = by[("task=perplexity,scorer=avss", "beats_random_share")]
    assert share.n == 2 and share.value == sum(rows["avss"]["retained_pct"] > v for v in seeds) / 2
    assert share.ci_low <= share.value <= share.ci_high
    # One timed run: no interval, so the speed-up cannot be told from 1.0 (flagged).
    assert by[("scorer=gbis", "speedup_includes_one")].value == 1.0
    assert any("not distinguishable from 1.0" in w for w in result.warnings)

    by_scorer: dict[str, list] = {}
    for row in result.layers:
        by_scorer.setdefault(row.scorer, []).append(row)
    assert set(by_scorer) == set(removed)
    for name, rows_l in by_scorer.items():
        assert sorted(r.layer for r in rows_l) == [0, 1, 2, 3]
        assert sorted(r.values["rank"] for r in rows_l) == [1, 2, 3, 4]
        # rank 1 = first pruning candidate (as the avss stage): the pruned layers are ranks 1 and 2
        assert sorted(r.layer for r in rows_l if r.values["prune"] == 1.0) == removed[name]
        assert sorted(r.layer for r in rows_l if r.values["rank"] <= 2) == removed[name]

    pairs = result.summary["agreement"]
    assert len(pairs) == 15 and "avss|gbis" in pairs
    assert set(pairs["avss|gbis"]) == {"spearman", "kendall"}
    assert result.artifacts and result.artifacts[0].name == "pruned-model-avss.tar.gz"

    # The trade-off curve: one ranking reused for k = 1, 2, 3 blocks (8 >= 4 layers: skipped).
    curve = result.summary["curve"]
    assert curve["blocks"] == [1, 2, 3] and any("curve: block counts [8] skipped" in w for w in result.warnings)
    avss_curve = curve["tasks"]["perplexity"]["scorers"]["avss"]
    assert [p["layers_removed"] for p in avss_curve] == [[1], [1, 2], [1, 2, 3]]
    # k = 2 is the table's pruning (fraction 0.5 of 4): the same retained value and interval
    at2 = by[("task=perplexity,scorer=avss,removed=2", "retained_pct")]
    assert (at2.value, at2.ci_low, at2.ci_high) == (
        by[("task=perplexity,scorer=avss", "retained_pct")].value,
        by[("task=perplexity,scorer=avss", "retained_pct")].ci_low,
        by[("task=perplexity,scorer=avss", "retained_pct")].ci_high,
    )
    for k in (1, 2, 3):
        for scorer in (*removed, "random"):
            row = by[(f"task=perplexity,scorer={scorer},removed={k}", "retained_pct")]
            assert row.ci_low is not None and row.ci_low <= row.value <= row.ci_high
    assert by[("task=perplexity,scorer=random,removed=2", "retained_pct")].value == pytest.approx(
        by[("task=perplexity,scorer=random", "retained_pct")].value
    )
    names = [a.name for a in result.artifacts]
    assert "prune_tradeoff.png" in names and "prune_tradeoff.svg" in names
    png = next(a for a in result.artifacts if a.name == "prune_tradeoff.png")
    assert png.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(s.startswith("prune:score:") for s in seen)


def test_run_prune_stage_iterative_and_missing_inputs(tiny_llama):
    options = PruneOptions(
        scorers=["avss", "block_influence"],
        strategy="iterative",
        lam=10.0,
        budget=1,
        random_seeds=1,
        n_boot=0,
        timing_runs=0,
        tasks=["perplexity", "qa"],
    )
    result = run_prune_stage(tiny_llama, TEXTS, options, JobContext(), {"avss": Ranking((3, 2, 1, 0), "lowest")})
    assert result.summary["layers_removed"]["avss"] == [3]
    assert result.summary["selection"]["avss"]["stop_reason"] == "budget"
    assert any("qa skipped" in w for w in result.warnings)
    with pytest.raises(JobFailed):
        run_prune_stage(tiny_llama, TEXTS, options, JobContext(), {"avss": Ranking((0, 1, 2), "lowest")})
    # No avss ranking passed: skipped with a warning, baselines still run.
    result = run_prune_stage(tiny_llama, TEXTS, options, JobContext(), {})
    assert any("avss skipped" in w for w in result.warnings)
    assert list(result.summary["layers_removed"]) == ["block_influence"]


def test_speedup_interval_by_construction():
    # The pruned model takes exactly half the time on every run: 2.0 on every resample.
    orig = [0.10, 0.12, 0.09, 0.11, 0.30]
    ci = speedup_interval(orig, [t / 2 for t in orig], n_boot=200)
    assert ci == (pytest.approx(2.0), pytest.approx(2.0))
    # Same distribution of times: the interval includes 1.0.
    rng = np.random.default_rng(0)
    low, high = speedup_interval(rng.uniform(1, 2, 15), rng.uniform(1, 2, 15), n_boot=500)
    assert low is not None and high is not None and low < 1.0 < high
    assert speedup_interval([1.0, 1.0], [0.5, 0.5]) == (None, None)  # under 3 runs


def test_measure_speedup_reports_interval_and_flag(tiny_llama):
    ids = torch.randint(0, 100, (2, 16))
    out = measure_speedup(tiny_llama.model, [1, 2], ids, torch.ones_like(ids), runs=5, n_boot=100)
    assert out["runs"] == 5 and out["ci_low"] is not None and out["ci_low"] <= out["ci_high"]
    assert out["includes_one"] == (out["ci_low"] <= 1.0 <= out["ci_high"])
    assert block_count(tiny_llama.model) == 4


def test_wilson_interval_known_values():
    # Wilson 95% for 0/5 is [0, 0.4345]; for 5/5 [0.5655, 1]; for 1/2 [0.0945, 0.9055].
    assert wilson_interval(0, 5) == (0.0, pytest.approx(0.4345, abs=1e-4))
    assert wilson_interval(5, 5) == (pytest.approx(0.5655, abs=1e-4), 1.0)
    low, high = wilson_interval(1, 2)
    assert low == pytest.approx(0.0945, abs=1e-4) and high == pytest.approx(0.9055, abs=1e-4)
    assert wilson_interval(0, 0) == (None, None)


def _ppl(nll: list[float], tokens: list[float]) -> TaskResult:
    return TaskResult(
        task="perplexity", primary="perplexity",
        metrics={"perplexity": MetricValue("perplexity", math.exp(sum(nll) / sum(tokens)), None, None, len(nll), False)},
        per_example={"nll_sum": nll, "tokens": tokens},
        statistics={"perplexity": ExampleStatistic("nll_sum", "tokens", "exp")},
    )


def test_random_baseline_is_the_median_over_seeds():
    # Seeds that multiply the perplexity by 1.25, 1.6 and 1000 on every example: retained
    # 80%, 62.5% and 0.1%; the median is 62.5% on every resample (a mean would be 47.5%).
    nll, tokens = [3.0, 1.0, 2.5], [2.0, 1.0, 3.0]
    orig = _ppl(nll, tokens)
    seeds = [_ppl([v + math.log(f) * t for v, t in zip(nll, tokens, strict=True)], tokens) for f in (1.25, 1.6, 1000.0)]
    kept, per_seed = median_retained(orig, seeds, n_boot=200)
    assert per_seed == pytest.approx([80.0, 62.5, 0.1])
    assert kept.value == pytest.approx(62.5) and kept.n == 3
    assert kept.ci_low == pytest.approx(62.5) and kept.ci_high == pytest.approx(62.5)


def test_perplexity_on_held_out_text(tiny_llama):
    options = PruneOptions(scorers=["avss"], tasks=["perplexity"], random_seeds=0, n_boot=0, timing_runs=0)
    held_out = [{"text": "an entirely different sentence about trains and snow"}, "and another held-out line"]
    result = run_prune_stage(
        tiny_llama, TEXTS, options, JobContext(), {"avss": Ranking((1, 2, 3, 0), "lowest")},
        perplexity_examples=held_out,
    )
    (entry,) = result.summary["table"]
    assert entry["n"] == 2  # the held-out texts, not the 3 analysis texts
    same = run_prune_stage(tiny_llama, TEXTS, options, JobContext(), {"avss": Ranking((1, 2, 3, 0), "lowest")})
    assert same.summary["table"][0]["n"] == 3 and same.summary["table"][0]["original"] != entry["original"]
