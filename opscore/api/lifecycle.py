"""LifecycleService servicer: translate, call the domain, translate back."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
from opspawn.opscore.v1 import lifecycle_pb2 as pb
from opspawn.opscore.v1 import lifecycle_pb2_grpc

from opscore.api import lifecycle_convert as convert
from opscore.api.fields import optional_time, require_id, set_time, struct_to_dict
from opscore.config import Limits
from opscore.lifecycle import Lifecycle
from opscore.models import AgentEvent, AgentEventType

Context = grpc.aio.ServicerContext[Any, Any]


_EVENTS_TAG = b"\x0a"  # WatchAgentStatesResponse.events: field 1, length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _framed(event: AgentEvent) -> bytes:
    message = pb.AgentEvent()
    convert.event_to_proto(event, message)
    body = message.SerializeToString()
    return _EVENTS_TAG + _varint(len(body)) + body


class EventCache:
    """Serializes each committed event once, framed as one `events` entry of a
    WatchAgentStatesResponse, so a response to any watcher is the concatenation of
    cached bytes: fan-out costs no per-watcher protobuf work."""

    def __init__(self, size: int = 8192) -> None:
        self._size = size
        self._items: OrderedDict[int, bytes] = OrderedDict()

    def framed(self, event: AgentEvent) -> bytes:
        if event.type in (AgentEventType.SNAPSHOT, AgentEventType.SYNCED):
            return _framed(event)  # per watcher, not a committed event
        cached = self._items.get(event.revision)
        if cached is None:
            cached = self._items[event.revision] = _framed(event)
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return cached


class LifecycleServicer(lifecycle_pb2_grpc.LifecycleServiceServicer):
    def __init__(self, lifecycle: Lifecycle, limits: Limits) -> None:
        self._lifecycle = lifecycle
        self._limits = limits
        self._events = EventCache()

    async def RegisterAgent(self, request: pb.RegisterAgentRequest, context: Context) -> pb.Agent:
        registration = convert.registration_from_proto(request, self._limits)
        agent, token = await self._lifecycle.register(registration)
        response = convert.agent_to_proto(agent)
        response.agent_token = token or ""
        return response

    async def RotateAgentToken(
        self, request: pb.RotateAgentTokenRequest, context: Context
    ) -> pb.Agent:
        agent_id = require_id("agent_id", request.agent_id)
        agent, token = await self._lifecycle.rotate_token(agent_id)
        response = convert.agent_to_proto(agent)
        response.agent_token = token
        return response

    async def DeregisterAgent(
        self, request: pb.DeregisterAgentRequest, context: Context
    ) -> pb.Agent:
        agent_id = require_id("agent_id", request.agent_id)
        return convert.agent_to_proto(await self._lifecycle.deregister(agent_id))

    async def GetAgent(self, request: pb.GetAgentRequest, context: Context) -> pb.Agent:
        agent_id = require_id("agent_id", request.agent_id)
        return convert.agent_to_proto(await self._lifecycle.get(agent_id))

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        flt = convert.list_filter(request)
        page = await self._lifecycle.list_agents(flt, request.page_size, request.page_token)
        return pb.ListAgentsResponse(
            agents=[convert.agent_to_proto(a) for a in page.items],
            next_page_token=page.next_page_token,
            revision=page.revision,
        )

    async def UpdateAgentState(
        self, request: pb.UpdateAgentStateRequest, context: Context
    ) -> pb.Agent:
        state = convert.reported_state(request, self._limits)
        agent = await self._lifecycle.update_state(
            request.agent_id,
            state,
            struct_to_dict(request.details),
            optional_time(request, "observed_at"),
        )
        return convert.agent_to_proto(agent)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context
    ) -> pb.HeartbeatResponse:
        agent_id = require_id("agent_id", request.agent_id)
        agent = await self._lifecycle.heartbeat(agent_id)
        response = pb.HeartbeatResponse(
            state=agent.state.value,  # type: ignore[arg-type]
            liveness_timeout_seconds=max(1, int(self._lifecycle.liveness_timeout)),
        )
        set_time(response.server_time, agent.last_heartbeat_at)
        response.liveness_timeout.FromTimedelta(timedelta(seconds=self._lifecycle.liveness_timeout))
        return response

    async def WatchAgentStates(  # type: ignore[override]
        self, request: pb.WatchAgentStatesRequest, context: Context
    ) -> AsyncIterator[bytes]:
        """Yields serialized WatchAgentStatesResponse messages (the interceptor passes
        bytes through), built from the shared EventCache."""
        flt = convert.watch_filter(request)
        since = request.since_revision if request.HasField("since_revision") else None
        async for batch in self._lifecycle.watch(flt, since, request.send_initial_state):
            yield b"".join([self._events.framed(e) for e in batch])
