"""API keys of the caller's project (admin scope). The plaintext is shown once, at creation."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.api.guard import GuardedRoute
from app.auth import OPERATOR, PROJECT_SCOPES, SCOPES, Principal, create_key, require
from app.config import Settings
from app.db import rowcount
from app.deps import get_session, get_settings_dep
from app.models import ApiKey, utcnow
from app.problems import Problem
from app.schemas import Strict

PROBLEMS: dict[int | str, dict[str, Any]] = {
    code: {"description": desc, "content": {"application/problem+json": {}}}
    for code, desc in {
        401: "Missing or invalid API key",
        403: "The key lacks the admin scope",
        404: "No such key in this key's project",
        400: "The body could not be read (e.g. JSON that is not UTF-8)",
        413: "Request body over the size limit",
        422: "Invalid request (the body names the field)",
        429: "Rate limit of this API key exceeded (see Retry-After)",
        503: "Database unavailable",
    }.items()
}
router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=PROBLEMS, route_class=GuardedRoute)


class KeyCreate(Strict):
    name: str = Field(min_length=1, max_length=128)
    scopes: list[str] = Field(
        min_length=1, description=f"Subset of {list(PROJECT_SCOPES)} (`operator` keys are made with the CLI only).",
    )


class KeyOut(BaseModel):
    id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="The secret; store it now, it is not shown again.")


def _out(row: ApiKey) -> KeyOut:
    return KeyOut(id=row.id, name=row.name, prefix=row.prefix, scopes=row.scopes.split(","),
                  created_at=row.created_at, revoked_at=row.revoked_at)


@router.post("", status_code=201, response_model=KeyCreated, summary="Create an API key in this project")
def create_api_key(
    body: KeyCreate,
    principal: Principal = Depends(require("admin")),
    session: Session = Depends(get_session),
    settings: Settings = Depends(get_settings_dep),
) -> KeyCreated:
    if OPERATOR in body.scopes:
        raise Problem(422, "scopes: `operator` keys see every project's service metrics; they are made on the "
                      "server with `layerscope keys create --scopes operator`, not through the API",
                      errors=[{"field": "scopes", "message": "operator keys are not made through the API"}])
    bad = sorted(set(body.scopes) - set(SCOPES))
    if bad:
        raise Problem(422, f"scopes: unknown {bad}; allowed {list(SCOPES)}",
                      errors=[{"field": "scopes", "message": "unknown scope"}])
    key = create_key(session, settings, principal.project, body.name, body.scopes)
    session.commit()
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == key.split("_")[1]))
    assert row is not None
    return KeyCreated(**_out(row).model_dump(), key=key)


@router.get("", response_model=list[KeyOut], summary="List this project's API keys")
def list_keys(
    principal: Principal = Depends(require("admin")), session: Session = Depends(get_session)
) -> list[KeyOut]:
    rows = session.scalars(select(ApiKey).where(ApiKey.project == principal.project).order_by(ApiKey.created_at))
    return [_out(r) for r in rows]


@router.delete("/{key_id}", status_code=204, summary="Revoke an API key")
def revoke_api_key(
    key_id: str,
    request: Request,
    principal: Principal = Depends(require("admin")),
    session: Session = Depends(get_session),
) -> None:
    done = rowcount(session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.project == principal.project).values(revoked_at=utcnow())
    ))
    if not done:
        raise Problem(404, f"No API key {key_id!r} in this project.")
    session.commit()
    request.app.state.key_cache.drop(key_id)  # this process stops accepting it at once
