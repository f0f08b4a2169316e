"""Delivery connects to the address the URL policy checked (no DNS rebinding between check and POST)."""

from __future__ import annotations

import datetime as dt
import socket

import httpx
import pytest

from app.config import Settings
from app.models import WebhookEvent
from app.webhooks import pinned_request
from worker.service import webhooks as delivery


def _answers(*addresses: str):  # noqa: ANN202
    """A resolver that gives each address in turn, as a rebinding DNS server would."""
    calls: list[str] = []

    def getaddrinfo(host: str, port: object, *args: object, **kwargs: object) -> list:
        calls.append(host)
        address = addresses[min(len(calls), len(addresses)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 443))]

    return getaddrinfo, calls


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_the_post_goes_to_the_checked_address_even_when_dns_changes(monkeypatch, scheme: str) -> None:
    resolver, calls = _answers("93.184.216.34", "127.0.0.1")  # public at the check, loopback afterwards
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    event = WebhookEvent(id="evt-1", project="p", type="analysis.succeeded", payload={"id": "a"},
                         created_at=dt.datetime(2026, 12, 1, tzinfo=dt.UTC))
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        status, error = delivery._send(client, Settings(), f"{scheme}://hooks.example.test/in?x=1", "s" * 24, event)
    assert (status, error) == (204, None)
    assert calls == ["hooks.example.test"]  # resolved once, by the policy check
    (request,) = seen
    assert request.url.host == "93.184.216.34" and request.url.path == "/in" and request.url.query == b"x=1"
    assert request.headers["host"] == "hooks.example.test"
    assert request.extensions.get("sni_hostname") == ("hooks.example.test" if scheme == "https" else None)


def test_a_name_resolving_to_a_private_address_is_refused_without_a_post(monkeypatch) -> None:
    resolver, _ = _answers("10.0.0.7")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    event = WebhookEvent(id="evt-2", project="p", type="analysis.failed", payload={},
                         created_at=dt.datetime(2026, 12, 1, tzinfo=dt.UTC))
    with httpx.Client(transport=httpx.MockTransport(lambda r: pytest.fail("posted"))) as client:
        status, error = delivery._send(client, Settings(), "https://hooks.example.test/in", "s" * 24, event)
    assert status is None and error is not None and "non-public address (10.0.0.7)" in error


def test_pinned_request_keeps_port_and_brackets_ipv6() -> None:
    assert pinned_request("https://h.example:8443/a", "2606:2800::1") == (
        "https://[2606:2800::1]:8443/a", {"Host": "h.example:8443"}, {"sni_hostname": "h.example"})
    assert pinned_request("http://h.example/a", None) == ("http://h.example/a", {}, {})
