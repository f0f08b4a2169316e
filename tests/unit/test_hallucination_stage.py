"""The hallucination stage end to end on `tiny-random-llama` (garbage answers: the checks
are about shapes, ranges, splits and bookkeeping), with correctness decided by a judge
on a local fake OpenAI-compatible endpoint so that both classes occur."""

from __future__ import annotations

import csv
import io
import json
import math
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from app.config import JudgeEndpoint, Settings
from app.schemas import HallucinationOptions, Leaderboard, ModelSpec
from worker.hallucination import probe as probe_mod
from worker.hallucination.stage import (
    AnswerRecord,
    analyze_hallucination,
    run_hallucination_stage,
    split_examples,
)
from worker.modelzoo import load_model
from worker.stage import JobCancelled, JobContext, JobFailed

DETECTORS = [
    "sequence_likelihood", "max_sequence_probability", "max_sequence_probability_no_end", "perplexity",
    "mean_token_entropy", "p_ik", "verbalized", "self_consistency", "semantic_consistency", "length", "eavss_probe",
    "best_layer_probe", "all_layers_probe",
]
ANSWER_PHASE = {"sequence_likelihood", "max_sequence_probability", "max_sequence_probability_no_end", "perplexity",
                "mean_token_entropy"}  # read the greedy answers: every answer scored


def _says_yes(question: str) -> bool:
    return zlib.crc32(question.encode()) % 5 < 2  # about 40 % "correct", fixed per question


