"""`GET /v1/catalog`: the built-in models and datasets, stages with their options, and every name
a spec accepts for scorers, tasks, detectors, correctness rules and capture sites."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from app.api.analyses import PROBLEM_RESPONSES
from app.auth import Principal, require
from app.catalog import catalog

router = APIRouter(prefix="/v1", tags=["catalog"])


class BuiltinModel(BaseModel):
    name: str
    description: str
    parameters: int | None = Field(description="Parameter count, when known.")


class BuiltinDataset(BaseModel):
    name: str
    description: str


class StageEntry(BaseModel):
    name: str
    description: str
    options: dict[str, Any] = Field(description="JSON schema of the stage's options (defaults, descriptions).")


class Catalog(BaseModel):
    models: list[BuiltinModel]
    datasets: list[BuiltinDataset]
    stages: list[StageEntry]
    scorers: list[str]
    tasks: list[str]
    detectors: list[str]
    correctness_rules: list[str]
    sites: list[str]


_CATALOG = Catalog.model_validate(catalog())  # built once: it changes only with the code


@router.get(
    "/catalog", response_model=Catalog, summary="What a spec can name",
    responses={code: PROBLEM_RESPONSES[code] for code in (401, 403, 429, 503)},
)
def get_catalog(principal: Principal = Depends(require("read"))) -> Catalog:
    """Built-in models (with parameter counts) and datasets, each stage with its options' JSON
    schema, and the scorer, task, detector, correctness-rule and site names a spec accepts."""
    return _CATALOG
