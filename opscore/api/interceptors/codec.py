"""The wire codec: request bytes are parsed here, inside the chain, so a malformed
message is INVALID_ARGUMENT (gRPC's own parsing would answer INTERNAL); a response
that is already bytes (watch fan-out serializes each event once for every watcher)
passes through unserialized."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from google.protobuf.message import DecodeError

from opscore.api.interceptors.base import (
    Behaviour,
    Handler,
    MethodInterceptor,
    behaviour_of,
    rebuild,
)
from opscore.protocol.errors import InvalidArgumentError


def _parser(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse_or_refuse(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            raise InvalidArgumentError.single("request", "not a valid protobuf message") from None

    return parse_or_refuse


def _passing_bytes(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def serialize_unless_bytes(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serialize_unless_bytes


class CodecInterceptor(MethodInterceptor):
    def wrap(self, handler: Handler, method: str) -> Handler:
        inner = behaviour_of(handler)
        assert handler.request_deserializer is not None
        assert handler.response_serializer is not None
        parse = _parser(handler.request_deserializer)
        if handler.request_streaming:

            async def parsed(raw_requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
                async for raw in raw_requests:
                    yield parse(raw)

            def request_stream(raw_requests: AsyncIterator[bytes], context: Any) -> Any:
                return inner(parsed(raw_requests), context)

            behaviour: Behaviour = request_stream
        else:

            def one_request(raw: bytes, context: Any) -> Any:
                return inner(parse(raw), context)

            behaviour = one_request
        return rebuild(
            handler,
            behaviour,
            request_deserializer=None,
            response_serializer=_passing_bytes(handler.response_serializer),
        )
