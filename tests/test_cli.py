"""`layerscope serve --workers N`: one process in embedded mode, uvicorn worker processes in served mode.

No server is started: uvicorn.run is replaced, so these run in milliseconds without Postgres or Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

import cli.main
from app.config import get_settings


@pytest.fixture
def uvicorn_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[tuple[tuple, dict]]]:
    """Settings from a clean environment (embedded until REDIS_URL is set), no logging reconfiguration,
    no in-process worker thread, and a uvicorn.run that records its calls instead of serving."""
    for name in ("DATABASE_URL", "REDIS_URL", "LAYERSCOPE_DATABASE_URL", "LAYERSCOPE_REDIS_URL",
                 "LAYERSCOPE_AUTH_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LAYERSCOPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(cli.main, "_logging", lambda: None)
    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(cli.main, "start_embedded_worker", lambda api, settings: None)
    get_settings.cache_clear()
    yield calls
    get_settings.cache_clear()


def _serve(*args: str) -> Any:
    return CliRunner().invoke(cli.main.app, ["serve", *args])


def test_serve_help_lists_workers() -> None:
    result = CliRunner().invoke(cli.main.app, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    assert "--workers" in result.stdout


def test_embedded_mode_refuses_several_workers(uvicorn_calls: list, tmp_path: Path) -> None:
    result = _serve("--workers", "2")
    assert result.exit_code == 2
    assert "embedded mode" in result.stderr and "REDIS_URL" in result.stderr
    assert uvicorn_calls == []
    assert not (tmp_path / "data").exists()  # refused before the data directory or any migration

    assert _serve("--workers", "0").exit_code == 2  # at least one


def test_embedded_mode_one_worker_serves_the_app(uvicorn_calls: list) -> None:
    result = _serve("--port", "8123")
    assert result.exit_code == 0, result.output
    [(args, kwargs)] = uvicorn_calls
    assert not isinstance(args[0], str)  # the app object itself, with its in-process worker
    assert kwargs == {"host": "127.0.0.1", "port": 8123, "log_level": "info", "log_config": None}


def test_served_mode_runs_uvicorn_workers_on_the_factory(
    uvicorn_calls: list, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'served.db'}")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    result = _serve("--workers", "3", "--host", "0.0.0.0", "--port", "8124")
    assert result.exit_code == 0, result.output
    [(args, kwargs)] = uvicorn_calls
    assert args == ("cli.main:api_factory",)
    assert kwargs == {"factory": True, "workers": 3, "host": "0.0.0.0", "port": 8124, "log_level": "info", "log_config": None}

    # What each worker process does: import the factory, build the app from the environment.
    factory = uvicorn.importer.import_from_string(args[0])
    get_settings.cache_clear()
    api = factory()
    assert api.state.settings.redis_url == "redis://127.0.0.1:1/0"
    assert api.state.settings.database_url == f"sqlite:///{tmp_path / 'served.db'}"


def test_served_mode_refuses_the_default_key_pepper(
    uvicorn_calls: list, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'served.db'}")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.delenv("LAYERSCOPE_KEY_PEPPER")
    get_settings.cache_clear()
    result = _serve()
    assert result.exit_code == 2
    assert "LAYERSCOPE_KEY_PEPPER" in result.stderr and "LAYERSCOPE_ALLOW_DEV_PEPPER" in result.stderr
    assert uvicorn_calls == []
    keys = CliRunner().invoke(cli.main.app, ["keys", "create", "--project", "p"])
    assert keys.exit_code == 2 and "LAYERSCOPE_KEY_PEPPER" in keys.stderr

    monkeypatch.setenv("LAYERSCOPE_ALLOW_DEV_PEPPER", "true")  # the explicit opt-out: starts, warns
    get_settings.cache_clear()
    result = _serve()
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.stderr and len(uvicorn_calls) == 1


def test_embedded_mode_accepts_the_default_key_pepper(uvicorn_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERSCOPE_KEY_PEPPER")
    get_settings.cache_clear()
    result = _serve()
    assert result.exit_code == 0, result.output
    assert "PEPPER" not in result.stderr


def test_embedded_serve_says_how_to_get_a_key_until_one_exists(uvicorn_calls: list) -> None:
    first = _serve()
    assert first.exit_code == 0, first.output
    assert "no API key yet" in first.output and "layerscope keys create --project default" in first.output
    made = CliRunner().invoke(cli.main.app, ["keys", "create", "--project", "default", "--scopes", "read"])
    assert made.exit_code == 0, made.output
    again = _serve()
    assert again.exit_code == 0, again.output
    assert "no API key yet" not in again.output


def test_demo_keeps_its_data_in_the_data_dir_and_prints_the_dashboard_link(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "LAYERSCOPE_DATABASE_URL", "LAYERSCOPE_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LAYERSCOPE_DATA_DIR", str(tmp_path / "demo-data"))
    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(
            cli.main.app, ["demo", "--model", "tiny-random-llama", "--dataset", "chatterbot-conversations", "--limit", "8"]
        )
    finally:
        get_settings.cache_clear()
    assert out.exit_code == 0, out.output
    assert (tmp_path / "demo-data" / "layerscope.db").is_file()
    assert "dashboard: http://127.0.0.1:8000/dashboard#/a/" in out.output
    assert f"LAYERSCOPE_DATA_DIR={tmp_path / 'demo-data'}" in out.output
