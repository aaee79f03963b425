"""LifecycleService: translate, call the domain, translate back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from opspawn.opscore.v1 import lifecycle_pb2 as pb
from opspawn.opscore.v1 import lifecycle_pb2_grpc

from opscore.api.convert import lifecycle as convert
from opscore.api.convert.framing import EventCache
from opscore.api.interceptors.auth import current_principal
from opscore.domain.access import Role
from opscore.domain.agents.liveness import Liveness
from opscore.domain.agents.model import Agent, Presence
from opscore.domain.agents.registry import AgentRegistry
from opscore.domain.agents.watch import AgentWatch
from opscore.protocol.limits import RequestLimits
from opscore.protocol.validation import require_id

Context = grpc.aio.ServicerContext[Any, Any]


class LifecycleServicer(lifecycle_pb2_grpc.LifecycleServiceServicer):
    def __init__(
        self,
        registry: AgentRegistry,
        liveness: Liveness,
        watch: AgentWatch,
        events: EventCache,
        limits: RequestLimits,
        presence: Callable[[str], Presence],
    ) -> None:
        """`presence`: what the open task streams show of an agent now."""
        self._registry = registry
        self._liveness = liveness
        self._watch = watch
        self._limits = limits
        self._presence = presence
        self._events = events  # shared with the watch, which weighs events by it

    def _agent(self, agent: Agent) -> pb.Agent:
        return convert.agent_to_proto(agent, self._presence(agent.agent_id))

    async def RegisterAgent(self, request: pb.RegisterAgentRequest, context: Context) -> pb.Agent:
        registration = convert.registration_from_proto(request, self._limits)
        by_agent = current_principal.get().role is Role.AGENT
        agent, token = await self._registry.register(registration, by_agent=by_agent)
        response = self._agent(agent)
        response.agent_token = token or ""
        return response

    async def RotateAgentToken(
        self, request: pb.RotateAgentTokenRequest, context: Context
    ) -> pb.Agent:
        agent, token = await self._registry.rotate_token(require_id("agent_id", request.agent_id))
        response = self._agent(agent)
        response.agent_token = token
        return response

    async def DeregisterAgent(
        self, request: pb.DeregisterAgentRequest, context: Context
    ) -> pb.Agent:
        agent_id = require_id("agent_id", request.agent_id)
        return self._agent(await self._registry.deregister(agent_id))

    async def GetAgent(self, request: pb.GetAgentRequest, context: Context) -> pb.Agent:
        agent_id = require_id("agent_id", request.agent_id)
        return self._agent(await self._registry.get(agent_id))

    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        flt = convert.list_filter(request)
        page = await self._registry.list_agents(flt, request.page_size, request.page_token)
        return pb.ListAgentsResponse(
            agents=[self._agent(a) for a in page.items],
            next_page_token=page.next_page_token,
            revision=page.revision,
        )

    async def UpdateAgentState(
        self, request: pb.UpdateAgentStateRequest, context: Context
    ) -> pb.Agent:
        agent = await self._registry.update_state(*convert.state_report(request, self._limits))
        return self._agent(agent)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context
    ) -> pb.HeartbeatResponse:
        agent = await self._registry.heartbeat(require_id("agent_id", request.agent_id))
        return convert.heartbeat_to_proto(agent, self._liveness.config.timeout)

    async def WatchAgentStates(  # type: ignore[override]
        self, request: pb.WatchAgentStatesRequest, context: Context
    ) -> AsyncIterator[bytes]:
        """Yields serialized WatchAgentStatesResponse messages built from the shared
        EventCache, each within the response byte budget."""
        async for batch in self._watch.watch(*convert.watch_request(request)):
            for response in self._events.responses(batch):
                yield response
