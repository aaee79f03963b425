"""The interceptor chain's base: each interceptor wraps a method's handler for one
concern and covers all four handler kinds; `InterceptorChain` applies them all, once
per method, as a single gRPC interceptor. Only the outermost wrapper (errors) is a
coroutine or async generator; the inner ones run their checks when the call starts
and hand back the inner behaviour's awaitable or iterator, so a streamed response
pays for one wrapper per message, not one per interceptor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Behaviour: TypeAlias = Callable[[Any, Any], Any]

# Health checks and reflection stay open and untouched, as load balancers and grpcurl
# expect.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_KEEP: Any = object()


class MethodInterceptor(ABC):
    """One concern of the chain: wraps a method's handler (once per method)."""

    @abstractmethod
    def wrap(self, handler: Handler, method: str) -> Handler:
        """The handler with this interceptor's concern around its behaviour."""


class InterceptorChain(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The interceptors, outermost first, as one gRPC interceptor: each method's
    handler is wrapped by all of them once and cached, so a call pays for one
    interception, not one per concern."""

    def __init__(self, interceptors: Sequence[MethodInterceptor]) -> None:
        self._interceptors = list(interceptors)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler  # type: ignore[return-value]  # None: an unknown method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            wrapped = handler
            for interceptor in reversed(self._interceptors):
                wrapped = interceptor.wrap(wrapped, method)
            cached = self._wrapped[method] = (handler, wrapped)
        return cached[1]


def behaviour_of(handler: Handler) -> Behaviour:
    behaviour = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behaviour is not None, "a handler has a behaviour"
    return behaviour


def rebuild(
    handler: Handler,
    behaviour: Behaviour,
    *,
    request_deserializer: Any = _KEEP,
    response_serializer: Any = _KEEP,
) -> Handler:
    """A handler of the same kind as `handler` with another behaviour (and, if given,
    other (de)serializers)."""
    parse = handler.request_deserializer if request_deserializer is _KEEP else request_deserializer
    serialize = handler.response_serializer if response_serializer is _KEEP else response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour, parse, serialize)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour, parse, serialize)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour, parse, serialize)
    return grpc.unary_unary_rpc_method_handler(behaviour, parse, serialize)
