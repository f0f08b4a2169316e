"""LoRA healing of a pruned model (worker.healing): only adapters train, the shared model is
restored, the merged export reproduces the healed logits, the loss goes down, bad options fail."""

from __future__ import annotations

import copy
import io
import json
import tarfile

import pytest
import torch
import transformers as tf
from pydantic import ValidationError

from app.config import Settings
from app.gates import MetricRecord, Snapshot, evaluate, parse_rule
from app.schemas import HealOptions, ModelSpec, PruneOptions
from worker.healing import disjoint_texts, export_healed_model, healed, lora_targets, pack_tokens
from worker.modelzoo import adapter_for, load_model
from worker.modelzoo.surgery import pruned_view
from worker.pruning import run_prune_stage
from worker.pruning_heal import healing_texts
from worker.scoring.agreement import Ranking
from worker.stage import JobCancelled, JobContext, JobFailed

TEXTS = [f"the cat number {i} sat on the mat and looked at the birds outside the window" for i in range(24)] + [
    "rivers flow down from the mountains to the sea every spring",
    "a short line",
]
OPTS = HealOptions(steps=8, learning_rate=1e-2, max_tokens=16, batch_size=4, rank=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(ModelSpec(name="tiny-random-llama"), Settings(data_dir=tmp_path_factory.mktemp("heal")))


def _ids(tok) -> torch.Tensor:
    return torch.tensor([tok("the cat sat on the mat and the rivers flow")["input_ids"]])


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_attached(params: dict[str, torch.nn.Parameter], before: dict[str, torch.Tensor]) -> None:
    lora = {n for n in params if ".lora_" in n}
    assert lora and all(params[n].requires_grad and params[n].dtype == torch.float32 for n in lora)
    base = {n.replace(".base_layer.", "."): p for n, p in params.items() if n not in lora}
    assert base.keys() == before.keys()
    assert not any(p.requires_grad for p in base.values())
    # Every base weight is bit-identical while the trained adapters are attached.
    for name, p in base.items():
        assert torch.equal(p, before[name]), name
    assert any(float(params[n].detach().abs().max()) > 0 for n in lora if "lora_B" in n)  # B starts at 0: it trained


def test_only_adapters_train_and_the_model_is_restored(tiny):
    model, tok = tiny.model, tiny.tokenizer
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = {n: type(m) for n, m in model.named_modules()}
    with pruned_view(model, [1]):
        in_view = _snapshot(model)  # names as the pruned model has them (blocks renumbered)
        with healed(model, tok, TEXTS, OPTS) as h:
            params = dict(model.named_parameters())
            _check_attached(params, in_view)
            assert h.report.target_modules == 3 * 7  # 3 kept blocks x q, k, v, o, gate, up, down
    after = _snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert "peft_config" not in vars(model)


def test_merged_export_reproduces_the_healed_logits(tiny, tmp_path):
    model, tok = tiny.model, tiny.tokenizer
    ids = _ids(tok)
    with torch.no_grad():
        pruned_logits = None
        with pruned_view(model, [2]):
            pruned_logits = model(ids).logits
            with healed(model, tok, TEXTS, OPTS) as h:
                healed_logits = model(ids).logits
                blob = export_healed_model(h, tok)
    assert (healed_logits - pruned_logits).abs().max() > 1e-3  # healing changed what the model computes
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "healed-model").eval()
    assert loaded.config.num_hidden_layers == 3
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, healed_logits, atol=1e-5, rtol=1e-5)
    assert tf.AutoTokenizer.from_pretrained(tmp_path / "healed-model")("hi")["input_ids"]


def test_gpt2_conv1d_merged_export_reproduces_the_healed_logits(tmp_path):
    """GPT-2's Conv1D stores its weight transposed: the merged delta must be too."""
    gpt2 = load_model(ModelSpec(name="tiny-random-gpt2"), Settings(data_dir=tmp_path / "ls"))
    model, tok = gpt2.model, gpt2.tokenizer
    ids = _ids(tok)
    with torch.no_grad(), pruned_view(model, [0]), healed(model, tok, TEXTS, OPTS) as h:
        assert h.report.target_modules == 3 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
        healed_logits = model(ids).logits
        blob = export_healed_model(h, tok)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "healed-model").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, healed_logits, atol=1e-5, rtol=1e-5)


def test_healing_lowers_the_training_loss_and_is_deterministic(tiny):
    model, tok = tiny.model, tiny.tokenizer
    reports, weights = [], []
    for seed in (3, 3, 4):
        with healed(model, tok, TEXTS, OPTS.model_copy(update={"seed": seed})) as h:
            reports.append(h.report)
            weights.append({n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n})
    first = reports[0]
    assert first.loss_before is not None and first.loss_after is not None
    assert first.loss_after < first.loss_before
    assert first.history and first.history[-1]["step"] == OPTS.steps
    assert reports[1].loss_after == first.loss_after
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    assert reports[2].loss_after != first.loss_after


