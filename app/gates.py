"""Gate rules: a small path language over an analysis's stored results, parsed once, evaluated purely.

A rule is `<path> <op> <threshold>`: `op` is one of `>= <= > < == !=`, the
threshold a number (`0.9`, `-1`, `1e-3`) or, for `==`/`!=` only, a quoted string.
A path is dot-separated segments; a segment holding a dot, a space or one of
`<>!"` is written in double quotes (`"acc@12.5"`, `"block_output.variance"`).

Paths (everything an analysis stores is reachable):

| path | value |
|---|---|
| `metrics.<stage>.<scope>.<name>` | a metric's value (its 95% interval and N are reported with it) |
| `metrics.<stage>.<scope>.<name>.ci_low` / `.ci_high` / `.n` / `.value` | one field of the metric |
| `layers.<stage>.<scorer>.<value>.max` / `min` / `mean` / `sum` / `count` | an aggregate over the layers (`count`: layers with a value) |
| `layers.<stage>.<scorer>.<value>.<i>` | layer `i`'s value |
| `layers.<stage>.warnings`, `warnings.<stage>` | the number of warnings the stage raised |
| `warnings` | the number of warnings of the whole analysis |
| `summary.<stage>.<key>...` | a number (or a list index / `length`) in a stage's summary |

Aliases for the common gates:

| alias | means |
|---|---|
| `retained_performance.<task>[.<scorer>][.healed][.<field>]` | `metrics.prune."task=<task>,scorer=<scorer>".retained_pct / 100` (scorer default `avss`), a fraction, with its paired-bootstrap 95% interval (also / 100) and N; `.healed`: after LoRA healing (scope `...,variant=healed`); `.<field>`: `value`, `ci_low`, `ci_high`, `n` (e.g. `retained_performance.perplexity.avss.ci_low >= 0.9`) |
| `hallucination.<detector>.<metric>[.<field>]` | `metrics.hallucination."detector=<detector>".<metric>` |
| `pruning.<scorer>.<name>` | `metrics.prune."scorer=<scorer>".<name>` (e.g. `speedup`, `parameter_reduction_pct`) |
| `mitigation.<a>-<b>.<name>[.<field>]` | `metrics.mitigate."delta=<a>-<b>".<name>`, a paired difference (e.g. `mitigation.eavss-base.accuracy.ci_low > 0`) |
| `mitigation.<variant>.<name>[.<field>]` | `metrics.mitigate."variant=<variant>".<name>` (`base`, `eavss`, `random`) |

Missing data never passes: a path that finds nothing (the stage did not run, the
metric is undefined, no layer has the value) gives an observed value of null
and the rule FAILS, with a reason naming what was looked for.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_RULE_CHARS = 500

OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
METRIC_FIELDS = ("value", "ci_low", "ci_high", "n")
AGGREGATES = ("max", "min", "mean", "sum", "count")
ALIASES = ("retained_performance", "hallucination", "pruning", "mitigation")
ROOTS = ("metrics", "layers", "warnings", "summary", *ALIASES)

_BARE = r"[A-Za-z0-9_@:,+\-/*#%]+(?:=[A-Za-z0-9_@:,+\-/*#%]+)*"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_SEGMENT = rf"(?:{_QUOTED}|{_BARE})"
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RULE = re.compile(
    rf"^\s*(?P<path>{_SEGMENT}(?:\.{_SEGMENT})*)\s*(?P<op>>=|<=|==|!=|>|<)\s*"
    rf"(?P<threshold>{_NUMBER}|{_QUOTED})\s*$"
)
_SEGMENT_RE = re.compile(_SEGMENT)


class RuleError(ValueError):
    """A rule that does not parse; the message says what is wrong and how to write it."""


@dataclass(frozen=True)
class Rule:
    text: str
    path: tuple[str, ...]
    op: str
    threshold: float | str

    def check(self, observed: float | str) -> bool:
        if isinstance(self.threshold, str) != isinstance(observed, str):
            return False
        return bool(OPS[self.op](observed, self.threshold))


@dataclass
class MetricRecord:
    stage: str
    scope: str
    name: str
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None


@dataclass
class LayerRecord:
    stage: str
    scorer: str
    layer: int
    values: Mapping[str, float | None]


@dataclass
class Snapshot:
    """An analysis's stored results, as the rules see them."""

    metrics: list[MetricRecord] = field(default_factory=list)
    layers: list[LayerRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: Mapping[str, Any] = field(default_factory=dict)

    def stages(self) -> set[str]:
        return set(self.summary) | {m.stage for m in self.metrics} | {r.stage for r in self.layers}


@dataclass
class Observation:
    value: float | str | None
    source: str
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    reason: str | None = None


@dataclass
class RuleResult:
    rule: str
    source: str
    op: str
    threshold: float | str
    observed: float | str | None
    ci_low: float | None
    ci_high: float | None
    n: int | None
    passed: bool
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ------------------------------------------------------------------ parsing


def _unquote(segment: str) -> str:
    if segment.startswith('"'):
        return re.sub(r"\\(.)", r"\1", segment[1:-1])
    return segment


def quote(segment: str) -> str:
    """A segment as a rule writes it (quoted when it holds characters a bare segment cannot)."""
    if re.fullmatch(_BARE, segment):
        return segment
    return '"' + segment.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_path(path: Sequence[str]) -> str:
    return ".".join(quote(p) for p in path)


def _split_path(text: str) -> tuple[str, ...]:
    parts: list[str] = []
    pos = 0
    while pos < len(text):
        m = _SEGMENT_RE.match(text, pos)
        assert m is not None  # the rule regex already matched the whole path
        parts.append(_unquote(m.group(0)))
        pos = m.end() + 1  # skip the dot
    return tuple(parts)


def _check_shape(path: tuple[str, ...]) -> None:
    root, rest = path[0], path[1:]
    n = len(rest)
    usage = {
        "metrics": "metrics.<stage>.<scope>.<name>[.value|.ci_low|.ci_high|.n]",
        "layers": "layers.<stage>.<scorer>.<value>.<max|min|mean|sum|count|layer index> or layers.<stage>.warnings",
        "warnings": "warnings or warnings.<stage>",
        "summary": "summary.<stage>.<key>[.<key>...]",
        "retained_performance": "retained_performance.<task>[.<scorer>][.healed][.value|.ci_low|.ci_high|.n]",
        "hallucination": "hallucination.<detector>.<metric>[.value|.ci_low|.ci_high|.n]",
        "pruning": "pruning.<scorer>.<name>",
        "mitigation": "mitigation.<variant or a-b>.<name>[.value|.ci_low|.ci_high|.n]",
    }
    if root not in usage:
        raise RuleError(f"unknown path root {root!r}; paths start with one of {', '.join(ROOTS)}")
    ok = {
        "metrics": n == 3 or (n == 4 and rest[3] in METRIC_FIELDS),
        "layers": (n == 2 and rest[1] == "warnings")
        or (n == 4 and (rest[3] in AGGREGATES or rest[3].isdigit())),
        "warnings": n in (0, 1),
        "summary": n >= 2,
        "retained_performance": 1 <= n <= 4 and _retained_parts(rest) is not None,
        "hallucination": n == 2 or (n == 3 and rest[2] in METRIC_FIELDS),
        "pruning": n == 2,
        "mitigation": n == 2 or (n == 3 and rest[2] in METRIC_FIELDS),
    }[root]
    if not ok:
        raise RuleError(f"path {format_path(path)!r} does not fit {usage[root]}")
    if any(p == "" for p in path):
        raise RuleError("a path segment is empty")


VARIANTS = ("healed",)  # retained-performance variants after a post-pruning step (LoRA healing)


def retained_scope(task: str, scorer: str = "avss", variant: str | None = None) -> str:
    """The prune stage's metric scope of a retained performance (`variant`: e.g. `healed`)."""
    return f"task={task},scorer={scorer}" + (f",variant={variant}" if variant else "")


def _retained_parts(rest: Sequence[str]) -> tuple[str, str, str | None, str] | None:
    """(task, scorer, variant, field) of `retained_performance.<task>[.<scorer>][.healed][.<field>]`,
    or None when the segments do not fit."""
    parts = list(rest)
    if not parts:
        return None
    fld = parts.pop() if len(parts) > 1 and parts[-1] in METRIC_FIELDS else "value"
    variant = parts.pop() if len(parts) > 1 and parts[-1] in VARIANTS else None
    if len(parts) not in (1, 2):
        return None
    scorer = parts[1] if len(parts) == 2 else "avss"
    return parts[0], scorer, variant, fld


def parse_rule(text: str) -> Rule:
    """Parse one rule or raise `RuleError` saying why."""
    if not isinstance(text, str) or not text.strip():
        raise RuleError("a rule is empty; write it as `<path> <op> <threshold>`, e.g. `warnings == 0`")
    if len(text) > MAX_RULE_CHARS:
        raise RuleError(f"a rule is over {MAX_RULE_CHARS} characters")
    m = _RULE.match(text)
    if m is None:
        hint = ""
        if not re.search(r"(>=|<=|==|!=|>|<)", text):
            hint = " (no operator: use one of >= <= > < == !=)"
        elif re.search(r"[<>]=?\s*$|[=!]=\s*$", text):
            hint = " (no threshold after the operator)"
        raise RuleError(
            f"cannot parse {text!r}{hint}; write `<path> <op> <threshold>`, e.g. "
            "`retained_performance.perplexity >= 0.9`; quote segments that hold dots or spaces"
        )
    path = _split_path(m.group("path"))
    _check_shape(path)
    raw = m.group("threshold")
    threshold: float | str
    if raw.startswith('"'):
        if m.group("op") not in ("==", "!="):
            raise RuleError(f"{text!r}: a string threshold only works with == or !=")
        threshold = _unquote(raw)
    else:
        threshold = float(raw)
        if not math.isfinite(threshold):
            raise RuleError(f"{text!r}: the threshold must be a finite number")
    return Rule(text=text.strip(), path=path, op=m.group("op"), threshold=threshold)


def parse_rules(texts: Sequence[str]) -> list[Rule]:
    """Parse a policy's rules; the error names the rule (its index and text)."""
    rules = []
    for i, text in enumerate(texts):
        try:
            rules.append(parse_rule(text))
        except RuleError as exc:
            raise RuleIndexError(i, text, str(exc)) from None
    return rules


class RuleIndexError(RuleError):
    def __init__(self, index: int, text: str, message: str):
        super().__init__(f"rule {index} ({text!r}): {message}")
        self.index, self.text, self.message = index, text, message


# --------------------------------------------------------------- evaluation


def _number(value: Any) -> float | str | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        x = float(value)
        return x if math.isfinite(x) else None
    if isinstance(value, str):
        return value
    return None


def _hint(kind: str, options: set[str] | list[str]) -> str:
    items = sorted(options)
    if not items:
        return ""
    more = f" and {len(items) - 8} more" if len(items) > 8 else ""
    return f"; {kind} present: {', '.join(items[:8])}{more}"


def _metric(snap: Snapshot, stage: str, scope: str, name: str, fld: str, source: str) -> Observation:
    found = next((m for m in snap.metrics if m.stage == stage and m.scope == scope and m.name == name), None)
    reason: str | None
    if found is None:
        if stage not in snap.stages():
            reason = f"stage {stage!r} has no results in this analysis (did it run?)"
        elif not any(m.stage == stage and m.scope == scope for m in snap.metrics):
            reason = f"no metric scope {scope!r} in stage {stage!r}" + _hint(
                "scopes", {m.scope for m in snap.metrics if m.stage == stage}
            )
        else:
            reason = f"no metric {name!r} in {stage}/{scope}" + _hint(
                "names", {m.name for m in snap.metrics if m.stage == stage and m.scope == scope}
            )
        return Observation(None, source, reason=reason)
    value = _number(getattr(found, fld))
    reason = None if value is not None else f"the metric's {fld} is undefined (null) in this analysis"
    return Observation(value, source, found.ci_low, found.ci_high, found.n, reason)


def _layers(snap: Snapshot, stage: str, scorer: str, key: str, agg: str, source: str) -> Observation:
    rows = [r for r in snap.layers if r.stage == stage and r.scorer == scorer]
    if not rows:
        if stage not in snap.stages():
            return Observation(None, source, reason=f"stage {stage!r} has no results in this analysis (did it run?)")
        return Observation(None, source, reason=f"no layer rows for scorer {scorer!r} in stage {stage!r}" + _hint(
            "scorers", {r.scorer for r in snap.layers if r.stage == stage}))
    if agg.isdigit():
        row = next((r for r in rows if r.layer == int(agg)), None)
        if row is None:
            return Observation(None, source, reason=f"no layer {agg} in {stage}/{scorer} ({len(rows)} layers)")
        value = _number(row.values.get(key))
        return Observation(value, source, reason=None if value is not None else f"layer {agg} has no {key!r}")
    values = [v for r in rows if isinstance(v := _number(r.values.get(key)), float)]
    n = len(rows)
    if agg == "count":
        if not any(key in r.values for r in rows):
            return Observation(None, source, n=n, reason=f"no layer of {stage}/{scorer} has {key!r}" + _hint(
                "values", {k for r in rows for k in r.values}))
        return Observation(float(len(values)), source, n=n)
    if not values:
        return Observation(None, source, n=n, reason=f"no layer of {stage}/{scorer} has a defined {key!r}" + _hint(
            "values", {k for r in rows for k in r.values}))
    aggregate: dict[str, Callable[[list[float]], float]] = {
        "max": max, "min": min, "sum": sum, "mean": lambda v: sum(v) / len(v),
    }
    out = aggregate[agg](values)
    return Observation(float(out), source, n=len(values))


def _warnings(snap: Snapshot, stage: str | None, source: str) -> Observation:
    if stage is None:
        return Observation(float(len(snap.warnings)), source)
    if stage not in snap.stages():
        return Observation(None, source, reason=f"stage {stage!r} did not run in this analysis")
    prefix = f"[{stage}] "
    return Observation(float(sum(1 for w in snap.warnings if w.startswith(prefix))), source)


def _summary(snap: Snapshot, keys: tuple[str, ...], source: str) -> Observation:
    node: Any = snap.summary
    walked: list[str] = []
    for key in keys:
        if isinstance(node, Mapping) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.lstrip("-").isdigit() and -len(node) <= int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, Mapping | list) and key == "length":
            node = len(node)
        else:
            where = "summary" + ("." + format_path(walked) if walked else "")
            hint = _hint("keys", [str(k) for k in node]) if isinstance(node, Mapping) else ""
            return Observation(None, source, reason=f"{where} has no {key!r}{hint}")
        walked.append(key)
    value = _number(node)
    if value is None:
        kind = type(node).__name__ if node is not None else "null"
        extra = " (add .length for its size)" if isinstance(node, Mapping | list) else ""
        return Observation(None, source, reason=f"the value is {kind}, not a number{extra}")
    return Observation(value, source)


