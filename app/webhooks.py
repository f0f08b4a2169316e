"""Webhook signing (Standard Webhooks), the retry schedule, and the URL policy. Pure: no I/O but DNS.

Every POST carries
    webhook-id:        the event id (the same on every retry: receivers deduplicate on it)
    webhook-timestamp: unix seconds of this attempt
    webhook-signature: v1,<base64 HMAC-SHA256(key, f"{id}.{timestamp}.{body}")>
The key is the secret's bytes, or, for a `whsec_<base64>` secret (what the service
generates), the base64-decoded part, as Standard Webhooks libraries expect.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

EVENT_TYPES = (
    "analysis.succeeded", "analysis.failed", "analysis.cancelled", "gate.verdict", "registry.updated", "registry.failed",
)
TERMINAL_EVENT = {"SUCCEEDED": "analysis.succeeded", "FAILED": "analysis.failed", "CANCELLED": "analysis.cancelled"}
SECRET_PREFIX = "whsec_"


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    if secret.startswith(SECRET_PREFIX):
        try:
            return base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except ValueError:
            pass
    return secret.encode()


def encode_body(event_id: str, event_type: str, data: Mapping[str, Any], created: str) -> bytes:
    """The exact bytes that are signed and sent."""
    payload = {"id": event_id, "type": event_type, "timestamp": created, "data": data}
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str).encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        "user-agent": "layerscope-webhooks/1",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
    }


class InvalidSignature(ValueError):
    pass


def verify(secret: str, hdrs: Mapping[str, str], body: bytes, tolerance: float = 300, now: float | None = None) -> None:
    """What a receiver does: raise InvalidSignature unless a v1 signature matches and the timestamp is fresh."""
    lower = {k.lower(): v for k, v in hdrs.items()}
    try:
        msg_id, ts = lower["webhook-id"], int(lower["webhook-timestamp"])
        given = lower["webhook-signature"].split()
    except (KeyError, ValueError):
        raise InvalidSignature("missing or malformed webhook headers") from None
    if abs((time.time() if now is None else now) - ts) > tolerance:
        raise InvalidSignature("timestamp outside the tolerance (replay?)")
    expected = sign(secret, msg_id, ts, body)
    if not any(hmac.compare_digest(expected, sig) for sig in given):
        raise InvalidSignature("no signature matches")


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds before the next try after `attempts` failed ones: base, 2 base, 4 base, ... capped, +-10% jitter."""
    delay = min(cap, base * (2 ** max(0, attempts - 1)))
    return delay * (0.9 + 0.2 * secrets.randbelow(1000) / 1000)


# ------------------------------------------------------------------ SSRF policy


class UrlRefused(ValueError):
    pass


def _host_allowed(host: str, allowed: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*.") and (host.endswith(entry[1:]) and host != entry[2:]):
            return True
        if host == entry:
            return True
    return False


# IPv6 prefixes whose last 32 bits are an IPv4 address the packet really goes to (RFC 4291 IPv4-compatible,
# RFC 6052 NAT64 well-known prefix, RFC 2765 IPv4-translated); IPv4-mapped, 6to4 and Teredo have properties.
_EMBEDS_IPV4_LOW32 = tuple(ipaddress.IPv6Network(n) for n in ("::/96", "64:ff9b::/96", "::ffff:0:0:0/96"))
# Never a public destination, whatever a Python version's tables say: NAT64 local use (RFC 8215),
# site-local (deprecated, RFC 3879).
_NOT_PUBLIC_V6 = tuple(ipaddress.IPv6Network(n) for n in ("64:ff9b:1::/48", "fec0::/10"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for (mapped, compatible, NAT64, translated, 6to4, Teredo)."""
    found = [v4 for v4 in (ip.ipv4_mapped, ip.sixtofour) if v4 is not None]
    if ip.teredo is not None:
        found += list(ip.teredo)  # (server, client)
    if any(ip in net for net in _EMBEDS_IPV4_LOW32) and int(ip) > 1:  # not :: or ::1 (checked as IPv6)
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local or any(ip in net for net in _NOT_PUBLIC_V6):
            return False
        embedded = _embedded_ipv4(ip)
        if embedded:  # the IPv4 address decides (::ffff:8.8.8.8 is public, [::7f00:1] is loopback)
            return all(_is_public(v4) for v4 in embedded)
    return ip.is_global and not ip.is_multicast


def check_url(
    url: str, allowed_hosts: Sequence[str], allow_private: bool, resolve: bool = True
) -> str | None:
    """Raise UrlRefused when the service must not POST to `url`.

    An allow-list, when set, is the whole policy. Without one, a host that is (or,
    with `resolve`, resolves to) a loopback, private, link-local or reserved address
    is refused unless `allow_private`. Redirects are never followed at delivery.

    Returns the address that was checked when a host name was resolved here, else None:
    delivery connects to that address (`pinned_request`), so a DNS answer that changes
    between this check and the connection (DNS rebinding) cannot reach a private address.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlRefused("the URL must be http:// or https:// with a host")
    if parts.username or parts.password:
        raise UrlRefused("the URL must not carry credentials; use the signing secret")
    host = parts.hostname
    if allowed_hosts:
        if not _host_allowed(host, allowed_hosts):
            raise UrlRefused(f"host {host!r} is not on this server's webhook allow-list (LAYERSCOPE_WEBHOOK_ALLOWED_HOSTS)")
        return None
    if allow_private:
        return None
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        if host.lower().rstrip(".") in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
            addresses = [ipaddress.ip_address("127.0.0.1")]
        elif not resolve:
            return None
        else:
            try:
                infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
            except OSError as exc:
                raise UrlRefused(f"cannot resolve {host!r}: {exc}") from None
            addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
            _refuse_non_public(host, addresses)
            return str(addresses[0])
    _refuse_non_public(host, addresses)
    return None


def _refuse_non_public(host: str, addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
    bad = [str(a) for a in addresses if not _is_public(a)]
    if bad:
        raise UrlRefused(
            f"host {host!r} is a non-public address ({', '.join(sorted(set(bad)))}); allow it with "
            "LAYERSCOPE_WEBHOOK_ALLOWED_HOSTS or LAYERSCOPE_WEBHOOK_ALLOW_PRIVATE_NETWORKS=true"
        )


def pinned_request(url: str, address: str | None) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(url, extra headers, httpx request extensions) that POST `url` to `address`, the one
    `check_url` checked: the URL's host becomes the address, `Host` keeps the name, and TLS
    sends the name (SNI) and verifies the certificate against it. `address` None: unchanged."""
    if address is None:
        return url, {}, {}
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{address}]" if ":" in address else address
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    extensions: dict[str, Any] = {"sni_hostname": host} if parts.scheme == "https" else {}
    return parts._replace(netloc=netloc).geturl(), {"Host": host_header}, extensions
