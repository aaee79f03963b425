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
from opscore.lifecycle import Lifecycle
from opscore.models import AgentEvent, AgentEventType

Context = grpc.aio.ServicerContext[Any, Any]


class EventCache:
    """Converts each committed event to protobuf once and shares it among every
    watcher (fan-out to many watchers would otherwise convert it once per watcher)."""

    def __init__(self, size: int = 8192) -> None:
        self._size = size
        self._items: OrderedDict[int, pb.AgentEvent] = OrderedDict()

    def get(self, event: AgentEvent) -> pb.AgentEvent:
        if event.type in (AgentEventType.SNAPSHOT, AgentEventType.SYNCED):
            message = pb.AgentEvent()  # per-watcher, not a committed event
            convert.event_to_proto(event, message)
            return message
        cached = self._items.get(event.revision)
        if cached is None:
            cached = self._items[event.revision] = pb.AgentEvent()
            convert.event_to_proto(event, cached)
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return cached


class LifecycleServicer(lifecycle_pb2_grpc.LifecycleServiceServicer):
    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._events = EventCache()

    async def RegisterAgent(self, request: pb.RegisterAgentRequest, context: Context) -> pb.Agent:
        registration = convert.registration_from_proto(request)
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
        state = convert.reported_state(request)
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

    async def WatchAgentStates(
        self, request: pb.WatchAgentStatesRequest, context: Context
    ) -> AsyncIterator[pb.WatchAgentStatesResponse]:
        flt = convert.watch_filter(request)
        since = request.since_revision if request.HasField("since_revision") else None
        async for batch in self._lifecycle.watch(flt, since, request.send_initial_state):
            yield pb.WatchAgentStatesResponse(events=[self._events.get(e) for e in batch])
