"""The types of per-layer values: which keys are counts or ranks (integers), which are flags
(booleans), the rest are real numbers (or null where undefined).

One table for both sides: the worker writes every layer row through `typed` (so a rank is
stored as 1, a flag as true, whatever a stage handed over), the API reads rows stored
before this table existed through it too (they hold 1.0 and 0.0), and the OpenAPI schema of
`LayerRowOut.values` declares these keys with their types, so a generated client sees ints
and bools. Profile rows key values `<site>.<statistic>`; the statistic decides the type.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Counts and ranks (rank 1 = least important: the first pruning candidate).
INTEGER_KEYS: dict[str, str] = {
    "rank": "Rank of the layer under this scorer, 1 = least important (the first pruning candidate).",
    "rank_alt": "avss: the rank with the leading positions toggled (`skip_positions` flipped).",
    "eavss_rank": "Rank of the layer by EAVSS, 1 = most hallucination-related.",
    "count": "Activation elements counted.",
    "tokens": "Token positions counted.",
    "examples": "Examples profiled.",
    "n": "layer_probe: test answers the probe was scored on.",
    "n_train": "layer_probe: training answers the probe was fitted on.",
    "n_correct": "eavss: correct training answers (the group sizes of the contrast).",
    "n_hallucinated": "eavss: hallucinated training answers.",
}
FLAG_KEYS: dict[str, str] = {
    "prune": "The layer is proposed for pruning (avss) or removed by this scorer (prune).",
    "massive": "avss: the layer carries massive activations (max|a| / median|a| over the threshold).",
    "tuned": "mitigate: the layer was tuned (EAVSS variant).",
    "control": "mitigate: the layer was tuned in the random control.",
}

LayerValue = bool | int | float | None


def kind(key: str) -> str:
    """`integer`, `boolean` or `number` for a value key (`<site>.<statistic>` by its statistic)."""
    stat = key.rsplit(".", 1)[-1]
    if stat in FLAG_KEYS:
        return "boolean"
    if stat in INTEGER_KEYS:
        return "integer"
    return "number"


def typed_value(key: str, value: Any) -> LayerValue:
    """The value as its key's type; null for anything undefined (NaN, inf, not a number)."""
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, bool):
        flag = value
        number: float = float(value)
    else:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(number):
            return None
        flag = number != 0.0
    k = kind(key)
    if k == "boolean":
        return flag
    if k == "integer" and number.is_integer():
        return int(number)
    return number


def typed(values: Mapping[str, Any]) -> dict[str, LayerValue]:
    return {k: typed_value(k, v) for k, v in values.items()}


def json_schema() -> dict[str, Any]:
    """The OpenAPI schema of `values`: the integer and flag keys declared, every other key a number."""
    props: dict[str, Any] = {}
    for key, text in INTEGER_KEYS.items():
        props[key] = {"anyOf": [{"type": "integer"}, {"type": "null"}], "description": text}
    for key, text in FLAG_KEYS.items():
        props[key] = {"anyOf": [{"type": "boolean"}, {"type": "null"}], "description": text}
    return {
        "type": "object",
        "title": "LayerValues",
        "properties": props,
        "additionalProperties": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "description": (
            "The layer's numbers, by name (which names a row has depends on its stage and scorer; "
            "profile rows name them `<site>.<statistic>`, typed by the statistic). Counts and ranks are "
            "integers, flags booleans, every other value a number; null where undefined."
        ),
    }
