"""API keys: `Authorization: Bearer ls_<prefix>_<secret>`, stored as an HMAC, scoped to a project."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.guard import check_request
from app.config import Settings
from app.deps import get_session, get_settings_dep
from app.models import ApiKey
from app.problems import Problem

SCOPES = ("read", "submit", "admin", "operator")
# `admin` covers every scope of its project; `operator` is service-wide (e.g. `/metrics`, every project's
# job counts), so no project scope implies it and only the server's CLI makes such keys.
PROJECT_SCOPES = ("read", "submit", "admin")
OPERATOR = "operator"


@dataclass(frozen=True)
class Principal:
    project: str
    scopes: frozenset[str]
    key_id: str | None


def hash_key(key: str, pepper: str) -> str:
    return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()


def create_key(session: Session, settings: Settings, project: str, name: str, scopes: list[str]) -> str:
    """Store a new key and return its plaintext (shown once, never stored)."""
    bad = set(scopes) - set(SCOPES)
    if bad or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {SCOPES}, got {scopes}")
    prefix = secrets.token_hex(6)
    key = f"ls_{prefix}_{secrets.token_urlsafe(32)}"
    session.add(
        ApiKey(
            id=str(uuid.uuid4()),
            project=project,
            name=name,
            prefix=prefix,
            key_hash=hash_key(key, settings.key_pepper),
            scopes=",".join(sorted(set(scopes))),
        )
    )
    return key


@dataclass(frozen=True)
class _KeyRecord:
    key_hash: str
    project: str
    scopes: frozenset[str]
    key_id: str
    revoked: bool


class KeyCache:
    """Recent key lookups by prefix, in this API process, for `ttl` seconds (0: off).

    Spares a status poll its key query. Revoking a key through this process drops it at once;
    another API replica stops accepting it within `ttl` seconds. The secret itself is never
    cached: every request still compares its HMAC with the stored one (constant time).
    """

    def __init__(self, ttl: float):
        self.ttl = ttl
        self.entries: dict[str, tuple[float, _KeyRecord]] = {}
        self.lock = threading.Lock()

    def get(self, prefix: str) -> _KeyRecord | None:
        with self.lock:
            found = self.entries.get(prefix)
        return found[1] if found and found[0] > time.monotonic() else None

    def put(self, prefix: str, record: _KeyRecord) -> None:
        if self.ttl > 0:
            with self.lock:
                if len(self.entries) > 10_000:
                    self.entries.clear()
                self.entries[prefix] = (time.monotonic() + self.ttl, record)

    def drop(self, key_id: str) -> None:
        with self.lock:
            for prefix in [p for p, (_, r) in self.entries.items() if r.key_id == key_id]:
                del self.entries[prefix]


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _parse(authorization: str | None) -> tuple[str, str]:
    """The key and its prefix, or 401."""
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Problem(401, "Send an API key as `Authorization: Bearer <key>`. An operator creates one with "
                      "`layerscope keys create --project P --scopes read,submit` (or an admin with "
                      "`POST /v1/keys`).", headers=_CHALLENGE)
    key = authorization[7:].strip()
    parts = key.split("_", 2)
    # The prefix is looked up in the database: only what `create_key` makes (hex) gets that far.
    if len(parts) != 3 or parts[0] != "ls" or not (parts[1].isascii() and parts[1].isalnum()):
        raise Problem(401, "Malformed API key.", headers=_CHALLENGE)
    return key, parts[1]


def _check(record: _KeyRecord | None, key: str, settings: Settings) -> Principal:
    expected = record.key_hash if record else hash_key("missing", settings.key_pepper)
    valid = hmac.compare_digest(expected, hash_key(key, settings.key_pepper))
    if record is None or not valid or record.revoked:
        raise Problem(401, "Unknown or revoked API key.", headers=_CHALLENGE)
    return Principal(record.project, record.scopes, record.key_id)


def authenticate(
    session: Session, settings: Settings, authorization: str | None, cache: KeyCache | None = None
) -> Principal:
    if settings.auth_disabled:
        return Principal(settings.default_project, frozenset(SCOPES), None)
    key, prefix = _parse(authorization)
    record = cache.get(prefix) if cache is not None else None
    if record is None:
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        if row is not None:
            record = _KeyRecord(row.key_hash, row.project, frozenset(row.scopes.split(",")), row.id,
                                row.revoked_at is not None)
            if cache is not None:
                cache.put(prefix, record)
    return _check(record, key, settings)


def _authenticate_from_cache(settings: Settings, authorization: str | None, cache: KeyCache | None) -> Principal | None:
    """The principal when no database is needed (auth off, malformed header, cached key), else None."""
    if settings.auth_disabled:
        return Principal(settings.default_project, frozenset(SCOPES), None)
    key, prefix = _parse(authorization)
    record = cache.get(prefix) if cache is not None else None
    return _check(record, key, settings) if record is not None else None


def require(scope: str):  # noqa: ANN201 - FastAPI dependency factory
    # async: a cached key is checked on the event loop; only a key lookup goes to a worker thread.
    async def dependency(
        request: Request,
        session: Session = Depends(get_session),
        settings: Settings = Depends(get_settings_dep),
    ) -> Principal:
        header = request.headers.get("authorization")
        cache = getattr(request.app.state, "key_cache", None)
        principal = _authenticate_from_cache(settings, header, cache)
        if principal is None:
            principal = await run_in_threadpool(authenticate, session, settings, header, cache)
        limiter = request.app.state.rate_limiter
        if limiter is not None:
            wait = limiter.take(principal.key_id or principal.project)
            if wait > 0:
                raise Problem(429, "Rate limit for this API key exceeded; retry after the given seconds.",
                              headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if scope not in principal.scopes and (scope == OPERATOR or "admin" not in principal.scopes):
            hint = " (service-wide; made with `layerscope keys create --scopes operator` on the server)" \
                if scope == OPERATOR else ""
            raise Problem(403, f"This API key lacks the `{scope}` scope{hint}.")
        # Every route with a key passes here: a NUL that Postgres cannot store (or a control character
        # in a path id) is a 422 naming the field, once the key is accepted, like any invalid value.
        await check_request(request)
        return principal

    return dependency
