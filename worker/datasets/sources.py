"""Turn a `DatasetSpec` into a list of `Example`s.

Sources (exactly one per spec):

- `name`: a built-in set (`BUILTIN_DATASETS`), read from the installed `chatterbot-corpus`
  package, so no network is needed;
- `path`: a local `.jsonl`, `.json` (a list of objects), `.csv`, `.parquet` or `.txt` file
  that must resolve (symlinks and `..` resolved) under one of `settings.data_roots`; a
  relative path is looked up under each data root;
- `rows`: inline rows in the request;
- `hub`: a Hugging Face datasets id (`datasets.load_dataset(id, split=...)`; needs the
  `datasets` package and network).

`.txt` files: records separated by a blank line. When every record has exactly two lines
it is the LitCab QA format (line 1 the question, line 2 the gold answer); otherwise every
non-empty line is one text.

Columns map to our fields with `spec.fields` (`{"text": "content"}`); by default the
columns are named `text`, `question`, `answer`. A gold answer given as a list (or as a
Python list literal, as in LitCab's CSV files) becomes its aliases joined by `'; '`.
Columns that are not mapped are kept in `Example.meta["columns"]` (e.g. a label).

The examples are shuffled with `random.Random(spec.seed)` and cut to `spec.limit`
(deterministic). Truncation to `spec.max_tokens` happens at tokenization, not here.
"""

from __future__ import annotations

import ast
import csv
import difflib
import importlib.util
import io
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.catalog import BUILTIN_DATASETS
from app.config import Settings
from app.schemas import DatasetSpec, text_value_problem
from worker.stage import JobFailed

FIELDS = ("text", "question", "answer")
ALIAS_SEPARATOR = "; "
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet", ".txt")



@dataclass
class Example:
    text: str | None = None
    question: str | None = None
    answer: str | None = None  # gold; several aliases joined by '; '
    meta: dict = field(default_factory=dict)

    def as_text(self) -> str:
        """The text to run the model on: `text`, else "Question: q\\nAnswer: a"."""
        if self.text is not None:
            return self.text
        if self.answer is None:
            return f"Question: {self.question}\nAnswer:"
        return f"Question: {self.question}\nAnswer: {self.answer}"

    @property
    def aliases(self) -> list[str]:
        """The gold answer's aliases."""
        if not self.answer:
            return []
        return [a.strip() for a in self.answer.split(ALIAS_SEPARATOR) if a.strip()]


# ------------------------------------------------------------------ entry


def load_examples(spec: DatasetSpec, settings: Settings) -> list[Example]:
    """The examples `spec` asks for, shuffled with `spec.seed` and cut to `spec.limit`.
    Failures a user can act on raise `JobFailed` (`dataset_not_found`, `dataset_invalid`,
    `dataset_empty`, `dataset_too_large`, `path_not_allowed`)."""
    if spec.name is not None:
        examples = _builtin(spec.name)
        where = f"built-in dataset {spec.name!r}"
    elif spec.path is not None:
        path = _resolve_data_path(spec.path, settings)
        rows = _read_file(path, settings)
        examples = _map_rows(rows, spec.fields, where=f"file {path.name}", source=f"file:{path}")
        where = f"file {path.name}"
    elif spec.rows is not None:
        rows = [_Row(dict(r), f"row {i}", {"row": i}) for i, r in enumerate(spec.rows)]
        examples = _map_rows(rows, spec.fields, where="inline rows", source="inline")
        where = "inline rows"
    elif spec.hub is not None:
        return _from_hub(spec)
    else:  # pragma: no cover - DatasetSpec validates exactly one source
        raise JobFailed("dataset_invalid", "give exactly one dataset source: name, path, rows or hub")
    return _shuffle_take(examples, spec, where)


def _shuffle_take(examples: list[Example], spec: DatasetSpec, where: str) -> list[Example]:
    if not examples:
        raise JobFailed("dataset_empty", f"the {where} gave no examples")
    order = list(range(len(examples)))
    random.Random(spec.seed).shuffle(order)
    return [examples[i] for i in order[: spec.limit]]


