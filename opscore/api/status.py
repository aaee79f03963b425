"""The one mapping from the OpsCoreError family to gRPC status codes with
google.rpc.Status details, applied to every RPC by `ErrorMappingInterceptor`."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from opscore import errors

log = logging.getLogger(__name__)

ERROR_DOMAIN = "opscore.opspawn.dev"

# Most specific class first wins (looked up along the exception's MRO).
STATUS_TABLE: dict[type[errors.OpsCoreError], tuple[grpc.StatusCode, str]] = {
    errors.InvalidArgumentError: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    errors.AgentNotFoundError: (grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND"),
    errors.SessionNotFoundError: (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND"),
    errors.WorkflowDefinitionNotFoundError: (
        grpc.StatusCode.NOT_FOUND,
        "WORKFLOW_DEFINITION_NOT_FOUND",
    ),
    errors.NotFoundError: (grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    errors.StaleStateReportError: (grpc.StatusCode.FAILED_PRECONDITION, "STALE_STATE_REPORT"),
    errors.InvalidStateError: (grpc.StatusCode.FAILED_PRECONDITION, "INVALID_STATE"),
    errors.RegistrationError: (grpc.StatusCode.ALREADY_EXISTS, "REGISTRATION_CONFLICT"),
    errors.WorkflowDefinitionError: (grpc.StatusCode.ALREADY_EXISTS, "WORKFLOW_DEFINITION_EXISTS"),
    errors.TaskDispatchError: (grpc.StatusCode.FAILED_PRECONDITION, "TASK_TOKEN_INVALID"),
    errors.RevisionCompactedError: (grpc.StatusCode.OUT_OF_RANGE, "REVISION_COMPACTED"),
    errors.WatcherTooSlowError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW"),
    errors.ShuttingDownError: (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
    errors.UnauthenticatedError: (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    errors.PermissionDeniedError: (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    errors.RateLimitedError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
    errors.ResourceLimitError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_REACHED"),
    errors.StorageError: (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE"),
    errors.ConfigurationError: (grpc.StatusCode.INTERNAL, "CONFIGURATION_ERROR"),
    errors.OpsCoreError: (grpc.StatusCode.INTERNAL, "INTERNAL"),
}


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_for(exc: errors.OpsCoreError) -> grpc.Status:
    """The rich status (code, message, ErrorInfo, BadRequest) for a domain error."""
    code, reason = next(STATUS_TABLE[c] for c in type(exc).__mro__ if c in STATUS_TABLE)
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=exc.metadata)
        )
    ]
    if isinstance(exc, errors.InvalidArgumentError):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in exc.violations
            ]
        )
        details.append(_pack(bad_request))
    if isinstance(exc, errors.RateLimitedError):
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromTimedelta(timedelta(seconds=exc.retry_after))
        details.append(_pack(retry))
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=exc.message, details=details
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    """Ends the call with the status of `exc`; anything not an OpsCoreError is a bug:
    logged, and reported as INTERNAL without its details."""
    if isinstance(exc, errors.OpsCoreError):
        status = status_for(exc)
    else:
        log.exception("unexpected error", extra={"method": method}, exc_info=exc)
        status = status_for(errors.OpsCoreError("internal error"))
    await context.abort(status.code, status.details, status.trailing_metadata)
