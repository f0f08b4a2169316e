"""QA generation for the hallucination stage (docs/method.md sections 4-5).

Prompts
- `build_prompt`: a few-shot prompt from training examples (`Question: ...` /
  `Answer: ...` blocks, the first gold alias as the shot's answer), or, with
  `use_chat_template` and a tokenizer that has one, the same shots as chat turns
  (user question, assistant answer) ending with the generation prompt.
- `verbalized_prompt`: the answer prompt followed by the model's answer and a
  request for its confidence (0-100), plain or as one more chat turn.
- `pick_shots`: which training examples become shots (seeded).

Generation: `worker.lm.generate.generate` (the generator the QA task uses too; greedy or
sampled, stop at a newline, per-token log-probabilities, the last prompt token's hidden
state), re-exported here with `Generation` and `GenerationRun`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from worker.lm.generate import Generation, GenerationRun, generate, stop_token_ids

__all__ = [
    "DEFAULT_INSTRUCTION",
    "VERBALIZED_QUESTION",
    "Generation",
    "GenerationRun",
    "build_prompt",
    "first_alias",
    "generate",
    "parse_verbalized",
    "pick_shots",
    "stop_token_ids",
    "verbalized_prompt",
]

DEFAULT_INSTRUCTION = "Answer each question with a short answer."
VERBALIZED_QUESTION = (
    "How confident are you that this answer is correct? Reply with a number from 0 to 100."
)


def first_alias(gold: str | Sequence[str]) -> str:
    """The first gold alias (aliases are joined by '; ')."""
    if isinstance(gold, str):
        parts = [p.strip() for p in gold.split("; ") if p.strip()]
    else:
        parts = [str(p).strip() for p in gold if str(p).strip()]
    return parts[0] if parts else ""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def pick_shots(n_items: int, n_shots: int, seed: int, eligible: Sequence[bool] | None = None) -> list[int]:
    """`n_shots` distinct indices in 0..n_items-1 (only `eligible` ones), chosen by `seed`,
    in the order drawn."""
    pool = np.arange(n_items) if eligible is None else np.flatnonzero(np.asarray(eligible, dtype=bool))
    if n_shots <= 0 or pool.size == 0:
        return []
    rng = np.random.default_rng(seed)
    take = min(n_shots, pool.size)
    return [int(i) for i in rng.permutation(pool)[:take]]


def _chat_template_ok(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _chat_messages(
    question: str, shots: Sequence[tuple[str, str]], instruction: str
) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    turns = [*shots, (question, None)]
    for i, (q, a) in enumerate(turns):
        content = f"Question: {_one_line(q)}"
        if i == 0 and instruction:
            content = f"{instruction}\n\n{content}"
        messages.append({"role": "user", "content": content})
        if a is not None:
            messages.append({"role": "assistant", "content": _one_line(a)})
    return messages


def build_prompt(
    question: str,
    shots: Sequence[tuple[str, str]],
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    tokenizer: Any = None,
    use_chat_template: bool = False,
) -> str:
    """The answer prompt for `question` with `shots` (question, answer) pairs.

    Plain form (also the fallback when the tokenizer has no chat template)::

        {instruction}

        Question: {q1}
        Answer: {a1}

        ...
        Question: {question}
        Answer:

    Newlines inside questions and answers are collapsed to spaces, so a newline in
    the output always ends the answer.
    """
    if use_chat_template and tokenizer is not None and _chat_template_ok(tokenizer):
        return tokenizer.apply_chat_template(
            _chat_messages(question, shots, instruction), tokenize=False, add_generation_prompt=True
        )
    parts = [f"{instruction}\n\n"] if instruction else []
    for q, a in shots:
        parts.append(f"Question: {_one_line(q)}\nAnswer: {_one_line(a)}\n\n")
    parts.append(f"Question: {_one_line(question)}\nAnswer:")
    return "".join(parts)


def verbalized_prompt(
    question: str,
    answer: str,
    shots: Sequence[tuple[str, str]],
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    tokenizer: Any = None,
    use_chat_template: bool = False,
) -> str:
    """The answer prompt, the model's `answer`, then `VERBALIZED_QUESTION`; the model's
    next line is parsed by `parse_verbalized`."""
    if use_chat_template and tokenizer is not None and _chat_template_ok(tokenizer):
        messages = _chat_messages(question, shots, instruction)
        messages.append({"role": "assistant", "content": _one_line(answer)})
        messages.append({"role": "user", "content": VERBALIZED_QUESTION})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    base = build_prompt(question, shots, instruction=instruction)
    return f"{base} {_one_line(answer)}\n{VERBALIZED_QUESTION}\nConfidence (0-100):"


_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d+)?)\s*(%|percent)?")


def parse_verbalized(text: str) -> float | None:
    """The first number in `text` that lies in 0..100, as a confidence in [0, 1]
    ("85", "85%", "85.5", "Confidence: 90/100"); None when there is none."""
    for m in _NUMBER.finditer(text or ""):
        value = float(m.group(1))
        if 0.0 <= value <= 100.0:
            return value / 100.0
    return None
