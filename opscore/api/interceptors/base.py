"""The base of every interceptor of the chain: each wraps a method's handler once
(cached) and covers all four handler kinds. Only the outermost wrapper (errors) is a
coroutine or async generator; the inner ones run their checks when the call starts
and hand back the inner behaviour's awaitable or iterator, so a streamed response
pays for one wrapper per message, not one per interceptor.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Behaviour: TypeAlias = Callable[[Any, Any], Any]

# Health checks and reflection stay open and untouched, as load balancers and grpcurl
# expect.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_KEEP: Any = object()


class MethodInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Base of the chain's interceptors: `wrap` is called once per method."""

    def __init__(self) -> None:
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
            cached = self._wrapped[method] = (handler, self.wrap(handler, method))
        return cached[1]

    @abstractmethod
    def wrap(self, handler: Handler, method: str) -> Handler:
        """The handler with this interceptor's concern around its behaviour."""


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
