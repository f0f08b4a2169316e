"""Dataset loading from built-ins, local files (fixtures written to tmp_path), inline rows and
the hub (the `datasets` package is faked: no network in tests)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from app.config import Settings
from app.schemas import DatasetSpec
from worker.datasets import BUILTIN_DATASETS, Example, load_examples
from worker.stage import JobFailed


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def _settings(root: Path, **kw) -> Settings:
    return Settings(data_dir=root.parent / "state", data_roots=[root], **kw)


def _fail(spec: DatasetSpec, settings: Settings) -> JobFailed:
    with pytest.raises(JobFailed) as err:
        load_examples(spec, settings)
    return err.value


# ------------------------------------------------------------------ Example


def test_example_as_text() -> None:
    assert Example(text="hello").as_text() == "hello"
    assert Example(question="Who?", answer="Me").as_text() == "Question: Who?\nAnswer: Me"
    assert Example(text="t", question="q", answer="a").as_text() == "t"
    assert Example(question="Who?", answer="A; B").aliases == ["A", "B"]


# --------------------------------------------------------------- built-ins


def test_builtin_trivia() -> None:
    spec = DatasetSpec(name="chatterbot-trivia", limit=100_000)
    ex = load_examples(spec, Settings())
    assert 200 <= len(ex) <= 300
    assert all(e.question and e.answer and e.text is None for e in ex)
    by_q = {e.question: e.answer for e in ex}
    assert by_q["Who was the 37th President of the United States?"] == "Richard Nixon"
    assert by_q["What year was President John F. Kennedy assassinated?"] == "1963"
    assert set(BUILTIN_DATASETS) >= {"chatterbot-trivia", "chatterbot-conversations"}


def test_builtin_conversations() -> None:
    ex = load_examples(DatasetSpec(name="chatterbot-conversations", limit=100_000), Settings())
    assert len(ex) > 2000
    assert all(e.text and e.question is None for e in ex)
    assert {e.meta["file"] for e in ex} >= {"english/trivia.yml", "english/greetings.yml"}


def test_builtin_unknown() -> None:
    err = _fail(DatasetSpec(name="chatterbot-trivai"), Settings())
    assert err.error_type == "dataset_not_found"
    assert "chatterbot-trivia" in err.detail


def test_shuffle_is_deterministic_and_limited() -> None:
    a = load_examples(DatasetSpec(name="chatterbot-trivia", limit=10, seed=7), Settings())
    b = load_examples(DatasetSpec(name="chatterbot-trivia", limit=10, seed=7), Settings())
    c = load_examples(DatasetSpec(name="chatterbot-trivia", limit=10, seed=8), Settings())
    assert len(a) == 10
    assert [e.question for e in a] == [e.question for e in b]
    assert [e.question for e in a] != [e.question for e in c]
    # A smaller limit is a prefix of a larger one (shuffle, then take).
    d = load_examples(DatasetSpec(name="chatterbot-trivia", limit=5, seed=7), Settings())
    assert [e.question for e in d] == [e.question for e in a[:5]]


# -------------------------------------------------------------- inline rows


def test_inline_rows_and_field_mapping() -> None:
    rows = [{"content": f"text {i}", "label": i % 2} for i in range(5)]
    ex = load_examples(DatasetSpec(rows=rows, fields={"text": "content"}, limit=100), Settings())
    assert sorted(e.text for e in ex) == [f"text {i}" for i in range(5)]
    e = next(e for e in ex if e.text == "text 3")
    assert e.meta["columns"] == {"label": 1} and e.meta["row"] == 3 and e.meta["source"] == "inline"


def test_inline_qa_with_alias_list() -> None:
    rows = [{"q": "Capital of France?", "gold": ["Paris", "paris, France"]}]
    ex = load_examples(DatasetSpec(rows=rows, fields={"question": "q", "answer": "gold"}), Settings())
    assert ex == [
        Example(
            question="Capital of France?", answer="Paris; paris, France", meta={"source": "inline", "row": 0}
        )
    ]


def test_missing_mapped_column() -> None:
    err = _fail(DatasetSpec(rows=[{"body": "x"}], fields={"text": "content"}), Settings())
    assert err.error_type == "dataset_invalid"
    assert "column 'content'" in err.detail and "['body']" in err.detail and "dataset.fields" in err.detail


def test_no_text_or_question_column() -> None:
    err = _fail(DatasetSpec(rows=[{"body": "x"}]), Settings())
    assert err.error_type == "dataset_invalid"
    assert "'text'" in err.detail and "['body']" in err.detail and "dataset.fields" in err.detail


def test_row_without_text_named() -> None:
    err = _fail(DatasetSpec(rows=[{"text": "a"}, {"text": "b"}, {"text": "  "}]), Settings())
    assert err.error_type == "dataset_invalid"
    assert "row 2" in err.detail


# -------------------------------------------------------------------- files


def test_jsonl(root: Path) -> None:
    lines = [json.dumps({"text": f"line {i}", "id": i}) for i in range(4)]
    (root / "d.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    ex = load_examples(DatasetSpec(path="d.jsonl", limit=10), _settings(root))
    assert sorted(e.text for e in ex) == [f"line {i}" for i in range(4)]
    assert {e.meta["line"] for e in ex} == {1, 2, 4, 5}


def test_jsonl_malformed_names_file_and_line(root: Path) -> None:
    (root / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n')
    err = _fail(DatasetSpec(path=str(root / "bad.jsonl")), _settings(root))
    assert err.error_type == "dataset_invalid"
    assert "bad.jsonl" in err.detail and "line 3" in err.detail
    (root / "arr.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    err = _fail(DatasetSpec(path="arr.jsonl"), _settings(root))
    assert "line 2" in err.detail and "object" in err.detail


def test_bad_utf8_names_line(root: Path) -> None:
    (root / "enc.txt").write_bytes(b"fine\nalso fine\nbad \xff\xfe byte\n")
    err = _fail(DatasetSpec(path="enc.txt"), _settings(root))
    assert err.error_type == "dataset_invalid" and "line 3" in err.detail and "enc.txt" in err.detail


def test_json_list(root: Path) -> None:
    (root / "d.json").write_text(
        json.dumps([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": 2}])
    )
    ex = load_examples(DatasetSpec(path="d.json"), _settings(root))
    assert sorted((e.question, e.answer) for e in ex) == [("q1", "a1"), ("q2", "2")]


def test_csv_with_litcab_list_answers(root: Path) -> None:
    (root / "qa.csv").write_text(
        "question,answer\n"
        "total number of death row inmates in the us,\"['2,718']\"\n"
        "who sang it,['Foreigner']\n"
        "aliases,\"['A', 'B']\"\n"
        "plain,just text\n"
    )
    ex = load_examples(DatasetSpec(path="qa.csv"), _settings(root))
    got = {e.question: e.answer for e in ex}
    assert got == {
        "total number of death row inmates in the us": "2,718",
        "who sang it": "Foreigner",
        "aliases": "A; B",
        "plain": "just text",
    }


def test_csv_malformed(root: Path) -> None:
    (root / "bad.csv").write_text("text,label\nhello,1\nworld,0,extra\n")
    err = _fail(DatasetSpec(path="bad.csv"), _settings(root))
    assert err.error_type == "dataset_invalid" and "bad.csv" in err.detail and "line 3" in err.detail


def test_csv_field_mapping(root: Path) -> None:
    (root / "m.csv").write_text("sentence,label\ngood movie,1\nbad movie,0\n")
    ex = load_examples(DatasetSpec(path="m.csv", fields={"text": "sentence"}), _settings(root))
    assert {e.text: e.meta["columns"]["label"] for e in ex} == {"good movie": "1", "bad movie": "0"}
    err = _fail(DatasetSpec(path="m.csv"), _settings(root))
    assert err.error_type == "dataset_invalid" and "['sentence', 'label']" in err.detail


def test_parquet(root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"question": ["q1", "q2", "q3"], "answer": ["a1", None, "a3"]}), root / "d.parquet"
    )
    ex = load_examples(DatasetSpec(path="d.parquet"), _settings(root))
    assert sorted((e.question, e.answer) for e in ex) == [("q1", "a1"), ("q2", None), ("q3", "a3")]
    (root / "junk.parquet").write_bytes(b"not parquet at all")
    err = _fail(DatasetSpec(path="junk.parquet"), _settings(root))
    assert err.error_type == "dataset_invalid" and "junk.parquet" in err.detail


def test_txt_litcab_qa(root: Path) -> None:
    (root / "qa.txt").write_text(
        "What is the least dangerous radioactive decay?\nalpha decay\n\n"
        "Which gas do plants take in?\ncarbon dioxide\n\n"
        "Name a primary color?\nred; blue; yellow\n"
    )
    ex = load_examples(DatasetSpec(path="qa.txt"), _settings(root))
    got = {e.question: e.answer for e in ex}
    assert got["Which gas do plants take in?"] == "carbon dioxide"
    assert next(e for e in ex if e.answer and "red" in e.answer).aliases == ["red", "blue", "yellow"]
    assert all(e.text is None for e in ex)
    assert sorted(e.meta["line"] for e in ex) == [1, 4, 7]


def test_txt_plain_lines(root: Path) -> None:
    (root / "t.txt").write_text("first line\nsecond line\nthird\n\nfourth\n")
    ex = load_examples(DatasetSpec(path="t.txt"), _settings(root))
    assert sorted(e.text for e in ex) == ["first line", "fourth", "second line", "third"]
    assert all(e.question is None for e in ex)


def test_unsupported_extension(root: Path) -> None:
    (root / "d.xml").write_text("<a/>")
    err = _fail(DatasetSpec(path="d.xml"), _settings(root))
    assert err.error_type == "dataset_invalid" and ".jsonl" in err.detail


def test_file_too_large(root: Path) -> None:
    (root / "big.txt").write_text("x" * 2000)
    err = _fail(DatasetSpec(path="big.txt"), _settings(root, max_data_file_bytes=1000))
    assert err.error_type == "dataset_too_large"


def test_empty_file(root: Path) -> None:
    (root / "empty.jsonl").write_text("\n\n")
    assert _fail(DatasetSpec(path="empty.jsonl"), _settings(root)).error_type == "dataset_empty"
    (root / "empty.csv").write_text("text\n")
    assert _fail(DatasetSpec(path="empty.csv"), _settings(root)).error_type == "dataset_empty"


# -------------------------------------------------------------------- paths


def test_path_outside_roots(tmp_path: Path, root: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("secret\n")
    assert _fail(DatasetSpec(path=str(outside)), _settings(root)).error_type == "path_not_allowed"
    assert _fail(DatasetSpec(path="../secret.txt"), _settings(root)).error_type == "path_not_allowed"
    assert (
        _fail(DatasetSpec(path=str(root / ".." / "secret.txt")), _settings(root)).error_type
        == "path_not_allowed"
    )
    (root / "link.txt").symlink_to(outside)
    assert _fail(DatasetSpec(path="link.txt"), _settings(root)).error_type == "path_not_allowed"


def test_no_data_roots(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x\n")
    err = _fail(DatasetSpec(path=str(tmp_path / "a.txt")), Settings(data_dir=tmp_path / "s"))
    assert err.error_type == "path_not_allowed" and "DATA_ROOTS" in err.detail


def test_missing_file(root: Path) -> None:
    assert _fail(DatasetSpec(path="nope.jsonl"), _settings(root)).error_type == "dataset_not_found"


def test_symlink_inside_root_is_fine(root: Path) -> None:
    (root / "real.txt").write_text("hello\n")
    (root / "alias.txt").symlink_to(root / "real.txt")
    assert [e.text for e in load_examples(DatasetSpec(path="alias.txt"), _settings(root))] == ["hello"]


# ---------------------------------------------------------------------- hub


def test_hub_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import raises ImportError
    err = _fail(DatasetSpec(hub="org/set"), Settings())
    assert err.error_type == "dataset_not_found"
    assert "pip install datasets" in err.detail and "network" in err.detail


class _FakeDataset:
    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.column_names = list(rows[0]) if rows else []

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, indices):
        return _FakeDataset([self.rows[i] for i in indices])

    def __iter__(self):
        return iter(self.rows)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load) -> None:
    mod = types.ModuleType("datasets")
    mod.load_dataset = load  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", mod)


def test_hub_rows_mapped_and_shuffled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    rows = [{"sentence": f"s{i}", "label": i} for i in range(20)]

    def load(name, split):
        calls.append((name, split))
        return _FakeDataset(rows)

    _fake_datasets(monkeypatch, load)
    spec = DatasetSpec(hub="glue-ish/sst2", split="validation", fields={"text": "sentence"}, limit=5, seed=3)
    ex = load_examples(spec, Settings())
    assert calls == [("glue-ish/sst2", "validation")]
    assert len(ex) == 5
    assert all(e.meta["columns"]["label"] == int(e.text[1:]) for e in ex)
    # Same selection as the same rows given inline.
    inline = load_examples(DatasetSpec(rows=rows, fields={"text": "sentence"}, limit=5, seed=3), Settings())
    assert [e.text for e in ex] == [e.text for e in inline]


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(name, split):
        raise ConnectionError("Couldn't reach 'org/set' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, load)
    err = _fail(DatasetSpec(hub="org/set"), Settings())
    assert err.error_type == "dataset_not_found"
    assert "network" in err.detail and "chatterbot-trivia" in err.detail


def test_hub_missing_column(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, lambda name, split: _FakeDataset([{"content": "x"}]))
    err = _fail(DatasetSpec(hub="org/set"), Settings())
    assert err.error_type == "dataset_invalid" and "['content']" in err.detail
