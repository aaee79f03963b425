"""The one table from the OpsCoreError family to gRPC status codes and ErrorInfo
reasons: the server's error interceptor applies it, the SDK inverts it."""

from __future__ import annotations

import grpc

from opscore.protocol import errors

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
    errors.AttemptEndedError: (grpc.StatusCode.FAILED_PRECONDITION, "ATTEMPT_ENDED"),
    errors.TaskDispatchError: (grpc.StatusCode.FAILED_PRECONDITION, "TASK_TOKEN_INVALID"),
    errors.RevisionCompactedError: (grpc.StatusCode.OUT_OF_RANGE, "REVISION_COMPACTED"),
    errors.RevisionAheadError: (grpc.StatusCode.OUT_OF_RANGE, "REVISION_AHEAD"),
    errors.SequenceAheadError: (grpc.StatusCode.OUT_OF_RANGE, "SEQUENCE_AHEAD"),
    errors.WatcherTooSlowError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCHER_TOO_SLOW"),
    errors.ShuttingDownError: (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
    errors.UnauthenticatedError: (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    errors.PermissionDeniedError: (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    errors.RateLimitedError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
    errors.ResourceLimitError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_REACHED"),
    errors.StorageError: (grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE"),
    errors.DataLossError: (grpc.StatusCode.DATA_LOSS, "DATA_LOSS"),
    errors.ConfigurationError: (grpc.StatusCode.INTERNAL, "CONFIGURATION_ERROR"),
    errors.OpsCoreError: (grpc.StatusCode.INTERNAL, "INTERNAL"),
}


def code_and_reason(exc: errors.OpsCoreError) -> tuple[grpc.StatusCode, str]:
    return next(STATUS_TABLE[c] for c in type(exc).__mro__ if c in STATUS_TABLE)
