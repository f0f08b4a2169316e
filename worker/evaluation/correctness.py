"""Correctness labels for generated answers (docs/method.md section 6).

Text handling
- `normalize_answer`: SQuAD's normalization: lowercase, remove punctuation,
  drop the articles a/an/the, collapse whitespace. Punctuation is every ASCII
  `string.punctuation` character (exactly SQuAD's set, so "U.S." -> "us") plus
  every Unicode punctuation character (category P*, e.g. curly quotes and
  dashes, which model outputs often contain) **(choice)**.
- `split_aliases(gold)`: gold aliases are separated by `'; '`; each is stripped,
  empty ones dropped. A list/tuple of strings is taken as the aliases as is.
- `token_f1`: SQuAD token F1 on normalized tokens (bag of tokens); if either
  side has no tokens it is 1.0 when both are empty, else 0.0 (SQuAD's rule).
- `rouge_l_f1`: ROUGE-L F1 = 2PR/(P+R) from the longest common subsequence of
  tokens, as LitCab computes it (`evaluate/get_rouge_correctness.py`:
  `rouge_score`'s RougeL with `use_stemmer=True`): `litcab_tokens` lowercases,
  turns every run of characters outside [a-z0-9] into a space, Porter-stems
  (nltk's `PorterStemmer`, the one `rouge_score` uses) every token longer than 3
  characters and keeps the tokens of [a-z0-9]; articles stay. So "sediments" /
  "sediment", "cells" / "cell" score 1 and "golden eagles" / "eagle" 2/3.
  0.0 if either side has no token. LitCab scores the raw gold string; we score
  each alias and take the best.

Rules (each compares the answer with every alias; "correct" if any alias
passes). An answer whose normalization is empty is never correct under the
lexical rules.
- `exact`: normalized equality.
- `contains` **(choice)**: only for *short* answers, i.e. 1..`contains_max_tokens`
  (default 5) normalized tokens: the alias's tokens occur as a contiguous run in
  the answer's tokens, or the answer's tokens as a contiguous run in the
  alias's. Token runs, not substrings, so "art" does not match "start"; longer
  answers are left to `token_f1`/`rouge_l`/`judge`, because a long answer that
  lists many candidates would otherwise "contain" the gold.
- `token_f1`: token F1 >= `f1_threshold` (0.5) with some alias.
- `rouge_l`: ROUGE-L F1 (stemmed, as LitCab) > `rouge_threshold` (0.3) with
  some alias (LitCab's fallback rule; lenient: "kinetic energy" against
  "potential energy" scores 0.5).
- `judge`: an OpenAI-compatible chat-completions endpoint says whether the
  answer is semantically equivalent to a gold answer (`OpenAIJudge`). Off
  unless a judge is passed; in the service only a judge the operator
  configured (`LAYERSCOPE_JUDGES`). Any failure (timeout, connection, HTTP
  status, malformed or unparseable reply) raises `JudgeError`, whose message
  never quotes the reply; it never counts as correct (or as incorrect) silently.

`label_answer` tries the rules in the order given and returns the first one
that decides the answer correct; `tally_rules` counts how many answers each
rule decided.
"""

from __future__ import annotations

import functools
import os
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import httpx

__all__ = [
    "DEFAULT_RULES",
    "RULES",
    "JudgeError",
    "JudgeTimeout",
    "OpenAIJudge",
    "contains_match",
    "exact_match",
    "label_answer",
    "litcab_tokens",
    "normalize_answer",
    "rouge_l_f1",
    "split_aliases",
    "tally_rules",
    "token_f1",
]

RULES = ("exact", "contains", "token_f1", "rouge_l", "judge")
DEFAULT_RULES = ("exact", "contains", "token_f1")

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# --------------------------------------------------------------------------- text


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, strip punctuation, drop a/an/the, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if not _is_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def split_aliases(gold: str | Sequence[str]) -> list[str]:
    """Gold aliases: a string is split on '; '; a sequence is taken as the aliases."""
    parts = gold.split("; ") if isinstance(gold, str) else [str(g) for g in gold]
    return [p.strip() for p in parts if p.strip()]


def exact_match(pred: str, gold: str) -> bool:
    """Normalized equality with one gold string."""
    return normalize_answer(pred) == normalize_answer(gold)


