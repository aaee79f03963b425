"""The one mapping from the OpsCoreError family to gRPC status codes with
google.rpc.Status details, applied to every RPC by `ErrorMappingInterceptor`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

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
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=exc.message, details=details
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    if isinstance(exc, errors.OpsCoreError):
        status = status_for(exc)
    else:
        log.exception("unexpected error", extra={"method": method}, exc_info=exc)
        status = status_for(errors.OpsCoreError("internal error"))
    await context.abort(status.code, status.details, status.trailing_metadata)


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns an OpsCoreError raised by any servicer into its rich status, so no
    servicer carries try/except ladders. Wrapped handlers are cached per method."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Handler | None] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]  # type: ignore[return-value]
        handler = await continuation(handler_call_details)
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = wrapped
        return wrapped  # type: ignore[return-value]

    @staticmethod
    def _wrap(handler: Handler | None, method: str) -> Handler | None:
        if handler is None:
            return None
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_behavior(request: Any, context: Any) -> Any:
                try:
                    return await unary(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_behavior, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = cast(Callable[[Any, Any], AsyncIterator[Any]], handler.unary_stream)

            async def stream_behavior(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for item in stream(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await _abort(context, exc, method)

            return grpc.unary_stream_rpc_method_handler(
                stream_behavior, handler.request_deserializer, handler.response_serializer
            )
        return handler
