"""`verbalized`: the model's own 0-100 after being asked (`generation.verbalized_prompt`, one
more short greedy generation per test answer); a reply without a number in 0-100 counts as
0.5 and is counted (`counts["verbalized_unparseable"]`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.schemas import HallucinationOptions
from worker.hallucination.detectors.base import Detector, DetectorInput, Scored
from worker.hallucination.generation import generate, parse_verbalized, verbalized_prompt


def verbalized_confidence(replies: Sequence[str], default: float = 0.5) -> tuple[np.ndarray, int]:
    """(confidence per reply, number of unparseable replies, which got `default`)."""
    out = np.zeros(len(replies), dtype=np.float64)
    bad = 0
    for i, text in enumerate(replies):
        value = parse_verbalized(text)
        if value is None:
            bad += 1
            value = default
        out[i] = value
    return out, bad


class Verbalized(Detector):
    name = "verbalized"
    phase = "generation"
    compute = "one greedy generation of verbalized_max_new_tokens per test answer"
    options = ("verbalized_max_new_tokens", "batch_size", "instruction", "use_chat_template")
    timing = "generate_verbalized"

    def units(self, n_test: int, options: HallucinationOptions) -> int:
        return -(-n_test // options.batch_size)

    def score(self, inp: DetectorInput) -> Scored:
        a, o = inp.answers, inp.options
        prompts = [
            verbalized_prompt(a.qa.items[i].question, a.generations[i].text, a.qa.shots, instruction=o.instruction,
                              tokenizer=inp.loaded.tokenizer, use_chat_template=o.use_chat_template)
            for i in a.qa.test_rows
        ]
        run = generate(inp.loaded.model, inp.loaded.tokenizer, prompts, max_new_tokens=o.verbalized_max_new_tokens,
                       batch_size=o.batch_size, ctx=inp.ctx, on_batch=inp.on_batch)
        replies = [g.text for g in run.generations]
        conf, bad = verbalized_confidence(replies)
        warnings = []
        if bad:
            warnings.append(f"verbalized: {bad} of {a.qa.n_test} replies had no number in 0-100 and count as 0.5")
        return Scored(confidence=a.full(conf), replies=replies, warnings=warnings,
                      counts={"verbalized_unparseable": bad})
