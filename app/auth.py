"""API keys: `Authorization: Bearer ls_<prefix>_<secret>`, stored as an HMAC, scoped to a project."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import uuid
from dataclasses import dataclass

from fastapi import Depends, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.deps import get_session, get_settings_dep
from app.models import ApiKey
from app.problems import Problem

SCOPES = ("read", "submit", "admin")


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


def authenticate(session: Session, settings: Settings, authorization: str | None) -> Principal:
    if settings.auth_disabled:
        return Principal(settings.default_project, frozenset(SCOPES), None)
    challenge = {"WWW-Authenticate": "Bearer"}
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Problem(401, "Send an API key as `Authorization: Bearer <key>`.", headers=challenge)
    key = authorization[7:].strip()
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "ls":
        raise Problem(401, "Malformed API key.", headers=challenge)
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == parts[1]))
    expected = row.key_hash if row else hash_key("missing", settings.key_pepper)
    valid = hmac.compare_digest(expected, hash_key(key, settings.key_pepper))
    if row is None or not valid or row.revoked_at is not None:
        raise Problem(401, "Unknown or revoked API key.", headers=challenge)
    return Principal(row.project, frozenset(row.scopes.split(",")), row.id)


def require(scope: str):  # noqa: ANN201 - FastAPI dependency factory
    def dependency(
        request: Request,
        session: Session = Depends(get_session),
        settings: Settings = Depends(get_settings_dep),
    ) -> Principal:
        principal = authenticate(session, settings, request.headers.get("authorization"))
        limiter = request.app.state.rate_limiter
        if limiter is not None:
            wait = limiter.take(principal.key_id or principal.project)
            if wait > 0:
                raise Problem(429, "Rate limit for this API key exceeded; retry after the given seconds.",
                              headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if scope not in principal.scopes and "admin" not in principal.scopes:
            raise Problem(403, f"This API key lacks the `{scope}` scope.")
        return principal

    return dependency
