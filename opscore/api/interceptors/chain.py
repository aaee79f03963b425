"""The interceptor chain every RPC passes, outermost first: errors (any failure
becomes its rich status), codec (request bytes are parsed here, so garbage is
INVALID_ARGUMENT), authentication and authorization, rate limit (when configured);
then the servicer. Health checks and reflection pass untouched."""

from __future__ import annotations

from opscore.api.interceptors.auth import Authenticator, AuthInterceptor
from opscore.api.interceptors.base import InterceptorChain
from opscore.api.interceptors.codec import CodecInterceptor
from opscore.api.interceptors.errors import ErrorInterceptor
from opscore.api.interceptors.rate_limit import RateLimitInterceptor


def interceptor_chain(authenticator: Authenticator, rate: float, burst: float) -> InterceptorChain:
    """The chain; without a rate limit (`rate` 0, the default) it has no rate layer."""
    rate_limit = [RateLimitInterceptor(rate, burst)] if rate > 0 else []
    return InterceptorChain(
        [ErrorInterceptor(), CodecInterceptor(), AuthInterceptor(authenticator), *rate_limit]
    )
