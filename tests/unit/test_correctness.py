"""Correctness labels: normalization, lexical rules and the judge against a local fake endpoint."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from worker.evaluation.correctness import (
    JudgeError,
    JudgeTimeout,
    OpenAIJudge,
    contains_match,
    exact_match,
    label_answer,
    normalize_answer,
    rouge_l_f1,
    split_aliases,
    tally_rules,
    token_f1,
)

# --------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("An apple, a day.", "apple day"),
        ("U.S.A.", "usa"),
        ("\u201cParis\u201d \u2014 France", "paris france"),
        ("  Theatre of the Absurd ", "theatre of absurd"),
        ("the", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_split_aliases():
    assert split_aliases("Paris; City of Light") == ["Paris", "City of Light"]
    assert split_aliases("a;b") == ["a;b"]
    assert split_aliases("x; ; y") == ["x", "y"]
    assert split_aliases(["one", " two "]) == ["one", "two"]


def test_exact_match():
    assert exact_match("The Beatles.", "beatles")
    assert not exact_match("Beatles band", "beatles")


def test_token_f1():
    assert token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert token_f1("x y", "y z") == 0.5
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "the") == 1.0  # both empty after normalization (SQuAD)
    assert token_f1("", "cat") == 0.0


def test_rouge_l_f1():
    # LitCab keeps articles: LCS "the cat on the mat" = 5 of 6 tokens each side
    assert rouge_l_f1("the cat was on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # order matters for ROUGE-L, not for token F1
    assert rouge_l_f1("mat on cat", "cat on mat") == pytest.approx(1 / 3)
    assert token_f1("mat on cat", "cat on mat") == 1.0
    assert rouge_l_f1("", "cat") == 0.0


# (answer, gold, ROUGE-L F1 by LitCab's rule: rouge_score's RougeL, use_stemmer=True, worked by hand)
LITCAB_PAIRS = [
    ("sediments", "sediment", 1.0),  # Porter: sediment
    ("cells", "cell", 1.0),  # "cells" -> cell; "cell" (4 letters) -> cell
    ("golden eagles", "eagle", 2 / 3),  # eagl in both: P 1/2, R 1
    ("eagle", "golden eagle", 2 / 3),
    ("a hurricane", "hurricanes", 2 / 3),  # "a" stays a token: P 1/2, R 1
    ("running water", "run", 2 / 3),  # running -> run; "run" (3 letters) is not stemmed
    ("they are mammals", "mammal", 0.5),  # P 1/3, R 1
    ("kinetic energy", "potential energy", 0.5),  # lenient: passes the 0.3 cut
    ("Carbon dioxide (CO2)", "carbon dioxide", 0.8),  # co2 is a token: P 2/3, R 1
    ("pupa stage", "the pupal stage", 0.4),  # pupa / pupal differ: LCS "stage"
    ("Sun's energy", "solar energy", 0.4),  # sun, s, energi vs solar, energi
    ("the sun", "sun", 2 / 3),
    ("The mitochondria", "mitochondrion", 0.0),  # mitochondria / mitochondrion stem apart
    ("nuclei", "nucleus", 0.0),
    ("photosynthesis", "photosynthesizing", 0.0),
    ("U.S.", "US", 0.0),  # u, s vs us
    ("oxygen", "hydrogen", 0.0),
    ("42", "forty-two", 0.0),
    ("", "x", 0.0),
]


@pytest.mark.parametrize(("answer", "gold", "f1"), LITCAB_PAIRS)
def test_rouge_l_is_litcabs_stemmed_rule(answer: str, gold: str, f1: float) -> None:
    assert rouge_l_f1(answer, gold) == pytest.approx(f1)
    assert (label_answer("q", answer, gold, rules=("rouge_l",))[0]) == (f1 > 0.3 and bool(answer))


def test_rouge_l_equals_rouge_score_on_the_pairs() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge_score (lm_eval's dependency) absent")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for answer, gold, _ in LITCAB_PAIRS:  # LitCab: scorer.score(gold, answer)
        assert rouge_l_f1(answer, gold) == pytest.approx(scorer.score(gold, answer)["rougeL"].fmeasure, abs=1e-12)


def test_contains_match():
    assert contains_match("Paris, France", "Paris")  # answer contains the alias
    assert contains_match("Obama", "Barack Obama")  # alias contains the answer
    assert not contains_match("start", "art")  # tokens, not substrings
    assert not contains_match("it is certainly not Paris but maybe Lyon", "Paris")  # 8 tokens > 5
    assert contains_match("it is certainly not Paris but maybe Lyon", "Paris", max_tokens=8)
    assert not contains_match("the", "the Who")  # empty answer


# --------------------------------------------------------------------------- rules


def test_label_answer_first_deciding_rule():
    assert label_answer("Capital of France?", "Paris", "paris; City of Light") == (True, "exact")
    assert label_answer("Capital of France?", "It is Paris", "Paris") == (True, "contains")
    assert label_answer("q", "sat cat", "cat sat down") == (True, "token_f1")  # F1 0.8, no run
    assert label_answer("q", "x y", "y z") == (True, "token_f1")  # F1 exactly 0.5 counts
    assert label_answer("Capital of France?", "London", "Paris") == (False, None)
    assert label_answer("q", "", "Paris") == (False, None)
    assert label_answer("q", "the", "the") == (False, None)  # empty after normalization


def test_label_answer_rule_order_and_rouge():
    assert label_answer("q", "Paris", "Paris", rules=("token_f1", "exact")) == (True, "token_f1")
    long_answer = "the cat was sitting on the mat today"  # 7 tokens, LCS 3 with the gold
    assert label_answer("q", long_answer, "cat sat on mat", rules=("rouge_l",)) == (True, "rouge_l")
    assert label_answer("q", long_answer, "cat sat on mat", rules=("contains",)) == (False, None)


def test_label_answer_rejects_bad_configuration():
    with pytest.raises(ValueError, match="unknown"):
        label_answer("q", "a", "b", rules=("fuzzy",))
    with pytest.raises(ValueError, match="judge"):
        label_answer("q", "a", "b", rules=("exact", "judge"))
    with pytest.raises(ValueError, match="no aliases"):
        label_answer("q", "a", "  ")


def test_tally_rules():
    labels = [(True, "exact"), (True, "exact"), (True, "token_f1"), (False, None)]
    assert tally_rules(labels) == {"exact": 2, "contains": 0, "token_f1": 1, "incorrect": 1, "total": 4}
    assert tally_rules([(True, "judge")], rules=("exact",)) == {
        "exact": 0,
        "judge": 1,
        "incorrect": 0,
        "total": 1,
    }


# --------------------------------------------------------------------------- judge


class _FakeChat(BaseHTTPRequestHandler):
    """OpenAI-shaped replies; `server.mode` chooses the behaviour."""

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        mode = self.server.mode
        if mode == "sleep":
            time.sleep(0.5)
            mode = "yes"
        if mode == "500":
            self._send(500, b'{"error": "boom"}')
        elif mode == "401":
            self._send(401, b'{"error": "bad key"}')
        elif mode == "notjson":
            self._send(200, b"<html>hello</html>")
        elif mode == "noshape":
            self._send(200, b'{"result": "yes"}')
        else:
            content = {"yes": "Yes.", "no": "no", "maybe": "It depends."}[mode]
            reply = {
                "id": "x",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
            }
            self._send(200, json.dumps(reply).encode())

    def _send(self, status, data):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def fake_chat() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    server.daemon_threads = True
    server.mode = "yes"
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    server.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_judge_yes_no_and_request_shape(fake_chat, monkeypatch):
    monkeypatch.setenv("LS_TEST_JUDGE_KEY", "sekret")
    with OpenAIJudge(
        fake_chat.base_url + "/", "judge-model", api_key_env="LS_TEST_JUDGE_KEY", timeout=5
    ) as judge:
        assert judge.equivalent("Who wrote Hamlet?", "Shakespeare", "William Shakespeare; The Bard") is True
        fake_chat.mode = "no"
        assert judge.equivalent("Who wrote Hamlet?", "Marlowe", "William Shakespeare") is False
    req = fake_chat.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sekret"
    assert req["body"]["model"] == "judge-model"
    prompt = req["body"]["messages"][-1]["content"]
    assert (
        "Who wrote Hamlet?" in prompt
        and "Shakespeare" in prompt
        and "William Shakespeare; The Bard" in prompt
    )


def test_label_answer_with_judge(fake_chat):
    with OpenAIJudge(fake_chat.base_url, "m", timeout=5) as judge:
        rules = ("exact", "contains", "token_f1", "judge")
        assert label_answer("Capital of France?", "Paris", "Paris", rules, judge) == (True, "exact")
        assert fake_chat.requests == []  # an earlier rule decided: no call
        assert label_answer("Capital of France?", "the French capital", "Paris", rules, judge) == (
            True,
            "judge",
        )
        fake_chat.mode = "no"
        assert label_answer("Capital of France?", "Lyon", "Paris", rules, judge) == (False, None)
    assert fake_chat.requests[0]["auth"] is None


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        ("maybe", "neither yes nor no"),
        ("500", "HTTP 500"),
        ("401", "HTTP 401"),
        ("notjson", "not chat-completions"),
        ("noshape", "not chat-completions"),
    ],
)
def test_judge_failures_raise(fake_chat, mode, error):
    fake_chat.mode = mode
    with OpenAIJudge(fake_chat.base_url, "m", timeout=5) as judge:
        with pytest.raises(JudgeError, match=error):
            judge.equivalent("q", "a", "b")
        with pytest.raises(JudgeError):
            label_answer("q", "a", "b", ("exact", "judge"), judge)


def test_judge_retries_server_errors(fake_chat):
    fake_chat.mode = "500"
    with OpenAIJudge(fake_chat.base_url, "m", timeout=5, retries=2) as judge:
        with pytest.raises(JudgeError, match="HTTP 500"):
            judge.equivalent("q", "a", "b")
    assert len(fake_chat.requests) == 3


def test_judge_timeout(fake_chat):
    fake_chat.mode = "sleep"
    with OpenAIJudge(fake_chat.base_url, "m", timeout=0.1) as judge:
        with pytest.raises(JudgeTimeout, match="timed out"):
            judge.equivalent("q", "a", "b")


def test_judge_unreachable_and_missing_key(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with OpenAIJudge(f"http://127.0.0.1:{port}", "m", timeout=2) as judge:
        with pytest.raises(JudgeError, match="unreachable"):
            judge.equivalent("q", "a", "b")
    monkeypatch.delenv("LS_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(JudgeError, match="LS_TEST_NO_SUCH_KEY"):
        OpenAIJudge("http://127.0.0.1:1", "m", api_key_env="LS_TEST_NO_SUCH_KEY")