def test_bfloat16_model_trains_float32_adapters_and_exports_float32(tiny, tmp_path):
    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    tok = tiny.tokenizer
    before = _snapshot(model)
    with healed(model, tok, TEXTS, OPTS) as h:
        assert h.report.adapter_dtype == "float32"
        assert h.report.loss_after < h.report.loss_before
        blob = export_healed_model(h, tok)
        with torch.no_grad():
            ref = model(_ids(tok)).logits.float()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    assert json.loads((tmp_path / "healed-model" / "config.json").read_text())["dtype"] == "float32"
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "healed-model").eval()
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        got = loaded(_ids(tok)).logits
    # The float32 merged model against the bfloat16 forward with float32 adapters: bf16 noise only.
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_cancel_stops_healing_and_restores_the_model(tiny):
    model, tok = tiny.model, tiny.tokenizer
    before = _snapshot(model)
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    seen: list[tuple[str, int, int]] = []
    ctx = JobContext(progress=lambda s, d, t: seen.append((s, d, t)), is_cancelled=cancelled)
    with pytest.raises(JobCancelled), healed(model, tok, TEXTS, OPTS, ctx=ctx, progress_stage="prune:heal:x"):
        pass
    assert seen[0] == ("prune:heal:x", 0, OPTS.steps) and seen[-1][1] == 3
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(".lora_" in n for n, _ in model.named_parameters())


def test_targets_per_architecture():
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
    assert lora_targets(gpt2, adapter_for(gpt2), "mlp") == [
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]
    assert len(lora_targets(gpt2, adapter_for(gpt2), "all")) == 8
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64,
    ))
    assert lora_targets(llama, adapter_for(llama), "attention")[:2] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
    ]


def test_corpus_left_out_overlap_and_packing(tiny):
    kept, dropped = disjoint_texts(
        ["Hello  there", "What is the capital of France? Paris.", "unrelated healing text here", "x"],
        ["hello there", "what is the capital of france?", "x"],
    )
    assert kept == ["unrelated healing text here"] and dropped == 3
    heal = [{"text": "a held-out wikipedia sentence about rivers"}, {"text": "the choice text of a question here"},
            {"text": "kept healing line"}]
    kept, dropped = healing_texts(
        heal, [{"text": "analysis text"}], None, perplexity_examples=[{"text": "A held-out Wikipedia sentence about rivers"}],
        task_data=[{"rows": [("q", ["the choice text of a question here", "other"])]}],
    )
    assert kept == ["kept healing line"] and dropped == 2
    seqs = pack_tokens(tiny.tokenizer, ["one two three", "four five"], 4)
    assert all(2 <= len(s) <= 4 for s in seqs) and sum(map(len, seqs)) >= 5


def test_no_text_left_and_encoders_fail_with_stable_types(tiny):
    with pytest.raises(JobFailed) as err:
        with healed(tiny.model, tiny.tokenizer, [], OPTS):
            pass
    assert err.value.error_type == "heal_no_data"
    bert = tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=64))
    with pytest.raises(JobFailed) as err:
        with healed(bert, tiny.tokenizer, TEXTS, OPTS):
            pass
    assert err.value.error_type == "heal_unsupported"


@pytest.mark.parametrize(
    "bad",
    [{"steps": 0}, {"learning_rate": 0}, {"rank": 0}, {"dropout": 1.0}, {"targets": "embeddings"},
     {"max_tokens": 4}, {"export_dtype": "int8"}, {"bogus": 1}, {"learning_rate": float("nan")}],
)
def test_bad_heal_options_are_refused(bad):
    with pytest.raises(ValidationError):
        HealOptions(**bad)



def test_heal_export_needs_the_export_scorer():
    with pytest.raises(ValidationError, match="export_scorer"):
        PruneOptions(scorers=["gbis"], heal={"export": True})
    assert PruneOptions().heal is None
    assert PruneOptions(heal={"steps": 5}).heal.steps == 5


EVAL = [
    {"text": "the cat sat on the mat and looked at the birds outside"},
    {"text": "rivers flow down from the mountains to the sea every spring"},
    {"text": "a short line of text to read"},
]
QA = [{"question": "what is the capital of france?", "answer": "paris"}]


