"""Datasets: built-in sets, local files (jsonl/json/csv/parquet/txt), inline rows and hub ids,
mapped to `Example`s (text, or question + gold answer)."""

from worker.datasets.sources import BUILTIN_DATASETS, Example, load_examples

__all__ = ["BUILTIN_DATASETS", "Example", "load_examples"]
