"""The Ops-Core Python SDK: `OpsCoreClient` (async), `SyncOpsCoreClient`, and the
`Agent` worker. Results are the dataclasses of `opscore.sdk.types`; failures are
the OpsCoreError family of `opscore.errors` plus `UnavailableError` and
`DeadlineExceededError`."""

from opscore.models import AgentEventType, AgentState
from opscore.runs import SessionEventType, SessionStatus, TaskStatus
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