def token_f1(pred: str, gold: str) -> float:
    """SQuAD token F1 between one prediction and one gold string."""
    p, g = _tokens(pred), _tokens(gold)
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def _lcs_len(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_ALNUM_TOKEN = re.compile(r"^[a-z0-9]+$")


@functools.lru_cache(maxsize=1)
def _porter() -> Any:
    from nltk.stem import porter  # the worker extra (via lm_eval's rouge_score); only this rule needs it

    return porter.PorterStemmer()


@functools.lru_cache(maxsize=65536)
def _stem(token: str) -> str:
    return str(_porter().stem(token)) if len(token) > 3 else token


def litcab_tokens(text: str) -> list[str]:
    """The tokens LitCab's ROUGE-L compares (module doc: `rouge_score`'s tokenizer, stemmed)."""
    tokens = (_stem(t) for t in _NON_ALNUM.sub(" ", text.lower()).split())
    return [t for t in tokens if _ALNUM_TOKEN.match(t)]


def rouge_l_f1(pred: str, gold: str) -> float:
    """ROUGE-L F1 (LCS of LitCab's stemmed tokens, beta = 1); 0.0 if either side has no token."""
    p, g = litcab_tokens(pred), litcab_tokens(gold)
    if not p or not g:
        return 0.0
    lcs = _lcs_len(p, g)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


def _contains_run(hay: list[str], needle: list[str]) -> bool:
    m = len(needle)
    return 0 < m <= len(hay) and any(hay[i : i + m] == needle for i in range(len(hay) - m + 1))


def contains_match(pred: str, gold: str, *, max_tokens: int = 5) -> bool:
    """`contains` rule against one gold string (see module doc)."""
    p, g = _tokens(pred), _tokens(gold)
    if not p or not g or len(p) > max_tokens:
        return False
    return _contains_run(p, g) or _contains_run(g, p)


# --------------------------------------------------------------------------- judge


class JudgeError(RuntimeError):
    """The judge could not give a verdict (configuration, HTTP, format, parse)."""


class JudgeTimeout(JudgeError):
    """The judge endpoint did not answer in time."""


_JUDGE_SYSTEM = "You grade answers to questions. Reply with exactly one word: yes or no."
_JUDGE_USER = (
    "Question: {question}\n"
    "Reference answer(s): {gold}\n"
    "Proposed answer: {answer}\n\n"
    "Is the proposed answer semantically equivalent to one of the reference answers, "
    "as an answer to this question? Reply with yes or no."
)
_VERDICT = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


class OpenAIJudge:
    """Client of an OpenAI-compatible `POST {base_url}/chat/completions` endpoint.

    The service builds one only from an operator-configured judge (`from_endpoint`,
    `Settings.judges`): a spec names a judge, never a URL or a secret. `api_key_env`
    names an environment variable holding the key (sent as `Authorization: Bearer ...`);
    it is read when the judge is created, and a missing variable is a `JudgeError` then.
    `retries` re-sends after a timeout, a connection error or a 5xx/429 status.
    Redirects are not followed. Error messages name the judge (`label`: its configured
    name, else the URL) and what failed (status, size, content type) and never quote the
    reply: a failure reaches the job's `error.detail`, which the tenant reads. Use as a
    context manager or call `close()` to release the HTTP connection pool.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        timeout: float = 30.0,
        retries: int = 0,
        temperature: float = 0.0,
        max_tokens: int = 8,
        transport: httpx.BaseTransport | None = None,
        label: str | None = None,
    ) -> None:
        if not base_url:
            raise JudgeError("judge base_url is empty")
        if not model:
            raise JudgeError("judge model name is empty")
        self.label = f"judge {label!r}" if label else f"judge at {base_url}"
        headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise JudgeError(f"{self.label}: its API key variable {api_key_env!r} is not set on this worker")
            headers["Authorization"] = f"Bearer {key}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.retries = max(0, int(retries))
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._client = httpx.Client(timeout=timeout, headers=headers, transport=transport, follow_redirects=False)

    @classmethod
    def from_endpoint(cls, name: str, endpoint: Any, **kw: Any) -> OpenAIJudge:
        """The judge the operator configured as `name` (an `app.config.JudgeEndpoint`)."""
        return cls(
            endpoint.base_url, endpoint.model, api_key_env=endpoint.api_key_env,
            timeout=float(endpoint.timeout_s), retries=int(endpoint.retries), label=name, **kw,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAIJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _payload(self, question: str, answer: str, aliases: Sequence[str]) -> dict[str, Any]:
        gold = "; ".join(aliases)
        return {
            "model": self.model,
            "messages": [
                {"role": "system", "content": _JUDGE_SYSTEM},
                {"role": "user", "content": _JUDGE_USER.format(question=question, gold=gold, answer=answer)},
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    @staticmethod
    def _described(resp: httpx.Response) -> str:
        """What came back, without any of its content."""
        kind = resp.headers.get("content-type", "no content type").split(";")[0].strip()
        return f"HTTP {resp.status_code}, {len(resp.content)} bytes, {kind}"

    def _post(self, payload: dict[str, Any]) -> httpx.Response:
        last: JudgeError | None = None
        for _ in range(self.retries + 1):
            try:
                resp = self._client.post(self.url, json=payload)
            except httpx.TimeoutException as exc:
                last = JudgeTimeout(f"{self.label} timed out ({type(exc).__name__})")
                continue
            except httpx.HTTPError as exc:
                last = JudgeError(f"{self.label} is unreachable ({type(exc).__name__})")
                continue
            if resp.status_code == 429 or resp.status_code >= 500:
                last = JudgeError(f"{self.label} answered {self._described(resp)}")
                continue
            if resp.status_code >= 300:
                extra = "; redirects are not followed" if resp.status_code < 400 else ""
                raise JudgeError(f"{self.label} answered {self._described(resp)}{extra}")
            return resp
        assert last is not None
        raise last

    def equivalent(self, question: str, answer: str, gold: str | Sequence[str]) -> bool:
        """True/False verdict of the judge; raises `JudgeError` when there is none."""
        aliases = split_aliases(gold)
        resp = self._post(self._payload(question, answer, aliases))
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"{self.label}: the reply is not chat-completions JSON ({self._described(resp)})"
            ) from None
        if not isinstance(content, str):
            raise JudgeError(f"{self.label}: the reply's message content is {type(content).__name__}, not text")
        m = _VERDICT.match(content.strip())
        if m is None:
            raise JudgeError(f"{self.label}: the reply is neither yes nor no ({len(content)} characters)")
        return m.group(1).lower() == "yes"


# --------------------------------------------------------------------------- labels


def label_answer(
    question: str,
    answer: str,
    gold: str | Sequence[str],
    rules: Sequence[str] = DEFAULT_RULES,
    judge: OpenAIJudge | None = None,
    *,
    contains_max_tokens: int = 5,
    f1_threshold: float = 0.5,
    rouge_threshold: float = 0.3,
) -> tuple[bool, str | None]:
    """(correct, the first rule that decided it correct, or None when incorrect).

    Rules run in the order given; the judge is called only when no earlier rule
    already decided the answer correct. `JudgeError` propagates.
    """
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"unknown correctness rule(s) {unknown}; known: {list(RULES)}")
    if "judge" in rules and judge is None:
        raise ValueError("rule 'judge' needs a judge (OpenAIJudge) to be configured")
    aliases = split_aliases(gold)
    if not aliases:
        raise ValueError(f"gold answer has no aliases: {gold!r}")
    lexical_ok = bool(_tokens(answer))
    for rule in rules:
        if rule == "judge":
            assert judge is not None
            if judge.equivalent(question, answer, aliases):
                return True, rule
            continue
        if not lexical_ok:
            continue
        if rule == "exact":
            hit = any(exact_match(answer, a) for a in aliases)
        elif rule == "contains":
            hit = any(contains_match(answer, a, max_tokens=contains_max_tokens) for a in aliases)
        elif rule == "token_f1":
            hit = any(token_f1(answer, a) >= f1_threshold for a in aliases)
        else:  # rouge_l
            hit = any(rouge_l_f1(answer, a) > rouge_threshold for a in aliases)
        if hit:
            return True, rule
    return False, None


def tally_rules(
    labels: Iterable[tuple[bool, str | None]], rules: Sequence[str] = DEFAULT_RULES
) -> dict[str, int]:
    """How many answers each rule decided correct, plus `incorrect` and `total`.

    Every rule in `rules` appears (0 if it decided none); a rule seen in `labels`
    but not listed is added.
    """
    counts: dict[str, int] = {r: 0 for r in rules}
    incorrect = total = 0
    for correct, rule in labels:
        total += 1
        if correct and rule is not None:
            counts[rule] = counts.get(rule, 0) + 1
        else:
            incorrect += 1
    counts["incorrect"] = incorrect
    counts["total"] = total
    return counts
