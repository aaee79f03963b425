"""The outermost interceptor: any error of a call becomes its status, with
google.rpc.Status details (ErrorInfo, BadRequest, RetryInfo) built from the one
table in `opscore.protocol.status`. No servicer catches anything."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from opscore.api.interceptors.base import Handler, MethodInterceptor, behaviour_of, rebuild
from opscore.protocol import errors
from opscore.protocol.status import ERROR_DOMAIN, code_and_reason

log = logging.getLogger(__name__)


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_for(exc: errors.OpsCoreError) -> grpc.Status:
    """The rich status (code, message, ErrorInfo, BadRequest) for a domain error."""
    code, reason = code_and_reason(exc)
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


class ErrorInterceptor(MethodInterceptor):
    def wrap(self, handler: Handler, method: str) -> Handler:
        inner = behaviour_of(handler)
        if handler.response_streaming:

            async def streamed(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for item in inner(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await abort(context, exc, method)

            return rebuild(handler, streamed)

        async def answered(request: Any, context: Any) -> Any:
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, exc, method)

        return rebuild(handler, answered)