# -------------------------------------------------------------- built-ins


def _corpus_dir() -> Path:
    found = importlib.util.find_spec("chatterbot_corpus")
    if found is None or not found.submodule_search_locations:
        raise JobFailed(
            "dataset_not_found",
            "the built-in datasets need the chatterbot-corpus package: pip install --no-deps chatterbot-corpus",
        )
    return Path(next(iter(found.submodule_search_locations))) / "data"


def _read_yaml(path: Path) -> Any:
    import yaml

    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _scalar_text(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text or None


def _builtin(name: str) -> list[Example]:
    if name == "chatterbot-trivia":
        return _chatterbot_trivia()
    if name == "chatterbot-conversations":
        return _chatterbot_conversations()
    close = difflib.get_close_matches(name, list(BUILTIN_DATASETS), n=1)
    raise JobFailed(
        "dataset_not_found",
        f"no built-in dataset {name!r}"
        + (f" (did you mean {close[0]!r}?)" if close else "")
        + f"; built-ins are {', '.join(BUILTIN_DATASETS)}. For your own data use path, rows or hub.",
    )


def _chatterbot_trivia() -> list[Example]:
    rel = "english/trivia.yml"
    data = _read_yaml(_corpus_dir() / rel) or {}
    out: list[Example] = []
    for i, conv in enumerate(data.get("conversations") or []):
        # One entry of the upstream file is a bare string, not a [question, answer] pair: skipped.
        if not isinstance(conv, list) or len(conv) < 2:
            continue
        question, answer = _scalar_text(conv[0]), _scalar_text(conv[1])
        if question and answer:
            out.append(
                Example(
                    question=question,
                    answer=answer,
                    meta={"source": "chatterbot-trivia", "file": rel, "row": i},
                )
            )
    return out


def _chatterbot_conversations() -> list[Example]:
    english = _corpus_dir() / "english"
    out: list[Example] = []
    for path in sorted(english.glob("*.yml")):
        data = _read_yaml(path) or {}
        for i, conv in enumerate(data.get("conversations") or []):
            lines = conv if isinstance(conv, list) else [conv]
            for turn, line in enumerate(lines):
                text = _scalar_text(line)
                if text:
                    out.append(
                        Example(
                            text=text,
                            meta={
                                "source": "chatterbot-conversations",
                                "file": f"english/{path.name}",
                                "conversation": i,
                                "turn": turn,
                            },
                        )
                    )
    return out


# ------------------------------------------------------------------ paths


def _resolve_data_path(name: str, settings: Settings) -> Path:
    roots = settings.data_roots
    if not roots:
        raise JobFailed(
            "path_not_allowed",
            f"local data files are disabled: no data roots are configured, so {name!r} cannot be read. "
            "An operator can set LAYERSCOPE_DATA_ROOTS; or send the rows inline.",
        )
    path = Path(name).expanduser()
    if not path.is_absolute():
        candidates = [Path(r).expanduser() / path for r in roots]
        path = next((c for c in candidates if c.exists()), candidates[0])
    resolved = path.resolve()
    if not any(resolved.is_relative_to(Path(r).expanduser().resolve()) for r in roots):
        raise JobFailed(
            "path_not_allowed",
            f"{name!r} resolves outside the data roots ({', '.join(str(r) for r in roots)}); "
            "put the file under one of them",
        )
    if not resolved.exists():
        raise JobFailed("dataset_not_found", f"no file {name!r} under the data roots")
    if not resolved.is_file():
        raise JobFailed("dataset_not_found", f"{name!r} is not a file")
    return resolved


# ------------------------------------------------------------------ files


@dataclass
class _Row:
    values: dict[str, Any]
    label: str  # "line 12", "row 3": names the row in messages
    meta: dict[str, Any]


def _invalid(path: Path, what: str) -> JobFailed:
    return JobFailed("dataset_invalid", f"{path.name}: {what}")


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _invalid(path, f"line {line}: not valid UTF-8") from exc


def _read_file(path: Path, settings: Settings) -> list[_Row]:
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise JobFailed(
            "dataset_invalid",
            f"{path.name}: unsupported file type {suffix or '(none)'!r}; use {', '.join(FILE_TYPES)}",
        )
    size = path.stat().st_size
    if size > settings.max_data_file_bytes:
        raise JobFailed(
            "dataset_too_large",
            f"{path.name} is {size:,} bytes, over the limit of {settings.max_data_file_bytes:,} bytes; "
            "use a smaller file (e.g. a sample)",
        )
    if suffix == ".parquet":
        return _read_parquet(path)
    text = _decode(path, path.read_bytes())
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    if suffix == ".json":
        return _read_json(path, text)
    if suffix == ".csv":
        return _read_csv(path, text)
    return _read_txt(path, text)


def _read_jsonl(path: Path, text: str) -> list[_Row]:
    rows: list[_Row] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _invalid(path, f"line {n}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(value, dict):
            raise _invalid(path, f"line {n}: expected a JSON object, got {type(value).__name__}")
        rows.append(_Row(value, f"line {n}", {"line": n}))
    return rows


def _read_json(path: Path, text: str) -> list[_Row]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _invalid(path, f"line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise _invalid(path, "expected a JSON list of objects (or one object per line in a .jsonl file)")
    rows = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _invalid(path, f"item {i}: expected a JSON object, got {type(item).__name__}")
        rows.append(_Row(item, f"item {i}", {"row": i}))
    return rows


def _read_csv(path: Path, text: str) -> list[_Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[_Row] = []
    try:
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
        if len(set(header)) != len(header) or any(not h for h in header):
            raise _invalid(path, f"line 1: the header needs unique, non-empty column names, got {header}")
        for record in reader:
            n = reader.line_num
            if not record or all(not c.strip() for c in record):
                continue
            if len(record) != len(header):
                raise _invalid(path, f"line {n}: {len(record)} fields, the header has {len(header)}")
            rows.append(_Row(dict(zip(header, record, strict=True)), f"line {n}", {"line": n}))
    except csv.Error as exc:
        raise _invalid(path, f"line {reader.line_num}: {exc}") from exc
    return rows


def _read_parquet(path: Path) -> list[_Row]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except ImportError as exc:
        raise JobFailed("dataset_invalid", "reading .parquet needs the pyarrow package") from exc
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for a damaged file
        raise _invalid(path, f"not a readable parquet file ({exc})") from exc
    return [_Row(r, f"row {i}", {"row": i}) for i, r in enumerate(table.to_pylist())]


def _read_txt(path: Path, text: str) -> list[_Row]:
    records: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            current.append((n, line.strip()))
        elif current:
            records.append(current)
            current = []
    if current:
        records.append(current)
    if records and all(len(r) == 2 for r in records):  # LitCab QA: question, gold answer
        return [
            _Row({"question": q, "answer": a}, f"line {qn}", {"line": qn}) for (qn, q), (_an, a) in records
        ]
    return [_Row({"text": line}, f"line {n}", {"line": n}) for record in records for n, line in record]


# -------------------------------------------------------------- mapping


def _answer_text(value: Any) -> str | None:
    if isinstance(value, (list, tuple)):
        parts = [_scalar_text(v) for v in value]
        joined = ALIAS_SEPARATOR.join(p for p in parts if p)
        return joined or None
    text = _scalar_text(value)
    if text and text.startswith("[") and text.endswith("]"):
        # LitCab's CSV files store the gold answers as a Python list literal: "['Paris']".
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text
        if isinstance(parsed, list) and parsed and all(isinstance(p, (str, int, float)) for p in parsed):
            return _answer_text(parsed)
    return text


def _field_text(value: Any) -> str | None:
    if isinstance(value, (dict, list, tuple)):
        return None
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from a parquet/pandas null
        return None
    return _scalar_text(value)


def _check_columns(columns: list[str], fields: dict[str, str], where: str) -> dict[str, str]:
    """Our field -> source column, after checking the mapped columns exist."""
    mapping = {f: fields.get(f, f) for f in FIELDS}
    for ours, col in fields.items():
        if col not in columns:
            raise JobFailed(
                "dataset_invalid",
                f"{where}: column {col!r} (for {ours}) not found; columns are {columns}; map it with dataset.fields",
            )
    if mapping["text"] not in columns and mapping["question"] not in columns:
        raise JobFailed(
            "dataset_invalid",
            f"{where}: column 'text' not found (nor 'question'); columns are {columns}; "
            'map it with dataset.fields, e.g. {"text": "' + (columns[0] if columns else "content") + '"}',
        )
    return mapping


def _map_rows(rows: Iterable[_Row], fields: dict[str, str], *, where: str, source: str) -> list[Example]:
    rows = list(rows)
    if not rows:
        return []
    columns: list[str] = []
    seen: set[str] = set()
    for r in rows:
        for c in r.values:
            if c not in seen:
                seen.add(c)
                columns.append(c)
    mapping = _check_columns(columns, fields, where)
    used = {mapping[f] for f in FIELDS}
    out: list[Example] = []
    for r in rows:
        for ours in FIELDS:
            if (problem := text_value_problem(r.values.get(mapping[ours]), ours)) is not None:
                raise JobFailed(
                    "dataset_invalid", f"{where}: {r.label}: column {mapping[ours]!r} ({ours}) {problem}"
                )
        text = _field_text(r.values.get(mapping["text"]))
        question = _field_text(r.values.get(mapping["question"]))
        answer = _answer_text(r.values.get(mapping["answer"]))
        if text is None and question is None:
            raise JobFailed(
                "dataset_invalid",
                f"{where}: {r.label} gives neither text (column {mapping['text']!r}) nor question "
                f"(column {mapping['question']!r}); fix or remove it, or map other columns with dataset.fields",
            )
        extra = {k: v for k, v in r.values.items() if k not in used}
        meta: dict[str, Any] = {"source": source, **r.meta}
        if extra:
            meta["columns"] = extra
        out.append(Example(text=text, question=question, answer=answer, meta=meta))
    return out


# -------------------------------------------------------------------- hub


def _from_hub(spec: DatasetSpec) -> list[Example]:
    assert spec.hub is not None
    hint = (
        "this worker may have no network to the Hugging Face hub; use a local file under the data roots, "
        f"inline rows, or a built-in dataset ({', '.join(BUILTIN_DATASETS)})"
    )
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise JobFailed(
            "dataset_not_found",
            f"hub datasets need the `datasets` package (pip install datasets) and network; {hint}",
        ) from exc
    try:
        ds = hf_datasets.load_dataset(spec.hub, split=spec.split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise JobFailed(
                "dataset_invalid", f"hub dataset {spec.hub!r}: split {spec.split!r} not found ({exc})"
            ) from exc
        raise JobFailed(
            "dataset_not_found", f"could not load hub dataset {spec.hub!r}: {exc}; {hint}"
        ) from exc
    except Exception as exc:  # DatasetNotFoundError, ConnectionError, OSError, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobFailed(
            "dataset_not_found",
            f"could not load hub dataset {spec.hub!r} (split {spec.split!r}): {reason}; check the id; {hint}",
        ) from exc
    where = f"hub dataset {spec.hub}"
    n = len(ds)
    if n == 0:
        raise JobFailed("dataset_empty", f"the {where} (split {spec.split!r}) has no rows")
    order = list(range(n))
    random.Random(spec.seed).shuffle(order)
    chosen = order[: spec.limit]
    columns = list(ds.column_names)
    # Column checks on the whole set, conversion only for the rows used.
    _check_columns(columns, spec.fields, where)
    subset = ds.select(chosen)
    rows = [_Row(dict(r), f"row {i}", {"row": i}) for i, r in zip(chosen, subset, strict=True)]
    return _map_rows(rows, spec.fields, where=where, source=f"hub:{spec.hub}@{spec.split}")
