"""Multiple choice built from a short-answer QA file (LitCab format: records separated by a
blank line, line 1 the question, line 2 the gold answer, aliases joined by "; ").

Each question gets its gold answer (its first alias) and up to `N_DISTRACTORS` distractors:
other gold answers of the same file, drawn with `random.Random(SEED + index)` from the file's
distinct gold answers, leaving out any equal to one of this question's aliases or to a
distractor already drawn (case-insensitively); the gold's position is drawn the same way.
The same file therefore always gives the same items. lm-eval loads this
module through the YAMLs' `!function utils.litcab_mc`.
"""

from __future__ import annotations

import random
from typing import Any

N_DISTRACTORS = 3
SEED = 1234
ALIAS_SEPARATOR = "; "


def parse_record(text: str) -> tuple[str, list[str]] | None:
    """(question, aliases) of one record, or None when it is not a question/answer pair."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) != 2:
        return None
    aliases = [a.strip() for a in lines[1].split(ALIAS_SEPARATOR) if a.strip()]
    return (lines[0], aliases) if aliases else None


def build_items(records: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    """Question, choices and gold index (`label`) per record (module doc)."""
    unique = sorted({aliases[0] for _q, aliases in records})
    items: list[dict[str, Any]] = []
    for i, (question, aliases) in enumerate(records):
        taken = {a.lower() for a in aliases}
        rng = random.Random(SEED + i)
        # enough candidates that N_DISTRACTORS remain after leaving out this question's aliases
        candidates = rng.sample(unique, min(len(unique), N_DISTRACTORS + len(aliases)))
        distractors: list[str] = []
        for g in candidates:
            if g.lower() not in taken and len(distractors) < N_DISTRACTORS:
                distractors.append(g)
                taken.add(g.lower())
        if not distractors:
            continue
        label = rng.randrange(len(distractors) + 1)
        choices = distractors[:label] + [aliases[0]] + distractors[label:]
        items.append({"question": question, "choices": choices, "label": label})
    return items


def litcab_mc(dataset: Any) -> Any:
    """lm-eval `process_docs`: the `text` builder's paragraphs -> multiple-choice docs."""
    import datasets

    records = [r for r in (parse_record(t) for t in dataset["text"]) if r is not None]
    return datasets.Dataset.from_list(build_items(records))
