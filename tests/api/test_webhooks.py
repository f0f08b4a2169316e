"""The webhook resource against a real database: register, list, delete, deliveries, URL policy."""

from __future__ import annotations

import pytest

from app.webhooks import UrlRefused, check_url
from tests.api.conftest import Api
from tests.api.test_analyses import assert_problem
from tests.api.test_gates import create_policy, succeeded

URL = "https://hooks.example.com/layerscope"


def register(api: Api, **body) -> dict:  # noqa: ANN003
    resp = api.post("/v1/webhooks", json={"url": URL, **body})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_register_list_get_delete(api: Api) -> None:
    api.settings.webhook_allowed_hosts = ["hooks.example.com"]  # no DNS lookup in this test
    generated = register(api, description="registry")
    assert generated["secret"].startswith("whsec_") and len(generated["secret"]) > 40
    given = register(api, secret="s" * 24, event_types=["gate.verdict", "analysis.failed"])
    assert given["secret"] == "s" * 24 and given["event_types"] == ["analysis.failed", "gate.verdict"]
    listed = api.get("/v1/webhooks").json()
    assert [w["id"] for w in listed] == [generated["id"], given["id"]]
    assert all("secret" not in w for w in listed)
    got = api.get(f"/v1/webhooks/{given['id']}").json()
    assert got["url"] == URL and "secret" not in got
    assert api.delete(f"/v1/webhooks/{given['id']}").status_code == 204
    assert_problem(api.get(f"/v1/webhooks/{given['id']}"), 404)
    assert_problem(api.delete(f"/v1/webhooks/{given['id']}"), 404)
    assert [w["id"] for w in api.get("/v1/webhooks").json()] == [generated["id"]]


def test_admin_scope_and_project_isolation(api: Api) -> None:
    api.settings.webhook_allowed_hosts = ["hooks.example.com"]
    hook = register(api)
    read, other = api.headers(api.read_key), api.headers(api.other_key)
    assert_problem(api.client.get("/v1/webhooks", headers=read), 403)
    assert_problem(api.client.post("/v1/webhooks", headers=read, json={"url": URL}), 403)
    # The other key lacks admin: 403 before anything; the project check is tested with an admin of it.
    assert_problem(api.client.get(f"/v1/webhooks/{hook['id']}", headers=other), 403)
    from app.auth import create_key
    from app.db import session_scope

    with session_scope(api.sf) as s:
        other_admin = create_key(s, api.settings, f"other-{api.project}", "admin", ["admin"])
    headers = api.headers(other_admin)
    assert api.client.get("/v1/webhooks", headers=headers).json() == []
    assert_problem(api.client.get(f"/v1/webhooks/{hook['id']}", headers=headers), 404)
    assert_problem(api.client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=headers), 404)
    assert_problem(api.client.delete(f"/v1/webhooks/{hook['id']}", headers=headers), 404)


def test_invalid_registrations_are_422(api: Api) -> None:
    body = assert_problem(api.post("/v1/webhooks", json={"url": "ftp://example.com/x"}), 422)
    assert body["errors"][0]["field"] == "url"
    assert_problem(api.post("/v1/webhooks", json={"url": URL, "event_types": ["analysis.started"]}), 422)
    assert_problem(api.post("/v1/webhooks", json={"url": URL, "secret": "short"}), 422)
    assert_problem(api.post("/v1/webhooks", json={"url": URL, "colour": "red"}), 422)
    assert_problem(api.post("/v1/webhooks", json={"url": "https://user:pw@example.com/x"}), 422)


def test_private_addresses_are_refused_unless_allowed(api: Api) -> None:
    for url in ("http://127.0.0.1:9/x", "http://localhost/x", "http://169.254.169.254/latest", "http://[::1]/x",
                "http://10.1.2.3/x"):
        body = assert_problem(api.post("/v1/webhooks", json={"url": url}), 422)
        assert "LAYERSCOPE_WEBHOOK_ALLOWED_HOSTS" in body["detail"]
    api.settings.webhook_allowed_hosts = ["127.0.0.1", "*.example.com"]
    register(api, url="http://127.0.0.1:9/x")
    register(api, url="https://a.b.example.com/x")
    body = assert_problem(api.post("/v1/webhooks", json={"url": "https://example.org/x"}), 422)
    assert "allow-list" in body["detail"]
    api.settings.webhook_allowed_hosts = []
    api.settings.webhook_allow_private_networks = True
    register(api, url="http://10.1.2.3/x")


@pytest.mark.parametrize(
    ("url", "allowed", "private", "ok"),
    [
        ("https://hooks.example.com/x", ["*.example.com"], False, True),
        ("https://example.com/x", ["*.example.com"], False, False),
        ("https://evil-example.com/x", ["*.example.com"], False, False),
        ("https://HOOKS.example.com./x", ["hooks.example.com"], False, True),
        ("http://192.168.1.10/x", [], False, False),
        ("http://[::ffff:127.0.0.1]/x", [], False, False),
        ("http://0.0.0.0/x", [], False, False),
        ("http://8.8.8.8/x", [], False, True),
        ("http://192.168.1.10/x", [], True, True),
        ("http://a.localhost/x", [], False, False),
    ],
)
def test_url_policy(url: str, allowed: list[str], private: bool, ok: bool) -> None:
    if ok:
        check_url(url, allowed, private, resolve=False)
    else:
        with pytest.raises(UrlRefused):
            check_url(url, allowed, private, resolve=False)


def test_a_verdict_queues_a_delivery_listed_with_its_attempts(api: Api) -> None:
    api.settings.webhook_allowed_hosts = ["hooks.example.com"]
    all_events = register(api)
    failures_only = register(api, event_types=["analysis.failed"])
    create_policy(api)
    analysis = succeeded(api)
    verdict = api.post(f"/v1/analyses/{analysis}/gate", params={"policy": "release"}).json()
    items = api.get(f"/v1/webhooks/{all_events['id']}/deliveries").json()["items"]
    assert len(items) == 1
    d = items[0]
    assert d["event_type"] == "gate.verdict" and d["analysis_id"] == analysis and d["state"] == "pending"
    assert d["attempt_count"] == 0 and d["attempts"] == [] and d["event_id"].startswith("evt_")
    assert api.get(f"/v1/webhooks/{failures_only['id']}/deliveries").json()["items"] == []
    assert api.get(f"/v1/webhooks/{all_events['id']}/deliveries", params={"state": "delivered"}).json()["items"] == []
    assert_problem(api.get(f"/v1/webhooks/{all_events['id']}/deliveries", params={"state": "lost"}), 422)
    assert verdict["id"]
    # Deleting the webhook drops its queued deliveries with it.
    assert api.delete(f"/v1/webhooks/{all_events['id']}").status_code == 204
