"""Automatic batch size: OOM back-off, retry, the remembered size, and unchanged results."""

from __future__ import annotations

import math

import pytest
import torch

from tests.unit.test_profiler_fixtures import TEXTS
from tests.unit.test_profiler_fixtures import loaded as loaded  # noqa: F401  (fixture)
from worker.lm import batching
from worker.lm.batching import AutoBatch, is_out_of_memory, model_key


@pytest.fixture(autouse=True)
def _fresh():
    batching.forget()
    yield
    batching.forget()


def _oom_above(limit: int, calls: list[int], error: type[BaseException] = torch.OutOfMemoryError):
    def compute(rows):
        calls.append(len(rows))
        if len(rows) > limit:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [r * 10 for r in rows]

    return compute


def test_oom_halves_retries_and_remembers():
    model = torch.nn.Linear(2, 2)
    calls: list[int] = []
    batcher = AutoBatch("unit", model, requested=8)
    got, seen = [], []
    for item in batcher.run(range(11), _oom_above(3, calls)):
        got.append(item)
        seen.append((batcher.progress, (batcher.done, batcher.total)))
    # Progress is in rows and never goes back (in batches the total grows from 2 to 6 with the back-offs).
    assert [p for p, _ in seen] == [(2, 11), (4, 11), (6, 11), (8, 11), (10, 11), (11, 11)]
    assert [b for _, b in seen][0] == (1, 6)
    # 8 fails, 4 fails, then 2 at a time; the failed rows are run again, in order
    assert calls == [8, 4, 2, 2, 2, 2, 2, 1]
    assert [rows for rows, _ in got] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]]
    assert [x for _, out in got for x in out] == [r * 10 for r in range(11)]
    assert batcher.backoffs == [(8, 4), (4, 2)]
    assert batcher.size == 2 and batcher.done == batcher.total == 6
    assert "lowered to 2" in (batcher.warning() or "")
    assert batching.remembered("unit", model) == 2

    # the next run on the same model and workload starts at the remembered size: no failure
    calls.clear()
    again = AutoBatch("unit", model, requested=8)
    assert again.size == 2
    list(again.run(range(4), _oom_above(3, calls)))
    assert calls == [2, 2] and again.backoffs == []
    # other workloads and other models are not affected
    assert AutoBatch("other", model, requested=8).size == 8
    assert AutoBatch("unit", torch.nn.Linear(2, 2, dtype=torch.float64), requested=8).size == 8


def test_runtime_error_out_of_memory_backs_off():
    calls: list[int] = []
    batcher = AutoBatch("unit", None, requested=4)
    out = list(batcher.run(range(4), _oom_above(2, calls, RuntimeError)))
    assert calls == [4, 2, 2] and len(out) == 2


def test_other_errors_and_oom_at_the_smallest_size_are_raised():
    def broken(rows):
        raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(RuntimeError, match="device-side"):
        list(AutoBatch("unit", None, requested=8).run(range(8), broken))
    calls: list[int] = []
    with pytest.raises(torch.OutOfMemoryError):
        list(AutoBatch("unit", None, requested=2).run(range(4), _oom_above(0, calls)))
    assert calls == [2, 1]
    calls.clear()
    with pytest.raises(torch.OutOfMemoryError):
        list(AutoBatch("unit2", None, requested=8, min_size=4).run(range(8), _oom_above(2, calls)))
    assert calls == [8, 4]