def test_prune_stage_heals_every_pruned_model_and_the_random_control(tiny):
    before = _snapshot(tiny.model)
    heal_rows = [{"text": t} for t in TEXTS] + [EVAL[0], {"text": "Q: what is the capital of france? A: paris"}]
    options = PruneOptions(
        scorers=["avss", "block_influence"], fraction=0.5, random_seeds=2, n_boot=50, timing_runs=0,
        tasks=["perplexity", "qa"], qa_max_new_tokens=2,
        heal={"steps": 6, "learning_rate": 1e-2, "max_tokens": 16, "rank": 4, "random_seeds": 1, "export": True},
    )
    seen: list[str] = []
    result = run_prune_stage(
        tiny, EVAL, options, JobContext(progress=lambda s, d, t: seen.append(s)),
        {"avss": Ranking((1, 2, 3, 0), "lowest", (0.4, 0.1, 0.2, 0.3))}, qa_examples=QA, heal_examples=heal_rows,
    )
    after = _snapshot(tiny.model)
    assert all(torch.equal(after[n], before[n]) for n in before) and after.keys() == before.keys()

    healing = result.summary["healing"]
    # Left out: EVAL[0], the rivers line (in TEXTS and EVAL) and the text holding the QA question.
    assert healing["corpus"]["left_out_overlapping_evaluated"] == 3
    assert healing["corpus"]["texts"] == len(heal_rows) - 3
    assert healing["random_seeds_healed"] == [0]
    assert set(healing["models"]) == {"avss", "block_influence", "random,seed=0"}
    for report in healing["models"].values():
        assert report["steps"] == 6 and report["loss_after"] < report["loss_before"]
    assert any(s.startswith("prune:heal 1/") for s in seen) and any(s.startswith("prune:healed 1/") for s in seen)

    ppl = next(e for e in result.summary["table"] if e["task"] == "perplexity")
    rows = {r["scorer"]: r for r in ppl["rows"]}
    for name in ("avss", "block_influence"):
        h = rows[name]["healed"]
        assert h["retained_pct"] == pytest.approx(100 * ppl["original"] / h["perplexity"])
        assert h["heal_gain_pct"] == pytest.approx(h["retained_pct"] - rows[name]["retained_pct"])
        low, high = h["retained_pct_ci"]
        assert low <= h["retained_pct"] <= high
        low, high = h["heal_gain_pct_ci"]
        assert low <= h["heal_gain_pct"] <= high
    assert rows["random"]["healed"]["seeds"] == [0]
    assert "f1" in {r["scorer"]: r for r in next(e for e in result.summary["table"] if e["task"] == "qa")["rows"]}[
        "avss"]["healed"]

    scopes = {(m.scope, m.name) for m in result.metrics}
    assert ("task=perplexity,scorer=avss,variant=healed", "retained_pct") in scopes
    assert ("task=perplexity,scorer=random,variant=healed", "retained_pct") in scopes
    assert ("task=perplexity,scorer=random,seed=0,variant=healed", "retained_pct") in scopes
    assert ("task=qa,scorer=block_influence,variant=healed", "heal_gain_pct") in scopes
    assert ("scorer=avss,variant=healed", "heal_loss_after") in scopes
    snap = Snapshot(metrics=[MetricRecord("prune", m.scope, m.name, m.value, m.ci_low, m.ci_high, m.n)
                             for m in result.metrics])
    rules = [
        parse_rule('metrics.prune."task=perplexity,scorer=avss,variant=healed".retained_pct.ci_low >= 0'),
        parse_rule("retained_performance.perplexity.avss.healed.ci_low >= 0"),
        parse_rule("retained_performance.perplexity.random.healed >= 0"),
    ]
    passed, results = evaluate(rules, snap)
    assert passed and results[0].n == 3, results
    healed_avss = rows["avss"]["healed"]
    assert results[1].observed == pytest.approx(healed_avss["retained_pct_ci"][0] / 100)
    assert results[2].observed == pytest.approx(rows["random"]["healed"]["retained_pct"] / 100)
    low, high = rows["random"]["healed"]["retained_pct_ci"]
    assert low is not None and low <= rows["random"]["healed"]["retained_pct"] <= high
    assert [a.name for a in result.artifacts] == ["healed-model-avss.tar.gz", "healed-model-avss.card.md", "prune.png",
                                                  "prune.svg"]
    with tarfile.open(fileobj=io.BytesIO(result.artifacts[0].data), mode="r:gz") as tar:
        assert "healed-model/config.json" in tar.getnames()


def test_prune_stage_heal_refuses_a_corpus_that_is_all_evaluated_text(tiny):
    options = PruneOptions(scorers=["block_influence"], random_seeds=0, n_boot=0, timing_runs=0,
                           tasks=["perplexity"], heal={"steps": 1})
    with pytest.raises(JobFailed) as err:
        run_prune_stage(tiny, EVAL, options, JobContext(), {}, heal_examples=EVAL)
    assert err.value.error_type == "heal_no_data"
