"""Per-key rate limit: a token bucket per API key in this API process.

Each replica limits on its own, so N replicas allow up to N times the rate;
put a shared limiter (e.g. at the ingress) in front when that matters.
"""

from __future__ import annotations

import math
import threading
import time


class TokenBucket:
    def __init__(self, rate_per_minute: int, burst: int | None = None):
        self.rate = rate_per_minute / 60.0
        self.capacity = float(burst if burst is not None else max(1, rate_per_minute // 6))
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when allowed, else the seconds to wait before retrying."""
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                return 0.0
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate if self.rate > 0 else math.inf