class _FakeChat(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        question = user.split("Question: ", 1)[1].split("\n", 1)[0]
        self.server.seen.append(question)  # type: ignore[attr-defined]
        reply = {"choices": [{"message": {"role": "assistant", "content": "yes" if _says_yes(question) else "no"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """A d_model-64 model runs faster on one thread, and far faster on a busy machine
    (two spinning OpenMP threads on two shared cores slowed these tests tenfold)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def judge_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return load_model(ModelSpec(name="tiny-random-llama", device="cpu"), Settings(data_dir=tmp_path_factory.mktemp("d")))


def _examples(n: int = 44) -> list[dict]:
    return [{"question": f"What is item number {i} called?", "answer": f"thing{i}; alias{i}", "meta": {"row": i}}
            for i in range(n)]


def _judges(judge_url: str) -> dict[str, JudgeEndpoint]:
    """The operator's judge configuration (`Settings.judges`) with the fake endpoint as `fake`."""
    return {"fake": JudgeEndpoint(base_url=judge_url, model="fake")}


def _options(judge_url: str, **kw) -> HallucinationOptions:
    base = dict(
        n_shots=2, max_new_tokens=4, self_consistency_k=2, n_boot=20, probe_l2=1.0, min_group=5,
        correctness_rules=["exact", "judge"], judge={"name": "fake"}, batch_size=8,
    )
    base.update(kw)
    return HallucinationOptions(**base)


@pytest.fixture(scope="module")
def run(tiny, judge_url):
    train, test = split_examples(_examples(), 0.5, seed=0)
    events: list[tuple[str, int, int]] = []
    ctx = JobContext(progress=lambda s, d, t: events.append((s, d, t)))
    out = analyze_hallucination(tiny, train, test, _options(judge_url), ctx, dataset_name="toy", judges=_judges(judge_url))
    return out, train, test, events


def _all_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _all_numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _all_numbers(v)
    elif isinstance(obj, float):
        yield obj


def test_answers_splits_and_labels(run) -> None:
    out, train, test, _ = run
    res = out.result
    c = res.summary["counts"]
    assert c["shots"] == 2 and c["train_answered"] == len(train) - 2 and c["test_answered"] == len(test)
    assert len(out.answers) == c["train_answered"] + c["test_answered"]
    # The same records, one per answered question, go to the StageResult (stored as the answers table).
    assert res.answers == out.answers and all(isinstance(r, AnswerRecord) for r in res.answers)
    assert len({r.id for r in res.answers}) == len(res.answers) and {r.scope for r in res.answers} == {""}
    assert sum(r.split == "test" for r in res.answers) == c["test_answered"]
    shot_q = {s[0] for s in out.shots}
    train_q = {r.question for r in out.answers if r.split == "train"}
    test_q = {r.question for r in out.answers if r.split == "test"}
    assert not train_q & test_q and not shot_q & (train_q | test_q)
    assert shot_q <= {e["question"] for e in train}
    for r in out.answers:
        assert r.correct == _says_yes(r.question) or r.rule == "exact"
        assert r.rule in (None, "exact", "judge") and (r.rule is None) == (not r.correct)
        assert r.gold == [r.gold[0], r.gold[1]] and r.gold[0].startswith("thing")
        assert r.n_tokens <= 4 and r.stop in ("newline", "eos", "max_tokens")
    assert c["rules"]["test"]["total"] == len(test)
    assert c["train_correct"] > 0 and c["train_hallucinated"] > 0


def test_detector_confidences_in_range(run) -> None:
    out, *_ = run
    for r in out.answers:
        assert set(r.confidence) == set(DETECTORS)
        for d, v in r.confidence.items():
            if r.split == "test":
                assert v is not None and 0.0 <= v <= 1.0, (d, v)
            elif d not in ANSWER_PHASE:
                assert v is None  # probes are not scored on their own training answers
        if r.split == "test":
            assert len(r.samples) == 2 and r.verbalized_reply is not None


def test_metrics_layers_and_table(run) -> None:
    out, _, test, _ = run
    res = out.result
    scopes = {m.scope for m in res.metrics}
    assert scopes == {f"detector={d}" for d in DETECTORS}
    names = {m.name for m in res.metrics}
    assert {"acc@50", "cov@50", "ece", "ece_litcab", "brier", "auroc", "accuracy"} <= names
    for m in res.metrics:
        assert m.n == len(test)
        for v in (m.value, m.ci_low, m.ci_high):
            assert v is None or (math.isfinite(v) and -1e-12 <= v <= 1 + 1e-12)
    eav = [r for r in res.layers if r.scorer == "eavss"]
    probes = [r for r in res.layers if r.scorer == "layer_probe"]
    assert len(eav) == len(probes) == 4
    assert sum(r.values["eavss"] for r in eav) == pytest.approx(1.0)
    assert {r.values["n_correct"] + r.values["n_hallucinated"] for r in eav} == {res.summary["counts"]["train_answered"]}
    for r in probes:
        assert r.values["n"] == len(test)
        assert r.values["auroc"] is None or 0 <= r.values["auroc"] <= 1
        assert 0 <= r.values["brier"] <= 1 and 0 <= r.values["ece"] <= 1
    table = res.summary["table"]
    assert table["dataset"] == "toy" and table["columns"] == DETECTORS
    assert {"acc@50", "cov@50", "ece", "brier", "auroc"} <= set(table["rows"])
    assert set(res.summary["layer_scores"]["top_layers"]) <= {0, 1, 2, 3}
    assert len(res.summary["layer_scores"]["top_layers"]) == 3
    assert all(math.isfinite(x) for x in _all_numbers(res.summary))
    assert all(math.isfinite(v) for r in res.layers for v in r.values.values() if v is not None)
    json.dumps(res.summary)  # JSON-ready


def test_leaderboard(run) -> None:
    out, _, test, _ = run
    board = out.result.summary["leaderboard"]
    Leaderboard.model_validate({**board, "analysis_id": "x"})  # the API's typed answer reads it as stored
    rows = board["rows"]
    assert [r["detector"] for r in rows] and sorted(r["detector"] for r in rows) == sorted(DETECTORS)
    aucs = [r["metrics"]["auroc"]["value"] for r in rows]
    defined = [a for a in aucs if a is not None]
    assert defined == sorted(defined, reverse=True) and aucs[: len(defined)] == defined  # undefined last
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert board["length_baseline"] == "length" and board["n"] == len(test)
    assert set(board["toolkit_estimators"]) == {"max_sequence_probability", "perplexity", "mean_token_entropy"}
    best = board["best_toolkit"]
    assert best in board["toolkit_estimators"]
    toolkit_aucs = [r["metrics"]["auroc"]["value"] or -1 for r in rows if r["detector"] in board["toolkit_estimators"]]
    assert (next(r for r in rows if r["detector"] == best)["metrics"]["auroc"]["value"] or -1) == max(toolkit_aucs)
    for r in rows:
        assert set(r["metrics"]) == {"auroc", "ece", "brier", "acc@50", "cov@50"}
        assert r["metrics"]["brier"]["n"] == len(test) and r["metrics"]["brier"]["ci_low"] is not None
        for key, ref in (("vs_length", "length"), ("vs_toolkit", best)):
            if r["detector"] == ref:
                assert r[key] is None and key.removeprefix("vs_") in r["reference"]
                continue
            cmp = r[key]
            assert cmp["reference"] == ref and cmp["verdict"] in ("better", "worse", "not_distinguishable", "undefined")
            d = cmp["auroc_difference"]
            if d["value"] is not None:
                mine = r["metrics"]["auroc"]["value"]
                theirs = next(x for x in rows if x["detector"] == ref)["metrics"]["auroc"]["value"]
                assert d["value"] == pytest.approx(mine - theirs) and d["ci_low"] <= d["ci_high"]
                assert (cmp["verdict"] == "better") == (d["ci_low"] > 0)


def test_artifacts(run) -> None:
    out, *_ = run
    arts = {a.name: a for a in out.result.artifacts}
    assert {"answers.jsonl", "answers.csv", "table2.md"} <= set(arts)
    lines = arts["answers.jsonl"].data.decode().splitlines()
    assert len(lines) == len(out.answers)
    first = json.loads(lines[0])
    assert {"question", "gold", "answer", "correct", "rule", "confidence", "split"} <= set(first)
    rows = list(csv.DictReader(io.StringIO(arts["answers.csv"].data.decode())))
    assert len(rows) == len(out.answers) and "confidence_eavss_probe" in rows[0]
    assert "| auroc |" in arts["table2.md"].data.decode()


def test_progress_is_monotonic_and_completes(run) -> None:
    *_, events = run
    assert events and all(s == "hallucination" for s, _, _ in events)
    done = [d for _, d, _ in events]
    total = events[-1][2]
    assert done == sorted(done) and done[-1] == total and all(t == total for _, _, t in events)


def test_probes_train_on_train_only(tiny, judge_url, monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    real = probe_mod.probe_confidence

    def spy(x_train, y_train, x_test, **kw):
        calls.append((len(x_train), len(x_test)))
        return real(x_train, y_train, x_test, **kw)

    monkeypatch.setattr(probe_mod, "probe_confidence", spy)
    train, test = split_examples(_examples(30), 0.4, seed=3)
    opts = _options(judge_url, detectors=["p_ik", "length", "eavss_probe"], n_boot=0, n_shots=3)
    res = run_hallucination_stage(tiny, train, test, opts, None, judges=_judges(judge_url))
    n_train = len(train) - 3
    assert calls and all(c == (n_train, len(test)) for c in calls)
    assert len(calls) == 3 + 4  # three detectors + one probe per layer
    assert res.summary["probes"]["eavss_probe"]["layers"] == res.summary["layer_scores"]["top_layers"]


def test_overlapping_test_questions_are_dropped_and_cv_probe(tiny, judge_url) -> None:
    ex = _examples(24)
    train, test = ex[:14], ex[12:]  # two questions on both sides
    opts = _options(judge_url, detectors=["sequence_likelihood", "eavss_probe"], probe_l2=None, n_boot=0,
                    layer_probes=False, token_scope="all", profile_context="question")
    res = run_hallucination_stage(tiny, train, test, opts, judges=_judges(judge_url))
    assert res.summary["counts"]["test_answered"] == len(test) - 2
    assert any("also occur in the training split" in w for w in res.warnings)
    assert res.summary["probes"]["eavss_probe"]["cv_log_loss"] is not None
    assert res.summary["layer_scores"]["token_scope"] == "all"
    assert res.summary["layer_scores"]["profile_context"] == "question"
    assert not [r for r in res.layers if r.scorer == "layer_probe"]


def test_small_groups_and_single_class_warn(tiny) -> None:
    train, test = split_examples(_examples(16), 0.5, seed=0)
    opts = HallucinationOptions(n_shots=1, max_new_tokens=2, detectors=["sequence_likelihood", "length", "p_ik"],
                                n_boot=10, probe_l2=1.0, layer_probes=False)
    res = run_hallucination_stage(tiny, train, test, opts)
    assert res.summary["counts"]["train_correct"] == 0  # random model, lexical rules
    text = " ".join(res.warnings)
    assert "no correct samples" in text and "hallucinated samples" in text
    assert "cannot learn" in text and "single class" in text
    assert all(r.values["eavss"] is not None for r in res.layers)


def test_failures(tiny, tmp_path) -> None:
    bert = load_model(ModelSpec(name="tiny-random-bert", device="cpu"), Settings(data_dir=tmp_path))
    with pytest.raises(JobFailed) as err:
        run_hallucination_stage(bert, _examples(6), _examples(3), HallucinationOptions())
    assert err.value.error_type == "model_unsupported"
    with pytest.raises(JobFailed) as err:
        run_hallucination_stage(tiny, _examples(3), _examples(6)[3:], HallucinationOptions(n_shots=2))
    assert err.value.error_type == "dataset_too_small"
    with pytest.raises(JobFailed) as err:
        run_hallucination_stage(tiny, [{"text": "no question"}] * 4, _examples(2), HallucinationOptions())
    assert err.value.error_type == "dataset_invalid"
    with pytest.raises(JobCancelled):
        run_hallucination_stage(tiny, _examples(8), _examples(12)[8:], HallucinationOptions(n_shots=1),
                                JobContext(is_cancelled=lambda: True))


def test_judge_unreachable_or_not_configured_fails_cleanly(tiny) -> None:
    opts = HallucinationOptions(n_shots=1, max_new_tokens=2, detectors=["length"], layer_probes=False,
                                judge={"name": "down"})
    train, test = split_examples(_examples(10), 0.5, seed=0)
    down = {"down": JudgeEndpoint(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=2, retries=0)}
    with pytest.raises(JobFailed) as err:
        run_hallucination_stage(tiny, train, test, opts, judges=down)
    assert err.value.error_type == "judge_failed"
    for judges in (None, {"other": down["down"]}):  # the name must be one the operator configured
        with pytest.raises(JobFailed) as err:
            run_hallucination_stage(tiny, train, test, opts, judges=judges)
        assert err.value.error_type == "judge_not_configured" and "'down'" in err.value.detail


def test_deterministic(tiny, judge_url) -> None:
    train, test = split_examples(_examples(20), 0.5, seed=0)
    opts = _options(judge_url, detectors=["sequence_likelihood", "self_consistency", "eavss_probe"],
                    n_boot=10, layer_probes=False)
    a = analyze_hallucination(tiny, train, test, opts, judges=_judges(judge_url))
    b = analyze_hallucination(tiny, train, test, opts, judges=_judges(judge_url))
    assert [r.to_dict() for r in a.answers] == [r.to_dict() for r in b.answers]
    conf = np.array([r.confidence["eavss_probe"] for r in a.answers if r.split == "test"])
    assert np.all((conf >= 0) & (conf <= 1))
    # the prompt depends on the split, not on the order the examples came in
    c = analyze_hallucination(tiny, train[::-1], test, opts.model_copy(update={"detectors": ["length"]}),
                              judges=_judges(judge_url))
    assert c.shots == a.shots


def test_layer_choice_never_sees_test_labels(tiny, judge_url, monkeypatch) -> None:
    """best_layer_probe, all_layers_probe and eavss_probe choose their layers (and L2 strengths) from the
    training split: permuting or flipping the test labels leaves every choice unchanged, while the test
    metrics, which do read them, change."""
    import worker.hallucination.stage as stage_mod

    real = stage_mod.label_answers
    scramble: dict[str, str] = {"how": "none"}

    def relabel(qa, run, options, ctx, judge=None, judges=None):
        a = real(qa, run, options, ctx, judge, judges)
        y = a.correct[qa.n_train:]
        if scramble["how"] == "permute":
            a.correct[qa.n_train:] = np.random.default_rng(7).permutation(y)
        elif scramble["how"] == "flip":
            a.correct[qa.n_train:] = 1.0 - y
        return a

    monkeypatch.setattr(stage_mod, "label_answers", relabel)
    train, test = split_examples(_examples(36), 0.5, seed=1)
    opts = _options(judge_url, detectors=["best_layer_probe", "all_layers_probe", "eavss_probe"], n_boot=0,
                    probe_l2=None, probe_window=2)
    choices, aurocs = [], []
    for how in ("none", "permute", "flip"):
        scramble["how"] = how
        res = run_hallucination_stage(tiny, train, test, opts, judges=_judges(judge_url))
        lc = res.summary["layer_choice"]
        probes = res.summary["probes"]
        choices.append((lc["eavss_probe"], lc["best_layer_probe"], lc["all_layers_probe"],
                        [r["train_cv_rank"] for r in lc["eavss_layers"]],
                        probes["best_layer_probe"]["layer_cv_ranking"],
                        {n: probes[n]["l2"] for n in probes}))
        aurocs.append([m.value for m in res.metrics if m.name == "auroc"])
    assert choices[0] == choices[1] == choices[2]
    assert aurocs[2] != aurocs[0]  # flipped labels: the metrics did change
    first = choices[0]
    assert len(first[1]) in (1, 2) and set(first[1]) <= {0, 1, 2, 3} and first[2] == [0, 1, 2, 3]
    assert sorted(first[4]) == [0, 1, 2, 3] and all(1 <= r <= 4 for r in first[3])
