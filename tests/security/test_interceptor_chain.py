"""The interceptor chain guards every handler kind: a client-streaming or bidi method
added later is refused without credentials or a RULES entry, never entered."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct

from opscore.api.interceptors import auth
from opscore.api.interceptors.auth import Authenticator, Rule
from opscore.api.interceptors.chain import interceptor_chain
from opscore.domain.access import OperatorKey, Role, new_operator_key

SERVICE = "opspawn.opscore.v1.TestService"
KINDS = {"Echo": "unary_unary", "Collect": "stream_unary", "Chat": "stream_stream"}
STREAMING = ("Collect", "Chat")


@pytest.fixture
def secret_and_key() -> tuple[str, OperatorKey]:
    return new_operator_key("root", Role.ADMIN)


@pytest.fixture
async def served(
    secret_and_key: tuple[str, OperatorKey],
) -> AsyncIterator[tuple[str, Counter[str]]]:
    """A real server with the chain and one test method of each kind; yields its
    address and how often each method's behaviour was entered."""
    entered: Counter[str] = Counter()

    async def echo(request: Struct, context: Any) -> Struct:
        entered["Echo"] += 1
        return request

    async def collect(requests: AsyncIterator[Struct], context: Any) -> Struct:
        entered["Collect"] += 1
        async for _ in requests:
            pass
        return Struct()

    async def chat(requests: AsyncIterator[Struct], context: Any) -> AsyncIterator[Struct]:
        entered["Chat"] += 1
        async for request in requests:
            yield request

    codec: dict[str, Any] = {
        "request_deserializer": Struct.FromString,
        "response_serializer": Struct.SerializeToString,
    }
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo, **codec),
            "Collect": grpc.stream_unary_rpc_method_handler(collect, **codec),
            "Chat": grpc.stream_stream_rpc_method_handler(chat, **codec),
        },
    )
    authenticator = Authenticator([secret_and_key[1]], lambda token: None)
    server = grpc.aio.server(interceptors=[interceptor_chain(authenticator, 0, 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", entered
    finally:
        await server.stop(grace=None)


async def invoke(
    address: str,
    name: str,
    metadata: Sequence[tuple[str, str]] | None = None,
    requests: Sequence[Any] = (),
    serialize: Any = Struct.SerializeToString,
) -> None:
    """Calls test method `name` and waits (5 s at most) for the server to end it.

    A streaming call writes `requests` and never half-closes: writing while the server
    refuses the call can turn its status into a client-side INTERNAL (grpc/grpc#36066).
    """
    async with grpc.aio.insecure_channel(address) as channel, asyncio.timeout(5):
        method = getattr(channel, KINDS[name])(
            f"/{SERVICE}/{name}",
            request_serializer=serialize,
            response_deserializer=Struct.FromString,
        )
        if name == "Echo":
            await method(Struct(), metadata=metadata)
            return
        call = method(metadata=metadata)
        for request in requests:
            await call.write(request)
        await (call if name == "Collect" else call.read())


def bearer(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


@pytest.mark.parametrize("name", list(KINDS))
async def test_no_token_is_unauthenticated_and_never_served(
    served: tuple[str, Counter[str]], rpc: Any, name: str
) -> None:
    """A call of any kind without credentials is UNAUTHENTICATED and runs no servicer code."""
    address, entered = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await invoke(address, name)
    failure = rpc.describe(caught.value)
    assert failure.code == grpc.StatusCode.UNAUTHENTICATED, failure.message
    assert failure.reason == "UNAUTHENTICATED"
    assert entered[name] == 0


@pytest.mark.parametrize("name", list(KINDS))
async def test_method_missing_from_rules_is_denied_even_to_admins(
    served: tuple[str, Counter[str]],
    secret_and_key: tuple[str, OperatorKey],
    rpc: Any,
    name: str,
) -> None:
    """A valid admin key cannot call a method absent from RULES: PERMISSION_DENIED, never run."""
    address, entered = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await invoke(address, name, bearer(secret_and_key[0]))
    failure = rpc.describe(caught.value)
    assert failure.code == grpc.StatusCode.PERMISSION_DENIED, failure.message
    assert failure.reason == "PERMISSION_DENIED"
    assert entered[name] == 0


@pytest.mark.parametrize("name", STREAMING)
async def test_garbage_in_a_request_stream_is_invalid_argument(
    served: tuple[str, Counter[str]],
    secret_and_key: tuple[str, OperatorKey],
    rpc: Any,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
) -> None:
    """Undecodable bytes streamed by an authorized caller are INVALID_ARGUMENT, not INTERNAL."""
    monkeypatch.setitem(auth.RULES, f"/{SERVICE}/{name}", Rule(frozenset({Role.ADMIN})))
    address, entered = served
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await invoke(
            address, name, bearer(secret_and_key[0]), [b"\xff\xff"], serialize=lambda raw: raw
        )
    failure = rpc.describe(caught.value)
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, failure.message
    assert failure.reason == "INVALID_ARGUMENT"
    assert entered[name] == 1  # the rule let the call through; the codec refused the message
