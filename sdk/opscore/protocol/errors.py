"""The OpsCoreError family: every failure the domain reports to a caller.

Domain code raises these and never grpc errors; `opscore.protocol.status` holds the
one table that maps each class to a gRPC status code and a stable ErrorInfo reason
(the server applies it, the SDK inverts it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request, named by its path (`capabilities[2]`)."""

    field: str
    description: str


class OpsCoreError(Exception):
    """Base of every error Ops-Core reports to a caller."""

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class InvalidArgumentError(OpsCoreError):
    """The request itself is malformed; lists every bad field."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid request: {summary}")
        self.violations = violations

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgumentError:
        return cls([FieldViolation(field, description)])


class NotFoundError(OpsCoreError):
    """Base for unknown resources."""


class AgentNotFoundError(NotFoundError):
    def __init__(self, agent_id: str) -> None:
        super().__init__(f"agent {agent_id!r} not found", agent_id=agent_id)


class SessionNotFoundError(NotFoundError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} not found", session_id=session_id)


class WorkflowDefinitionNotFoundError(NotFoundError):
    def __init__(self, definition_id: str, version: str = "") -> None:
        what = f"{definition_id!r} version {version!r}" if version else repr(definition_id)
        super().__init__(
            f"workflow definition {what} not found", workflow_definition_id=definition_id
        )


class InvalidStateError(OpsCoreError):
    """The resource exists but is not in a state that allows the call."""


class StaleStateReportError(InvalidStateError):
    """A state report observed before the newest accepted one."""


class RegistrationError(OpsCoreError):
    """Registration conflicts with an existing resource."""


class WorkflowDefinitionError(OpsCoreError):
    """A workflow definition is not acceptable as a whole (e.g. id + version taken)."""


class TaskDispatchError(OpsCoreError):
    """A task token or attempt is not (or no longer) valid."""


class AttemptEndedError(TaskDispatchError):
    """An answer for an attempt that was superseded, ended otherwise, or ran out of
    time; the session's history records the refusal."""


class RevisionCompactedError(OpsCoreError):
    """A watch asked for history older than the retained events."""

    def __init__(self, requested: int, compacted: int) -> None:
        super().__init__(
            f"revision {requested} is compacted (history starts after {compacted}); re-list and "
            "watch from the listed revision",
            requested_revision=str(requested),
            compacted_revision=str(compacted),
        )


class RevisionAheadError(OpsCoreError):
    """A watch asked to resume after a revision the store has not reached (the client
    watched another server, or the database was restored from an older copy): no
    event would ever come, so the watch must start again from a listed revision."""

    def __init__(self, requested: int, current: int) -> None:
        super().__init__(
            f"revision {requested} is ahead of the store (current revision {current}); "
            "re-list and watch from the listed revision",
            requested_revision=str(requested),
            current_revision=str(current),
        )


class SequenceAheadError(OpsCoreError):
    """A session watch asked to resume after a sequence the session has not reached."""

    def __init__(self, session_id: str, requested: int, last: int) -> None:
        super().__init__(
            f"session {session_id!r} has no event after sequence {last}, so since_sequence "
            f"{requested} is ahead of it; watch from {last} or lower",
            session_id=session_id,
            requested_sequence=str(requested),
            last_sequence=str(last),
        )


class WatcherTooSlowError(OpsCoreError):
    """A watcher fell behind by more than its buffer and was dropped."""


class ShuttingDownError(OpsCoreError):
    """The server is stopping; retry on another replica or after restart."""


class UnauthenticatedError(OpsCoreError):
    """No credentials, or credentials this server does not know."""


class PermissionDeniedError(OpsCoreError):
    """Known caller, but not allowed to do this (wrong role, or another agent's work)."""


class ResourceLimitError(OpsCoreError):
    """A configured limit (open streams, watchers) is reached."""


class RateLimitedError(ResourceLimitError):
    """The caller sent more requests than its rate allows; retry after a pause."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageError(OpsCoreError):
    """The store failed; nothing was committed."""


class DataLossError(OpsCoreError):
    """The store's data is corrupt (SQLite: a malformed page). Not a StorageError:
    retrying cannot help, an operator must restore the database from a backup."""


class ConfigurationError(OpsCoreError):
    """Settings are unusable; the server refuses to start."""
