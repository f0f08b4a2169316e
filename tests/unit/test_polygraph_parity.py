"""Dev-only: our white-box estimators against lm-polygraph's on the same SmolLM2-135M answers.

lm-polygraph is not a dependency of the service (it pulls in spaCy, fschat, bitsandbytes,
sentence-transformers, openai and more); this test runs where it is importable, e.g. a separate
venv that sees the project's packages:

    python -m venv /tmp/polyvenv
    echo /path/to/.venv/lib/python3.11/site-packages > /tmp/polyvenv/lib/python3.11/site-packages/zz.pth
    /tmp/polyvenv/bin/python -m pip install lm-polygraph==0.7.0
    /tmp/polyvenv/bin/python -m pytest tests/unit/test_polygraph_parity.py

Our greedy answers come from `worker.lm.generate`; lm-polygraph's statistics
(`greedy_log_likelihoods` and, through its `EntropyCalculator`, `entropy`) are rebuilt from one
teacher-forced forward pass over prompt + answer tokens + the end-of-answer token, as lm-polygraph
keeps the token that ends a generation. Its estimators give uncertainties; ours give
confidences: MSP = exp(-MaximumSequenceProbability), perplexity = exp(-Perplexity),
mean_token_entropy = exp(-MeanTokenEntropy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip(
    "lm_polygraph", reason="lm-polygraph is not installed here (a dev-only comparison; see the module doc)"
)

from lm_polygraph.estimators import MaximumSequenceProbability, MeanTokenEntropy, Perplexity  # noqa: E402
from lm_polygraph.stat_calculators.entropy import EntropyCalculator  # noqa: E402

from app.config import Settings  # noqa: E402
from app.schemas import ModelSpec  # noqa: E402
from worker.hallucination.detectors import (  # noqa: E402
    entropy_confidence,
    inverse_perplexity,
    max_sequence_probability,
)
from worker.hallucination.generation import build_prompt, generate  # noqa: E402
from worker.modelzoo import load_model  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "What gas do plants absorb from the air?",
             "How many legs does a spider have?", "Who wrote Hamlet?", "What is the largest planet?",
             "What is frozen water called?"]
SHOTS = [("What color is the sky on a clear day?", "blue"), ("What is 2 + 3?", "5")]


def test_our_estimators_equal_lm_polygraphs_on_the_same_generations(tmp_path) -> None:
    lm = load_model(ModelSpec(name="smollm2-135m", device="cpu"), Settings(data_dir=tmp_path))
    prompts = [build_prompt(q, SHOTS) for q in QUESTIONS]
    run = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=12, batch_size=3)
    gens = [g for g in run.generations if g.token_ids]
    assert gens and any(g.end_logprob is not None for g in gens)
    lls, logprob_rows = [], []
    with torch.inference_mode():
        for prompt, g in zip(prompts, run.generations, strict=True):
            if not g.token_ids:
                continue
            prompt_ids = lm.tokenizer(prompt)["input_ids"]
            # the end token itself: the greedy pass's argmax after the answer, re-read from the model
            ids = torch.tensor([prompt_ids + g.token_ids])
            logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), dim=-1)
            steps = logp[len(prompt_ids) - 1 :]  # the distribution before each answer token, then the end
            if g.end_logprob is None:
                steps = steps[:-1]
            chosen = [float(steps[j, t]) for j, t in enumerate(g.token_ids)]
            if g.end_logprob is not None:
                chosen.append(float(steps[-1].max()))  # greedy: the end token was the argmax
            lls.append(np.asarray(chosen))
            logprob_rows.append(steps.numpy())
    stats = {"greedy_log_likelihoods": lls}
    stats.update(EntropyCalculator()({"greedy_log_probs": logprob_rows}))
    np.testing.assert_allclose(max_sequence_probability(gens, with_end=True),
                               np.exp(-MaximumSequenceProbability()(stats)), rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(inverse_perplexity(gens), np.exp(-Perplexity()(stats)), rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(entropy_confidence(gens), np.exp(-MeanTokenEntropy()(stats)), rtol=2e-3, atol=1e-6)
