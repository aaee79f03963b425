"""The one server interceptor: every RPC is parsed, authenticated, authorized and
rate-limited here, and any OpsCoreError becomes its rich status, so servicers hold
none of that."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf.message import DecodeError

from opscore.api.access import OPEN_PREFIXES, Access, current_principal
from opscore.api.status import abort
from opscore.errors import InvalidArgumentError

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _peer_host(context: Any) -> str:
    peer: str = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0]


def _passing_bytes(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """A response serializer that lets a stream yield bytes it serialized itself (watch
    fan-out serializes each event once for every watcher)."""
    assert serialize is not None

    def serialize_unless_bytes(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serialize_unless_bytes


class EdgeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps each method's handler once (cached): bytes in, parsed here so garbage is
    INVALID_ARGUMENT rather than INTERNAL; then who may call; then the servicer."""

    def __init__(self, access: Access) -> None:
        self._access = access
        self._wrapped: dict[str, Handler | None] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = handler_call_details.method
        if method not in self._wrapped:
            handler = await continuation(handler_call_details)
            open_method = method.startswith(OPEN_PREFIXES)
            self._wrapped[method] = handler if open_method else self._wrap(handler, method)
        return self._wrapped[method]  # type: ignore[return-value]

    def _admit(self, method: str, raw: bytes, parse: Callable[[bytes], Any], context: Any) -> Any:
        try:
            request = parse(raw)
        except DecodeError:
            raise InvalidArgumentError.single("request", "not a valid protobuf message") from None
        principal = self._access.authenticate(context.invocation_metadata())
        self._access.authorize(method, principal, request)
        self._access.admit(principal.name if self._access.enabled else _peer_host(context))
        current_principal.set(principal)
        return request

    def _wrap(self, handler: Handler | None, method: str) -> Handler | None:
        if handler is None:
            return None
        parse = cast(Callable[[bytes], Any], handler.request_deserializer)
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_behavior(raw: bytes, context: Any) -> Any:
                try:
                    return await unary(self._admit(method, raw, parse, context), context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_behavior, None, handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = cast(Callable[[Any, Any], AsyncIterator[Any]], handler.unary_stream)

            async def stream_behavior(raw: bytes, context: Any) -> AsyncIterator[Any]:
                try:
                    async for item in stream(self._admit(method, raw, parse, context), context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await abort(context, exc, method)

            return grpc.unary_stream_rpc_method_handler(
                stream_behavior, None, _passing_bytes(handler.response_serializer)
            )
        return handler
