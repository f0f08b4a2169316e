"""RFC 9457 problem+json for every error the API returns."""

from __future__ import annotations

import difflib
import logging
import re
import types
import typing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("layerscope.api")

PROBLEM = "application/problem+json"

TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


class Problem(Exception):
    """Raise from a route to answer with problem+json."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body = {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status, "detail": detail}
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def _members(annotation: Any) -> list[Any]:
    """The types a value of `annotation` may have (Optional and unions unpacked, Annotated unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _step(annotation: Any, part: Any) -> Any | None:
    """The type at `part` (a field name, list index or dict key) inside a value of `annotation`."""
    for member in _members(annotation):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if isinstance(member, type) and issubclass(member, BaseModel):
            for name, info in member.model_fields.items():
                if part in (name, info.alias):
                    return info.annotation
        elif origin in (list, tuple, set, frozenset) and isinstance(part, int) and args:
            return args[0]
        elif origin is dict and len(args) == 2:
            return args[1]
    return None


def _fields_at(request: Request, loc: tuple[Any, ...]) -> list[str] | None:
    """The fields the request body's model accepts at `loc` (a path into the body), if known."""
    route = request.scope.get("route")
    body = getattr(route, "body_field", None)
    if body is None or not loc or loc[0] != "body":
        return None
    annotation: Any = body.field_info.annotation
    for part in loc[1:]:
        annotation = _step(annotation, part)
        if annotation is None:
            return None
    models = [m for m in _members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)]
    return [info.alias or name for name, info in models[0].model_fields.items()] if len(models) == 1 else None


def _unknown_field(request: Request, loc: tuple[Any, ...]) -> str | None:
    """For an extra field: which one, the closest valid name and every valid one (a misspelt stage
    or option says what it should be, not only that it is not permitted)."""
    if not loc or not isinstance(loc[-1], str):
        return None
    known = _fields_at(request, loc[:-1])
    if not known:
        return None
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    kind = "stage" if loc[1:-1] == ("stages",) else "field"
    return f"unknown {kind} {loc[-1]!r}{hint}; valid {kind}s here: {', '.join(known)}"


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> str | None:
    """Every method some route serves at this path. Starlette names only the first matching
    route's methods, so `OPTIONS /v1/analyses` said `Allow: POST` although GET is served too."""
    allowed = [
        method for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
               for route in request.app.router.routes)
    ]
    return ", ".join(allowed) or None


# Postgres refusing NUL: psycopg for a text parameter, the server for a JSONB value.
_NUL_REFUSALS = ("cannot contain NUL (0x00) bytes", "\\u0000 cannot be converted to text")


def _is_nul_refusal(exc: DBAPIError) -> bool:
    text = str(exc.orig)
    return any(marker in text for marker in _NUL_REFUSALS)


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.detail, headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            message = err.get("msg", "invalid")
            if err.get("type") == "extra_forbidden":
                message = _unknown_field(request, loc) or message
            elif err.get("type") == "literal_error" and isinstance(err.get("input"), str):
                valid = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
                close = difflib.get_close_matches(err["input"], valid, n=1, cutoff=0.6)
                message += f" (did you mean {close[0]!r}?)" if close else ""
            # Model-level validators report at the model; name the model's path then.
            errors.append({"field": _field_path(loc), "message": message, "type": err.get("type")})
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return problem_response(422, f"Invalid request: {detail}", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            headers["Allow"] = allowed
        if exc.status_code == 413:  # a streamed (chunked) body over the limit, from the body-limit middleware
            detail = f"Request body over the limit of {request.app.state.settings.max_body_bytes} bytes."
        return problem_response(exc.status_code, detail, headers=headers or None)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _db_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", type(exc).__name__)
        return problem_response(
            503, "The database is unreachable; retry shortly.", headers={"Retry-After": "5"}
        )

    @app.exception_handler(DBAPIError)
    async def _db_error(_: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return problem_response(503, "The database connection dropped; retry.", headers={"Retry-After": "2"})
        if _is_nul_refusal(exc):  # a NUL the request checks (app/api/guard.py) did not see, e.g. in a page_token
            log.warning("a NUL reached the database: %s", type(exc.orig).__name__)
            return problem_response(
                422, "Invalid request: a value contains a NUL character (U+0000), which cannot be stored; "
                "remove it. The request was not applied.",
                errors=[{"field": "request", "message": "a value contains a NUL character", "type": "string_nul"}],
            )
        log.exception("database error")
        return problem_response(500, "Internal database error; the request was not applied.")

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem_response(500, "Internal server error.")
