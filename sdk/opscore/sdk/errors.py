"""gRPC failures turned back into the OpsCoreError family the server raised.

The server maps each error class to a status code and an ErrorInfo reason
(`opscore.protocol.status.STATUS_TABLE`); `from_rpc_error` inverts that table, so SDK
users catch the same classes the server code raises instead of inspecting codes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from opscore.protocol import errors
from opscore.protocol.status import ERROR_DOMAIN, STATUS_TABLE

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class UnavailableError(errors.OpsCoreError):
    """The server could not be reached (down, restarting, network); safe to retry
    idempotent calls later."""


class DeadlineExceededError(errors.OpsCoreError):
    """The call did not finish within its timeout; it may or may not have taken effect."""


class NonRetryableError(Exception):
    """Raise from an Agent handler to fail the task at once, without further attempts."""


_BY_REASON: dict[str, type[errors.OpsCoreError]] = {
    reason: cls for cls, (_, reason) in STATUS_TABLE.items()
}

# Statuses without (Ops-Core) details: raised by gRPC itself or by a proxy.
_BY_CODE: dict[grpc.StatusCode, type[errors.OpsCoreError]] = {
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.InvalidStateError,
}


def _rich_status(err: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    metadata = cast(Iterable[tuple[str, str | bytes]], err.trailing_metadata() or ())
    for key, value in metadata:
        if key == _STATUS_DETAILS_KEY:
            raw = value if isinstance(value, bytes) else value.encode()
            return status_pb2.Status.FromString(raw)
    return None


def from_rpc_error(err: grpc.aio.AioRpcError) -> errors.OpsCoreError:
    """The OpsCoreError the server raised (class from the ErrorInfo reason, metadata,
    BadRequest field violations), or an error chosen by status code when the failure
    carries no Ops-Core details."""
    message = err.details() or err.code().name
    cls: type[errors.OpsCoreError] = _BY_CODE.get(err.code(), errors.OpsCoreError)
    metadata: dict[str, str] = {}
    violations: list[errors.FieldViolation] = []
    status = _rich_status(err)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN and info.reason in _BY_REASON:
                cls = _BY_REASON[info.reason]
                metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(
                errors.FieldViolation(v.field, v.description) for v in bad.field_violations
            )
    # Bypass the subclasses' constructors: they build the message from arguments,
    # while here the server's message and metadata are already final.
    exc = cls.__new__(cls)
    errors.OpsCoreError.__init__(exc, message, **metadata)
    if isinstance(exc, errors.InvalidArgumentError):
        exc.violations = violations
    return exc
