"""The domain enums mirror the protobuf enums number for number, so conversion is a
plain int cast; this keeps them from drifting apart when the contract grows."""

from __future__ import annotations

import enum

import pytest
from google.protobuf.descriptor import EnumDescriptor
from opspawn.opscore.v1 import lifecycle_pb2, session_pb2

from opscore.protocol.enums import (
    AgentEventType,
    AgentState,
    SessionEventType,
    SessionStatus,
    TaskStatus,
    TimeoutType,
    WaitingReason,
)

MIRRORS = [
    (AgentState, lifecycle_pb2.AgentState.DESCRIPTOR, "AGENT_STATE_"),
    (AgentEventType, lifecycle_pb2.AgentEventType.DESCRIPTOR, "AGENT_EVENT_TYPE_"),
    (SessionStatus, session_pb2.SessionStatus.DESCRIPTOR, "SESSION_STATUS_"),
    (TaskStatus, session_pb2.TaskStatus.DESCRIPTOR, "TASK_STATUS_"),
    (SessionEventType, session_pb2.SessionEventType.DESCRIPTOR, "SESSION_EVENT_TYPE_"),
    (TimeoutType, session_pb2.TimeoutType.DESCRIPTOR, "TIMEOUT_TYPE_"),
    (WaitingReason, session_pb2.WaitingReason.DESCRIPTOR, "WAITING_REASON_"),
]


@pytest.mark.parametrize(
    ("domain", "proto", "prefix"), MIRRORS, ids=lambda m: getattr(m, "__name__", "")
)
def test_domain_enum_mirrors_proto(
    domain: type[enum.IntEnum], proto: EnumDescriptor, prefix: str
) -> None:
    """Same names (without the proto prefix) with the same numbers, in both directions."""
    from_proto = {v.name.removeprefix(prefix): v.number for v in proto.values}
    assert {m.name: m.value for m in domain} == from_proto
