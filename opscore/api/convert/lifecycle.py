"""LifecycleService: protobuf <-> domain, validating every request field."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from opspawn.opscore.v1 import lifecycle_pb2 as pb

from opscore.api.convert.fields import (
    RequestViolations,
    dict_to_struct,
    optional_time,
    set_time,
    struct_to_dict,
)
from opscore.domain.agents.model import (
    Agent,
    AgentEvent,
    AgentFilter,
    AgentRegistration,
    Presence,
)
from opscore.protocol.enums import REPORTABLE_STATES, AgentState
from opscore.protocol.limits import (
    MAX_CAPABILITY_LENGTH,
    MAX_ENDPOINT_LENGTH,
    MAX_METADATA_KEY_LENGTH,
    MAX_METADATA_VALUE_LENGTH,
    MAX_NAME_LENGTH,
    MAX_VERSION_LENGTH,
    MAX_WATCH_AGENT_IDS,
    RequestLimits,
)
from opscore.protocol.values import JsonObject


def registration_from_proto(
    req: pb.RegisterAgentRequest, limits: RequestLimits
) -> AgentRegistration:
    v = RequestViolations()
    v.identifier("agent_id", req.agent_id, required=False)
    v.text("name", req.name, max_len=MAX_NAME_LENGTH, required=True)
    v.text("version", req.version, max_len=MAX_VERSION_LENGTH)
    v.text("contact_endpoint", req.contact_endpoint, max_len=MAX_ENDPOINT_LENGTH)
    if len(req.capabilities) > limits.max_capabilities:
        v.add("capabilities", f"at most {limits.max_capabilities} capabilities")
    seen: set[str] = set()
    for i, cap in enumerate(req.capabilities):
        v.text(f"capabilities[{i}]", cap, max_len=MAX_CAPABILITY_LENGTH, required=True)
        if cap in seen:
            v.add(f"capabilities[{i}]", f"duplicate capability {cap!r}")
        seen.add(cap)
    if len(req.metadata) > limits.max_metadata_entries:
        v.add("metadata", f"at most {limits.max_metadata_entries} entries")
    total = 0
    for key, value in sorted(req.metadata.items()):
        path = f"metadata[{key[:64]}]"
        v.text(path, key, max_len=MAX_METADATA_KEY_LENGTH, required=True)
        v.text(path, value, max_len=MAX_METADATA_VALUE_LENGTH)
        total += len(key) + len(value)
    if total > limits.max_metadata_bytes:
        v.add("metadata", f"must be at most {limits.max_metadata_bytes} bytes in all")
    v.raise_if_any()
    return AgentRegistration(
        agent_id=req.agent_id,
        name=req.name,
        version=req.version,
        capabilities=tuple(req.capabilities),
        contact_endpoint=req.contact_endpoint,
        metadata=dict(req.metadata),
    )


def state_report(
    req: pb.UpdateAgentStateRequest, limits: RequestLimits
) -> tuple[str, AgentState, JsonObject, datetime | None]:
    """(agent_id, state, details, observed_at) of a state report."""
    v = RequestViolations()
    v.identifier("agent_id", req.agent_id)
    v.enum("state", req.state, REPORTABLE_STATES)
    v.struct("details", req.details, limits.max_details_bytes, limits.max_struct_depth)
    v.raise_if_any()
    return (
        req.agent_id,
        AgentState(req.state),
        struct_to_dict(req.details),
        optional_time(req, "observed_at"),
    )


def list_filter(req: pb.ListAgentsRequest) -> AgentFilter:
    v = RequestViolations()
    for i, state in enumerate(req.states):
        v.enum(f"states[{i}]", state, set(AgentState) - {AgentState.UNSPECIFIED})
    v.text("capability", req.capability, max_len=MAX_CAPABILITY_LENGTH)
    v.raise_if_any()
    return AgentFilter(
        states=frozenset(AgentState(s) for s in req.states), capability=req.capability
    )


def watch_request(req: pb.WatchAgentStatesRequest) -> tuple[AgentFilter, int | None, bool]:
    """(filter, since_revision or None, send_initial_state) of a watch."""
    v = RequestViolations()
    if len(req.agent_ids) > MAX_WATCH_AGENT_IDS:
        v.add("agent_ids", f"at most {MAX_WATCH_AGENT_IDS} ids")
    for i, agent_id in enumerate(req.agent_ids):
        v.identifier(f"agent_ids[{i}]", agent_id)
    v.text("capability", req.capability, max_len=MAX_CAPABILITY_LENGTH)
    if req.HasField("since_revision"):
        if req.since_revision < 0:
            v.add("since_revision", "must not be negative")
        if req.send_initial_state:
            v.add("since_revision", "cannot be combined with send_initial_state")
    v.raise_if_any()
    since = req.since_revision if req.HasField("since_revision") else None
    flt = AgentFilter(agent_ids=frozenset(req.agent_ids), capability=req.capability)
    return flt, since, req.send_initial_state


def agent_to_proto(agent: Agent, presence: Presence, out: pb.Agent | None = None) -> pb.Agent:
    """The stored agent plus what this server sees of it now (`presence`)."""
    msg = pb.Agent() if out is None else out
    msg.agent_id = agent.agent_id
    msg.name = agent.name
    msg.version = agent.version
    msg.capabilities.extend(agent.capabilities)
    msg.contact_endpoint = agent.contact_endpoint
    msg.metadata.update(agent.metadata)
    msg.state = agent.state.value  # type: ignore[assignment]
    dict_to_struct(agent.state_details, msg.state_details)
    set_time(msg.registered_at, agent.registered_at)
    set_time(msg.state_updated_at, agent.state_updated_at)
    set_time(msg.last_heartbeat_at, agent.last_heartbeat_at)
    set_time(msg.state_observed_at, agent.state_observed_at)
    msg.revision = agent.revision
    msg.connected = presence.connected
    msg.free_slots = presence.free_slots
    set_time(msg.last_contact_at, presence.contact(agent))
    return msg


def event_to_proto(
    event: AgentEvent, out: pb.AgentEvent, presence: Callable[[str], Presence]
) -> None:
    out.revision = event.revision
    out.type = event.type.value  # type: ignore[assignment]
    if event.agent is not None:
        agent_to_proto(event.agent, presence(event.agent.agent_id), out.agent)
    set_time(out.occurred_at, event.occurred_at)


def heartbeat_to_proto(agent: Agent, liveness_timeout: float) -> pb.HeartbeatResponse:
    response = pb.HeartbeatResponse(
        state=agent.state.value,  # type: ignore[arg-type]
        liveness_timeout_seconds=max(1, int(liveness_timeout)),
    )
    set_time(response.server_time, agent.last_heartbeat_at)
    response.liveness_timeout.FromTimedelta(timedelta(seconds=liveness_timeout))
    return response
