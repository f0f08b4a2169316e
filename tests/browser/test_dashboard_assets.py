"""The dashboard's routes, without a browser: served with no key, only the known files, with a strict CSP."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from app.api.dashboard import ASSETS, STATIC_DIR
from app.main import create_app
from tests.conftest import make_settings


def client(sqlite_url: str, tmp_path: Path) -> TestClient:
    return TestClient(create_app(make_settings(sqlite_url, tmp_path, auth_disabled=False)))


def test_page_and_assets_are_served_without_a_key(sqlite_url: str, tmp_path: Path) -> None:
    c = client(sqlite_url, tmp_path)
    page = c.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    # Every asset the page names is served, with its type; the data behind it is not.
    named = re.findall(r'(?:src|href)="/dashboard/assets/([^"]+)"', page.text)
    assert {"app.js", "style.css", "chart.umd.js"} <= set(named)
    for name in named:
        r = c.get(f"/dashboard/assets/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"].split(";")[0] == ASSETS[name].split(";")[0]
    assert c.get("/v1/analyses").status_code == 401
    assert c.get("/dashboard/", follow_redirects=False).headers["location"] == "/dashboard"


def test_only_the_listed_files_are_served(sqlite_url: str, tmp_path: Path) -> None:
    c = client(sqlite_url, tmp_path)
    for name in ("index.html.bak", "..%2F..%2Fmain.py", "%2E%2E/config.py", "nope.js"):
        r = c.get(f"/dashboard/assets/{name}")
        assert r.status_code == 404, name
        assert r.headers["content-type"].startswith("application/problem+json")
    assert c.get("/dashboard/assets/../../main.py").status_code == 404
    assert all((STATIC_DIR / name).is_file() for name in ASSETS)
    assert "/dashboard" not in c.get("/openapi.json").json()["paths"]
