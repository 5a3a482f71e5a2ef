"""Limits on what one connection may ask of the broker, and the token bucket
that paces publishers.  Each limit answers with a clear error when passed
(docs/security.md, "Limits")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What the HTTP listener allows.  A rate of 0 means unlimited."""

    max_connections: int = 10_000        # beyond it: 503 and close
    max_body_bytes: int = 64 * MIB       # a request body beyond it: 413
    header_timeout_s: float = 10.0       # a request head (and a TLS handshake) must arrive within
    keepalive_timeout_s: float = 75.0    # an idle keep-alive connection is closed after this
    publish_rate: float = 0.0            # POSTs per second per connection; beyond it: 429
    publish_burst: int = 0               # bucket size; 0 means max(1, publish_rate)

    def __post_init__(self) -> None:
        if (self.max_connections < 1 or self.max_body_bytes < 1 or self.header_timeout_s <= 0
                or self.keepalive_timeout_s <= 0 or self.publish_rate < 0
                or self.publish_burst < 0):
            raise ValueError("HTTP limits must be positive (rates may be 0 for unlimited)")


class TokenBucket:
    """``rate`` tokens per second, up to ``burst`` saved.  ``take(n)`` returns
    0.0 if the tokens were there (and takes them), or else how many seconds
    until they will be (and takes nothing).  A rate of 0 is no limit: every
    ``take`` passes at once."""

    def __init__(self, rate: float, burst: float = 0.0,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.rate = rate
        self.burst = burst or max(1.0, rate)
        self.clock = clock
        self._tokens = self.burst
        self._at = clock()

    def take(self, n: float = 1.0) -> float:
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if n <= self._tokens:
            self._tokens -= n
            return 0.0
        if n > self.burst:
            return float("inf")      # can never pass: a batch bigger than the bucket
        return (n - self._tokens) / self.rate
