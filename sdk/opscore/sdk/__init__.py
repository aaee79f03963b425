"""The Ops-Core Python SDK: `OpsCoreClient` (async), `SyncOpsCoreClient`, and the
`Agent` worker. Results are the dataclasses of `opscore.sdk.types`; failures are
the OpsCoreError family of `opscore.protocol.errors` plus `UnavailableError` and
`DeadlineExceededError`."""

from opscore.protocol.enums import (
    AgentEventType,
    AgentState,
    SessionEventType,
    SessionStatus,
    TaskStatus,
)
from opscore.sdk.agent import Agent, TaskContext
from opscore.sdk.client import OpsCoreClient
from opscore.sdk.errors import DeadlineExceededError, NonRetryableError, UnavailableError
from opscore.sdk.sync import SyncOpsCoreClient

__all__ = [
    "Agent",
    "AgentEventType",
    "AgentState",
    "DeadlineExceededError",
    "NonRetryableError",
    "OpsCoreClient",
    "SessionEventType",
    "SessionStatus",
    "SyncOpsCoreClient",
    "TaskContext",
    "TaskStatus",
    "UnavailableError",
]
