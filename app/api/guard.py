"""Request values the service cannot hold or serialize, refused with a 422 naming the field.

Postgres text and JSONB cannot store U+0000, nor a lone surrogate (`"\\ud800"`, which is not
Unicode text: it cannot be encoded as UTF-8 either, so even SQLite and the JSON answer failed),
nor the JSON tokens `Infinity`/`NaN` (which Python's parser also makes of `1e400`). Each made an
API answer 500. `check_request` runs on every route that needs a key, right after the key is
accepted (`app.auth.require`), so a request without a valid key is still a 401 first, and it
answers 422 naming the field, as every other invalid value is:

- path parameters: any C0 control character or DEL (ids and names never hold one);
- query parameters and header values: NUL (a label value may hold other control characters,
  and a `label=key=value` filter must still find it);
- a JSON body, at any depth: NUL or a lone surrogate in any string or object key, and any
  number that is not finite (`Infinity`, `-Infinity`, `NaN`, `1e400`).

`GuardedRoute` (the route class of every router) refuses a JSON body nested deeper than
`MAX_JSON_DEPTH` before FastAPI parses it: deeper bodies made the spec's serialization raise
(256-900 levels: 500) or Python's parser recurse out (1,000 and more: 400). That check comes
before the key check, as for any body that is not JSON.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from app.problems import Problem

_PATH_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NUL = "\x00"
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_MAX_REPORTED = 5
MAX_JSON_DEPTH = 64  # objects and arrays inside each other; a spec needs about 8

# Only a body with one of these can hold a value refused below (an escape, a non-ASCII or control
# byte, a NaN/Infinity token, an exponent, or a number long enough to overflow); others are not walked.
_MAY_BE_REFUSED = re.compile(rb"\\u|NaN|Infinity|\d[eE]|\d{300}|[^\x09\x0a\x0d\x20-\x7e]")
_IN_THREAD_BYTES = 256 * 1024  # walk bigger bodies off the event loop


def _printable(text: str) -> str:
    """A name as it can be shown: control characters and surrogates escaped."""
    text = _PATH_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _message(char: str) -> str:
    if char == _NUL:
        return "contains a NUL character (U+0000), which cannot be stored; remove it"
    return f"contains the control character U+{ord(char):04X}; ids and names never do"


def _text_problem(text: str) -> tuple[str, str] | None:
    """(type, message) when a string cannot be stored, else None."""
    if _NUL in text:
        return "string_nul", _message(_NUL)
    if bad := _SURROGATE.search(text):
        return "string_surrogate", (
            f"contains a lone surrogate (U+{ord(bad.group()):04X}), which is not Unicode text and cannot be "
            "stored; send valid UTF-8 (a character outside the BMP as one escaped surrogate pair)"
        )
    return None


_NOT_FINITE = (
    "is not a finite number (Infinity, NaN, or beyond the float range like 1e400), which cannot be stored; "
    "send a finite number"
)


def _body_problems(value: Any, limit: int) -> list[dict[str, str]]:
    """Where a parsed JSON body holds a refused value: `labels.team`, `dataset.rows.2.text` (at most `limit`)."""
    found: list[dict[str, str]] = []
    stack: list[tuple[tuple[str, ...], Any]] = [((), value)]
    while stack and len(found) < limit:
        path, item = stack.pop()
        if isinstance(item, str):
            if problem := _text_problem(item):
                found.append({"field": ".".join(path) or "body", "message": problem[1], "type": problem[0]})
        elif isinstance(item, float):
            if not math.isfinite(item):
                found.append({"field": ".".join(path) or "body", "message": _NOT_FINITE, "type": "number_not_finite"})
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                name = _printable(key)
                if problem := _text_problem(key):
                    found.append({"field": ".".join((*path, name)), "type": problem[0],
                                  "message": "this key " + problem[1]})
                children.append(((*path, name), child))
            stack.extend(reversed(children))  # depth first, in document order
        elif isinstance(item, list):
            stack.extend(reversed([((*path, str(i)), child) for i, child in enumerate(item)]))
    return found[:limit]


async def check_request(request: Request) -> None:
    """Raise a 422 Problem naming every field (up to five) that holds a value refused above."""
    errors: list[dict[str, str]] = []
    for name, value in request.path_params.items():
        if isinstance(value, str) and (bad := _PATH_CONTROL.search(value)):
            errors.append({"field": f"path.{name}", "message": _message(bad.group()), "type": "string_control"})
    for name, value in request.query_params.multi_items():
        if _NUL in name or _NUL in value:
            errors.append({"field": f"query.{_printable(name)}", "message": _message(_NUL), "type": "string_nul"})
    for raw_name, raw_value in request.headers.raw:
        if b"\x00" in raw_value:
            name = raw_name.decode("latin-1")
            errors.append({"field": f"header.{_printable(name)}", "message": _message(_NUL), "type": "string_nul"})
    route = request.scope.get("route")
    if getattr(route, "body_field", None) is not None and len(errors) < _MAX_REPORTED:
        body = await request.body()  # already read (and cached) by FastAPI for a route with a body
        if _MAY_BE_REFUSED.search(body):
            try:
                parsed = await request.json()  # FastAPI's parse, cached on the request
            except (ValueError, RecursionError):
                parsed = None  # not JSON: FastAPI answers it
            if len(body) > _IN_THREAD_BYTES:
                errors += await run_in_threadpool(_body_problems, parsed, _MAX_REPORTED - len(errors))
            else:
                errors += _body_problems(parsed, _MAX_REPORTED - len(errors))
    if errors:
        errors = errors[:_MAX_REPORTED]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise Problem(422, f"Invalid request: {detail}", errors=errors)


# ------------------------------------------------------------------ nesting depth

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_INNERMOST = re.compile(rb"\[\]|\{\}")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def nesting_exceeds(body: bytes, limit: int) -> bool:
    """Whether the JSON text `body` nests objects/arrays more than `limit` deep, without parsing it
    (no recursion): strings are dropped, then each pass removes the innermost `[]`/`{}` pairs.
    Unbalanced brackets (not JSON) give False: the parser answers those."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        fewer = _INNERMOST.sub(b"", brackets)
        if fewer == brackets:
            return False
        brackets = fewer
    return _INNERMOST.search(brackets) is not None


class GuardedRoute(APIRoute):
    """An APIRoute that refuses a JSON body nested deeper than MAX_JSON_DEPTH (422 naming the limit)
    before FastAPI parses it, so no depth reaches the parser's recursion or the spec's serializer."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def guarded(request: Request) -> Response:
            body = await request.body()  # cached: FastAPI reads the same bytes next
            too_deep = (
                await run_in_threadpool(nesting_exceeds, body, MAX_JSON_DEPTH)
                if len(body) > _IN_THREAD_BYTES else nesting_exceeds(body, MAX_JSON_DEPTH)
            )
            if too_deep:
                message = f"objects and arrays are nested more than {MAX_JSON_DEPTH} levels deep (the limit)"
                raise Problem(422, f"Invalid request: body: {message}",
                              errors=[{"field": "body", "message": message, "type": "json_too_deep"}])
            return await handler(request)

        return guarded