def observe(path: Sequence[str], snap: Snapshot) -> Observation:
    """Resolve a parsed path against an analysis's results."""
    root, rest = path[0], tuple(path[1:])
    if root == "metrics":
        fld = rest[3] if len(rest) == 4 else "value"
        return _metric(snap, rest[0], rest[1], rest[2], fld, format_path(path))
    if root == "layers":
        if len(rest) == 2:
            return _warnings(snap, rest[0], f"warnings.{quote(rest[0])}")
        stage, scorer, key, agg = rest
        return _layers(snap, stage, scorer, key, agg, source=format_path(path))
    if root == "warnings":
        return _warnings(snap, rest[0] if rest else None, format_path(path))
    if root == "summary":
        return _summary(snap, rest, format_path(path))
    if root == "hallucination":
        target = ("metrics", "hallucination", f"detector={rest[0]}", rest[1], *rest[2:])
        return observe(target, snap)
    if root == "pruning":
        return observe(("metrics", "prune", f"scorer={rest[0]}", rest[1]), snap)
    if root == "mitigation":
        scope = f"delta={rest[0]}" if "-" in rest[0] else f"variant={rest[0]}"
        return observe(("metrics", "mitigate", scope, *rest[1:]), snap)
    if root == "retained_performance":
        parts = _retained_parts(rest)
        assert parts is not None  # parse_rule checked the shape
        task, scorer, variant, fld = parts
        scope = retained_scope(task, scorer, variant)
        obs = observe(("metrics", "prune", scope, "retained_pct", *([fld] if fld != "value" else [])), snap)
        if fld != "n":
            obs.source += " / 100"
            if isinstance(obs.value, float):
                obs.value = obs.value / 100.0
        obs.ci_low = obs.ci_low / 100.0 if obs.ci_low is not None else None
        obs.ci_high = obs.ci_high / 100.0 if obs.ci_high is not None else None
        return obs
    raise RuleError(f"unknown path root {root!r}")  # parse_rule refuses these first


def evaluate(rules: Sequence[Rule], snap: Snapshot) -> tuple[bool, list[RuleResult]]:
    """Every rule with its observation; the verdict passes only when every rule passes (and there is one)."""
    results = []
    for rule in rules:
        obs = observe(rule.path, snap)
        reason: str | None
        if obs.value is None:
            passed, reason = False, f"missing data: {obs.reason or 'nothing found'}"
        else:
            passed = rule.check(obs.value)
            reason = obs.reason
            if isinstance(rule.threshold, str) != isinstance(obs.value, str):
                reason = f"cannot compare {type(obs.value).__name__} with {type(rule.threshold).__name__}"
        results.append(
            RuleResult(
                rule=rule.text, source=obs.source, op=rule.op, threshold=rule.threshold, observed=obs.value,
                ci_low=obs.ci_low, ci_high=obs.ci_high, n=obs.n, passed=passed, reason=reason,
            )
        )
    return bool(results) and all(r.passed for r in results), results
