"""A per-caller rate limit (token buckets): callers are named by their principal, or
by their peer address when authentication is off."""

from __future__ import annotations

import time
from typing import Any

from opscore.api.interceptors.auth import current_principal
from opscore.api.interceptors.base import Handler, MethodInterceptor, behaviour_of, rebuild
from opscore.domain.access import ANONYMOUS
from opscore.protocol.errors import RateLimitedError


class TokenBuckets:
    """Per-caller token buckets: `rate` requests a second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        self._rate = rate
        self._burst = max(burst, 1.0)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, who: str) -> None:
        now = time.monotonic()
        tokens, last = self._buckets.get(who, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1.0:
            self._buckets[who] = (tokens, now)
            wait = (1.0 - tokens) / self._rate
            raise RateLimitedError(
                f"rate limit of {self._rate:g} requests/s exceeded; retry in {wait:.3f}s", wait
            )
        self._buckets[who] = (tokens - 1.0, now)


def _peer_host(context: Any) -> str:
    peer: str = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0]


class RateLimitInterceptor(MethodInterceptor):
    def __init__(self, rate: float, burst: float) -> None:
        self._buckets = TokenBuckets(rate, burst or 2 * rate)

    def wrap(self, handler: Handler, method: str) -> Handler:
        inner = behaviour_of(handler)

        def admitted(request: Any, context: Any) -> Any:
            principal = current_principal.get()
            self._buckets.take(_peer_host(context) if principal is ANONYMOUS else principal.name)
            return inner(request, context)

        return rebuild(handler, admitted)