@pytest.mark.parametrize(
    ("exc", "oom"),
    [
        (torch.OutOfMemoryError("CUDA out of memory"), True),
        (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
        (OSError(12, "Cannot allocate memory"), True),
        (MemoryError(), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_out_of_memory(exc, oom):
    assert is_out_of_memory(exc) is oom


def test_results_equal_an_unfailed_run_with_a_real_forward():
    """OOM injected inside a model's forward at batch > 2: the per-row outputs are those of an
    un-failed run at the backed-off size, and of the requested size to float rounding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    data = torch.randn(10, 16)

    def oom_hook(module, args):
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    def compute(rows):
        with torch.inference_mode():
            return model(data[rows])

    def run(requested: int) -> tuple[torch.Tensor, AutoBatch]:
        batcher = AutoBatch("forward", model, requested=requested)
        return torch.cat([out for _, out in batcher.run(range(10), compute)]), batcher

    clean4, _ = run(4)
    clean2, _ = run(2)
    handle = model[2].register_forward_pre_hook(oom_hook)  # fails half-way through the forward
    try:
        failed, batcher = run(4)
    finally:
        handle.remove()
    assert batcher.backoffs == [(4, 2)] and batching.remembered("forward", model) == 2
    assert torch.equal(failed, clean2)
    torch.testing.assert_close(failed, clean4, rtol=1e-6, atol=1e-6)


def test_model_key_names_class_dtype_and_device():
    key = model_key(torch.nn.Linear(2, 2, dtype=torch.bfloat16))
    assert key.startswith("Linear|") and "torch.bfloat16" in key and "cpu" in key
    assert model_key(object()) == "object||?|?"


# ------------------------------------------------------------- at a call site: the profiler


def _oom_in_block(model, block: int, above: int):
    """A pre-hook on one block that raises CUDA's OOM for batches of more than `above` rows:
    the blocks before it have already been captured when it fires."""

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[0] > above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")

    return model.model.layers[block].register_forward_pre_hook(hook, with_kwargs=True)


def _stats(prof) -> dict:
    d = prof.to_dict()
    return {k: v for k, v in d.items() if k not in ("warnings", "n_batches")}


def test_profile_backs_off_and_matches_an_unfailed_run(loaded):  # noqa: F811
    from app.schemas import ProfileOptions
    from worker.profiler import profile
    from worker.stage import JobContext

    sites = ["block_output", "mlp_activation"]

    def run(batch_size: int, progress: list | None = None):
        ctx = JobContext(progress=lambda s, d, t: progress.append((d, t))) if progress is not None else JobContext()
        return profile(loaded, TEXTS, ProfileOptions(sites=sites, batch_size=batch_size), ctx, max_tokens=24)

    clean4, clean2 = run(4), run(2)
    batching.forget()
    handle = _oom_in_block(loaded.model, 1, above=2)
    seen: list = []
    try:
        failed = run(4, seen)
    finally:
        handle.remove()
    assert batching.remembered("profile", loaded.model) == 2
    assert any("batch size 4 lowered to 2" in w for w in failed.warnings)
    assert failed.n_batches == clean2.n_batches
    # progress counts rows: the back-off adds batches but the bar never goes back, and ends full
    assert seen[0] == (0, len(TEXTS)) and seen[-1] == (len(TEXTS), len(TEXTS))
    assert all(t == len(TEXTS) for _, t in seen) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    # no partial batch was merged: identical to a run at the backed-off size ...
    assert _stats(failed) == _stats(clean2)
    # ... and to the requested size up to float rounding of a differently padded forward
    for site in sites:
        for a, b in zip(failed.to_dict()["stats"][site], clean4.to_dict()["stats"][site], strict=True):
            assert a["count"] == b["count"]
            assert math.isclose(a["mean"], b["mean"], rel_tol=1e-5, abs_tol=1e-9)
    # the next job on this model starts at 2 and fails no batch
    again = run(4)
    assert _stats(again) == _stats(clean2)


# ------------------------------------------------------------- at a call site: the scorers


@pytest.fixture(scope="module")
def tiny_llama_lm(tmp_path_factory):
    from app.config import Settings
    from app.schemas import ModelSpec
    from worker.modelzoo import load_model

    return load_model(ModelSpec(name="tiny-random-llama"), Settings(data_dir=tmp_path_factory.mktemp("ls")))


SCORE_TEXTS = [
    "the cat sat on the mat and looked at the birds",
    "rivers flow to the sea",
    "a quick brown fox jumps over the lazy dog again",
    "one two three",
    "layers of a model, pruned",
]


@pytest.mark.parametrize("scorer", ["block_influence", "gbis", "lrp", "cim"])
def test_scorers_back_off_and_match_an_unfailed_run(tiny_llama_lm, scorer):
    from worker.scoring.scorers import compute_scores

    model, tok = tiny_llama_lm.model, tiny_llama_lm.tokenizer
    clean = compute_scores(scorer, model, tok, SCORE_TEXTS, batch_size=2, max_tokens=32)
    batching.forget()
    handle = _oom_in_block(model, 1, above=2)
    try:
        failed = compute_scores(scorer, model, tok, SCORE_TEXTS, batch_size=5, max_tokens=32)
    finally:
        handle.remove()
    assert batching.remembered(scorer, model) == 2
    assert failed.scores == clean.scores  # exactly: same batches once backed off, nothing half-counted
    assert all(not p.requires_grad for p in model.parameters()) is False  # flags restored


def test_gradient_scorers_keep_no_activation_for_parameter_grads(monkeypatch):
    """GBIS/LRP with parameters frozen: the same scores, and autograd saves less (no linear
    layer input kept for a weight gradient); measured as the distinct bytes packed by
    saved-tensor hooks on a small-vocabulary Llama (so the LM head's logits do not dominate)."""
    import contextlib
    import importlib

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.unit.test_profiler_fixtures import CharTokenizer
    from worker.scoring import scorers

    gbis, lrp = (importlib.import_module(f"worker.scoring.scorers.{n}") for n in ("gbis", "lrp"))

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=224, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )).eval()
    tok = CharTokenizer()
    params = {p.data_ptr() for p in model.parameters()}

    def saved_bytes(fn):
        seen: dict[tuple[int, int], int] = {}

        def pack(t):
            if t.data_ptr() not in params:
                seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            table = fn()
        return sum(seen.values()), table

    for name in ("gbis", "lrp"):
        run = lambda name=name: scorers.compute_scores(name, model, tok, SCORE_TEXTS, batch_size=5)  # noqa: E731
        frozen, table_frozen = saved_bytes(run)
        with monkeypatch.context() as m:
            for module in (gbis, lrp):
                m.setattr(module, "frozen_parameters", lambda model: contextlib.nullcontext())
            before, table_before = saved_bytes(run)
        assert all(p.requires_grad for p in model.parameters())  # flags restored
        torch.testing.assert_close(
            torch.tensor(table_frozen.scores), torch.tensor(table_before.scores), rtol=1e-5, atol=1e-8
        )
        assert frozen < 0.9 * before, (name, frozen, before)
        print(f"{name}: saved activations {before} -> {frozen} bytes ({frozen / before:.2f}x)")


# --------------------------------------------------------- at a call site: evaluation tasks


def test_evaluation_tasks_back_off_and_match_an_unfailed_run(tiny_llama_lm):
    from worker.evaluation.tasks import evaluate_classification, evaluate_perplexity, evaluate_qa

    model, tok = tiny_llama_lm.model, tiny_llama_lm.tokenizer
    questions = ["what flows to the sea?", "who sat on the mat?", "how many?", "why?", "where is the fox?"]
    runs = {
        "perplexity": lambda bs: evaluate_perplexity(model, tok, SCORE_TEXTS, batch_size=bs, n_boot=50),
        "classification": lambda bs: evaluate_classification(
            model, tok, SCORE_TEXTS, ["good", "bad", "good", "bad", "good"], label_words=["good", "bad"],
            batch_size=bs, n_boot=50,
        ),
        "generate": lambda bs: evaluate_qa(
            model, tok, questions, ["the river"] * 5, max_new_tokens=4, batch_size=bs, n_boot=50
        ),
    }
    for workload, run in runs.items():
        clean = run(2)
        batching.forget()
        handle = _oom_in_block(model, 1, above=2)
        try:
            failed = run(5)
        finally:
            handle.remove()
        assert batching.remembered(workload, model) == 2, workload
        assert failed.per_example == clean.per_example, workload
        assert failed.metrics == clean.metrics, workload


def test_generation_backs_off_and_matches_an_unfailed_run(tiny_llama_lm):
    from worker.lm.generate import generate

    prompts = [f"Q: what is {w}?\nA:" for w in ("water", "a fox", "the sea", "one", "a mat")]
    for temperature, samples in ((0.0, 1), (0.8, 2)):
        def run(bs: int, temperature: float = temperature, samples: int = samples):
            return generate(tiny_llama_lm.model, tiny_llama_lm.tokenizer, prompts, max_new_tokens=5, batch_size=bs, temperature=temperature,
                            num_samples=samples, seed=3, capture_last_hidden=True)

        clean = run(2)
        batching.forget()
        handle = _oom_in_block(tiny_llama_lm.model, 1, above=2)
        try:
            failed = run(4)
        finally:
            handle.remove()
        assert batching.remembered("generate", tiny_llama_lm.model) == 2
        assert [g.token_ids for g in failed.generations] == [g.token_ids for g in clean.generations]
        assert [g.logprobs for g in failed.generations] == [g.logprobs for g in clean.generations]
        assert (failed.last_hidden == clean.last_hidden).all() and failed.batches == clean.batches
