"""The interceptor chain every RPC passes, outermost first: errors (any failure
becomes its rich status), codec (request bytes are parsed here, so garbage is
INVALID_ARGUMENT), authentication and authorization, rate limit; then the servicer.
Health checks and reflection pass untouched."""

from __future__ import annotations

import grpc

from opscore.api.interceptors.auth import Authenticator, AuthInterceptor
from opscore.api.interceptors.codec import CodecInterceptor
from opscore.api.interceptors.errors import ErrorInterceptor
from opscore.api.interceptors.rate_limit import RateLimitInterceptor


def interceptor_chain(
    authenticator: Authenticator, rate: float, burst: float
) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    return [
        ErrorInterceptor(),
        CodecInterceptor(),
        AuthInterceptor(authenticator),
        RateLimitInterceptor(rate, burst),
    ]
