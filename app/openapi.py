"""The OpenAPI document a client generator can use.

FastAPI's own document leaves three gaps that generated clients fall into: error
responses declared as `application/problem+json: {}` (a client then returns None
for every 401/404/422 and loses `detail` and `errors[].field`), no security
scheme (no Authorize button, no auth parameter in the client), and operationIds
made from path and method (`get_layers_v1_analyses__analysis_id__layers_get`).
`install` closes them once for every router: every problem+json response refers
to one `Problem` schema, operations that answer 401 require the bearer scheme,
and an operationId is the route function's name (checked unique at start-up).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from app.problems import PROBLEM

BEARER = "bearerAuth"


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the value that is wrong, e.g. `dataset.rows.1.text`.")
    message: str = Field(description="What is wrong with it.")
    type: str | None = Field(default=None, description="A stable error code, e.g. `missing`, `string_nul`.")


class ProblemBody(BaseModel):
    """RFC 9457 problem details, the body of every error this API returns."""

    type: str = Field(default="about:blank", description="Always `about:blank`: the status says the kind.")
    title: str = Field(description="The status's phrase, e.g. `Not found`.")
    status: int = Field(description="The HTTP status code, repeated.")
    detail: str = Field(description="What went wrong and what to do, for a person.")
    errors: list[FieldError] | None = Field(default=None, description="For 422: every invalid field.")

    model_config = {"title": "Problem", "extra": "allow"}


def operation_id(route: APIRoute) -> str:
    """The route function's name: short, stable, what a generated client calls the method."""
    return route.name


def _problem_refs(schema: dict[str, Any]) -> None:
    ref = {"$ref": "#/components/schemas/Problem"}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            responses = operation.get("responses", {})
            for response in responses.values():
                content = response.get("content", {})
                if PROBLEM in content:
                    content[PROBLEM] = {"schema": ref}
            if "401" in responses:
                operation["security"] = [{BEARER: []}]


def install(app: FastAPI) -> None:
    """Replace `app.openapi` with the completed document (built once, then cached like FastAPI's)."""
    names = [r.name for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RuntimeError(f"route function names must be unique (they are operationIds): {duplicates}")

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes,
            tags=app.openapi_tags, servers=app.servers,
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        problem = ProblemBody.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in problem.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas["Problem"] = problem
        components["securitySchemes"] = {
            BEARER: {
                "type": "http", "scheme": "bearer",
                "description": "An API key: `layerscope keys create --project P --scopes read,submit,admin` "
                               "or `POST /v1/keys` with an admin key.",
            }
        }
        _problem_refs(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
