"""Request values the database cannot hold: NUL (and, in ids and names, any control character).

Postgres text and JSONB cannot store U+0000: a NUL in a filter, an id or a submitted body made
Postgres raise and the API answer 500 (SQLite takes it). `check_request` runs on every route that
needs a key, right after the key is accepted (`app.auth.require`), so a request without a valid key
is still a 401 first, and it answers 422 naming the field, as every other invalid value is:

- path parameters: any C0 control character or DEL (ids and names never hold one);
- query parameters and header values: NUL (a label value may hold other control characters,
  and a `label=key=value` filter must still find it);
- a JSON body: NUL in any string or object key, at any depth.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from app.problems import Problem

_PATH_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NUL = "\x00"
_MAX_REPORTED = 5


def _printable(text: str) -> str:
    """A name as it can be shown: control characters escaped."""
    return _PATH_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _message(char: str) -> str:
    if char == _NUL:
        return "contains a NUL character (U+0000), which cannot be stored; remove it"
    return f"contains the control character U+{ord(char):04X}; ids and names never do"


def _body_nuls(value: Any, limit: int) -> list[dict[str, str]]:
    """Where a parsed JSON body holds NUL: `labels.team`, `dataset.rows.2.text` (at most `limit`)."""
    found: list[dict[str, str]] = []
    stack: list[tuple[tuple[str, ...], Any]] = [((), value)]
    while stack and len(found) < limit:
        path, item = stack.pop()
        if isinstance(item, str):
            if _NUL in item:
                found.append({"field": ".".join(path) or "body", "message": _message(_NUL), "type": "string_nul"})
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                name = _printable(key)
                if _NUL in key:
                    found.append({"field": ".".join((*path, name)), "type": "string_nul",
                                  "message": "this key " + _message(_NUL)})
                children.append(((*path, name), child))
            stack.extend(reversed(children))  # depth first, in document order
        elif isinstance(item, list):
            stack.extend(reversed([((*path, str(i)), child) for i, child in enumerate(item)]))
    return found[:limit]


async def check_request(request: Request) -> None:
    """Raise a 422 Problem naming every field (up to five) that holds a character refused above."""
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
        if b"\\u0000" in body:  # JSON can only spell NUL so; anything else is left to FastAPI
            try:
                parsed = json.loads(body)
            except (ValueError, RecursionError):
                parsed = None  # not JSON: FastAPI answers it
            errors += _body_nuls(parsed, _MAX_REPORTED - len(errors))
    if errors:
        errors = errors[:_MAX_REPORTED]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise Problem(422, f"Invalid request: {detail}", errors=errors)
