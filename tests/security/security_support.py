"""Helpers for the security tests (tests/security is on sys.path while they run).

* `METHODS`: every RPC of the three Ops-Core services, read from the proto
  descriptors (path, request and response classes, streaming or not), so tests that
  loop over them cover new RPCs automatically.
* `Keys`: one fresh operator key per role, as `api_keys` text or a keys-file YAML.
* `outcome`: calls any method generically and reports how it ended.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml
from google.protobuf import message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from opspawn.opscore.v1 import lifecycle_pb2, session_pb2, workflow_pb2

from opscore.domain.access import OperatorKey, Role, new_operator_key

STATUS_DETAILS_KEY = "grpc-status-details-bin"
STREAM_OPEN = "STREAM_OPEN"  # a stream that was admitted and is still waiting for events
SERVICES = [
    lifecycle_pb2.DESCRIPTOR.services_by_name["LifecycleService"],
    workflow_pb2.DESCRIPTOR.services_by_name["WorkflowService"],
    session_pb2.DESCRIPTOR.services_by_name["SessionService"],
]
DENIALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True)
class Method:
    path: str
    request: type[Message]
    response: type[Message]
    streaming: bool

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.name


def _methods() -> list[Method]:
    out = []
    for service in SERVICES:
        for m in service.methods:
            assert not m.client_streaming, f"{m.full_name}: client streaming is not covered"
            out.append(
                Method(
                    path=f"/{service.full_name}/{m.name}",
                    request=message_factory.GetMessageClass(m.input_type),
                    response=message_factory.GetMessageClass(m.output_type),
                    streaming=m.server_streaming,
                )
            )
    return out


METHODS: list[Method] = _methods()
BY_PATH: dict[str, Method] = {m.path: m for m in METHODS}
UNARY = [m for m in METHODS if not m.streaming]
STREAMING = [m for m in METHODS if m.streaming]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# --------------------------------------------------------------------------- keys


@dataclass
class Keys:
    """A fresh operator key for each role (the secrets and their configured entries)."""

    secrets: dict[Role, str]
    entries: list[OperatorKey]

    @classmethod
    def fresh(cls, prefix: str = "") -> Keys:
        secrets: dict[Role, str] = {}
        entries: list[OperatorKey] = []
        for role in (Role.ADMIN, Role.OPERATOR, Role.VIEWER):
            secret, entry = new_operator_key(f"{prefix}{role.value}-key", role)
            secrets[role] = secret
            entries.append(entry)
        return cls(secrets, entries)

    @property
    def api_keys(self) -> str:
        """The `name:role:sha256,...` form of OPSCORE_API_KEYS."""
        return ",".join(f"{k.name}:{k.role.value}:{k.sha256}" for k in self.entries)

    def __getitem__(self, role: Role) -> str:
        return self.secrets[role]


def write_keys_file(path: Path, entries: list[OperatorKey]) -> Path:
    doc = {"keys": [{"name": k.name, "role": k.role.value, "sha256": k.sha256} for k in entries]}
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- calls


def rich_status(err: grpc.aio.AioRpcError | grpc.RpcError) -> status_pb2.Status | None:
    for key, value in err.trailing_metadata() or ():  # type: ignore[union-attr]
        if key == STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(
                value if isinstance(value, bytes) else value.encode()
            )
    return None


def error_reason(err: grpc.aio.AioRpcError) -> str | None:
    status = rich_status(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return None


def retry_info(err: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    status = rich_status(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info
    return None


@dataclass
class Outcome:
    """How a call ended: OK, STREAM_OPEN (admitted, still streaming) or an error."""

    code: grpc.StatusCode | str
    error: grpc.aio.AioRpcError | None = None

    @property
    def denied(self) -> bool:
        return self.code in DENIALS

    def __str__(self) -> str:
        name = self.code if isinstance(self.code, str) else self.code.name
        return f"{name}: {self.error.details() if self.error else ''}"


async def outcome(
    channel: grpc.aio.Channel,
    method: Method,
    request: Message | None = None,
    metadata: tuple[tuple[str, str], ...] | None = None,
    stream_wait: float = 0.3,
) -> Outcome:
    """Calls `method`; a stream is read for one message (at most `stream_wait` s)."""
    request = request if request is not None else method.request()
    serialize, parse = method.request.SerializeToString, method.response.FromString
    try:
        if not method.streaming:
            await channel.unary_unary(
                method.path, request_serializer=serialize, response_deserializer=parse
            )(request, metadata=metadata, timeout=10)
            return Outcome(grpc.StatusCode.OK)
        call = channel.unary_stream(
            method.path, request_serializer=serialize, response_deserializer=parse
        )(request, metadata=metadata, timeout=10)
        try:
            first = await asyncio.wait_for(call.read(), stream_wait)
        except TimeoutError:
            return Outcome(STREAM_OPEN)
        finally:
            call.cancel()
        return Outcome(STREAM_OPEN if first is not grpc.aio.EOF else grpc.StatusCode.OK)
    except grpc.aio.AioRpcError as err:
        return Outcome(err.code(), err)
