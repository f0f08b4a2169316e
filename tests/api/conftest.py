from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.auth import create_key
from app.db import session_factory, session_scope
from app.main import create_app
from tests.conftest import make_settings, serve_in_thread
from worker.service.embedded import EmbeddedWorker


@dataclass
class Api:
    client: TestClient
    settings: object
    sf: object
    project: str
    key: str
    other_key: str
    read_key: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def post(self, path: str, **kw):  # noqa: ANN003, ANN201
        return self.client.post(path, headers={**self.headers(), **kw.pop("headers", {})}, **kw)

    def get(self, path: str, **kw):  # noqa: ANN003, ANN201
        return self.client.get(path, headers={**self.headers(), **kw.pop("headers", {})}, **kw)

    def delete(self, path: str, **kw):  # noqa: ANN003, ANN201
        return self.client.delete(path, headers={**self.headers(), **kw.pop("headers", {})}, **kw)


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Api:
    settings = make_settings(db_url, tmp_path)
    sf = session_factory(settings.resolved_database_url)
    project = f"proj-{uuid.uuid4().hex[:8]}"
    with session_scope(sf) as s:
        key = create_key(s, settings, project, "test", ["read", "submit", "admin"])
        read_key = create_key(s, settings, project, "reader", ["read"])
        other_key = create_key(s, settings, f"other-{project}", "other", ["read", "submit"])
    client = TestClient(create_app(settings))
    return Api(client, settings, sf, project, key, other_key, read_key)


@pytest.fixture
def live_server(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The real app under uvicorn with its in-process worker, on SQLite; yields (base URL, a read+submit key)."""
    yield from _live(sqlite_url, tmp_path, ["read", "submit"])


@pytest.fixture
def live_admin_server(sqlite_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """As `live_server`, with a read+submit+admin key."""
    yield from _live(sqlite_url, tmp_path, ["read", "submit", "admin"])


def _live(sqlite_url: str, tmp_path: Path, scopes: list[str]) -> Iterator[tuple[str, str]]:
    settings = make_settings(sqlite_url, tmp_path)
    with session_scope(session_factory(settings.resolved_database_url)) as s:
        key = create_key(s, settings, f"proj-{uuid.uuid4().hex[:8]}", "client", scopes)
    app = create_app(settings)
    worker = EmbeddedWorker(app.state.session_factory, settings, app.state.enqueuer)
    worker.start()
    try:
        with serve_in_thread(app) as base:
            yield base, key
    finally:
        worker.stop()
        worker.join(timeout=10)


SPEC = {
    "model": {"name": "tiny-random-llama"},
    "dataset": {"rows": [{"text": "hello world"}, {"text": "a second line of text"}], "limit": 2},
    "stages": {"avss": {}},
    "labels": {"team": "research"},
}
