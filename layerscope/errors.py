"""Typed errors of the Python client: one class per kind of answer, each carrying the problem's fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class FieldError:
    field: str
    message: str
    type: str | None = None


class LayerscopeError(Exception):
    """Base of every error the client raises."""


class ConnectionFailed(LayerscopeError):
    """The service could not be reached (DNS, refused, timed out)."""


class ApiError(LayerscopeError):
    """The service answered with an RFC 9457 problem: `status`, `title`, `detail`, and for a 422
    every invalid field in `errors`; `body` is the whole problem."""

    def __init__(self, status: int, title: str, detail: str, errors: list[FieldError] | None = None,
                 body: dict[str, Any] | None = None, retry_after: float | None = None):
        super().__init__(f"{status} {title}: {detail}")
        self.status, self.title, self.detail = status, title, detail
        self.errors = errors or []
        self.body = body or {}
        self.retry_after = retry_after


class Unauthorized(ApiError):
    """401: no key, a malformed key, or one that is unknown or revoked."""


class Forbidden(ApiError):
    """403: the key lacks the scope the operation needs."""


class NotFound(ApiError):
    """404: no such analysis, policy or webhook in this key's project."""


class Conflict(ApiError):
    """409: the analysis is not in a state that allows it (e.g. results of an unfinished job)."""


class InvalidRequest(ApiError):
    """422 (and 400/413): the request names a wrong value; `errors[].field` says which."""


class RateLimited(ApiError):
    """429: this key's rate limit; `retry_after` seconds until the next request is accepted."""


class ServiceUnavailable(ApiError):
    """503: the database or broker is down; retry after `retry_after`."""


class AnalysisFailed(LayerscopeError):
    """`wait(..., raise_on_failure=True)` on an analysis that ended FAILED or CANCELLED."""

    def __init__(self, analysis: Any):
        error = analysis.error
        super().__init__(f"analysis {analysis.id} ended {analysis.state.value}"
                         + (f": {error.type}: {error.detail}" if error else ""))
        self.analysis = analysis


_KINDS: dict[int, type[ApiError]] = {
    400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: InvalidRequest, 422: InvalidRequest, 429: RateLimited, 503: ServiceUnavailable,
}


def from_response(status: int, body: Any, headers: Any) -> ApiError:
    """The typed error for a non-2xx answer (a problem+json body, or whatever text came back)."""
    problem = body if isinstance(body, dict) else {}
    errors = [FieldError(e.get("field", ""), e.get("message", ""), e.get("type"))
              for e in problem.get("errors") or [] if isinstance(e, dict)]
    retry = headers.get("retry-after")
    kind = _KINDS.get(status, ApiError)
    return kind(status, str(problem.get("title") or "Error"),
                str(problem.get("detail") or (body if isinstance(body, str) else "") or f"HTTP {status}"),
                errors, problem, float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)
