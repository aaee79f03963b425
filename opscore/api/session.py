"""SessionService servicer: what happened in each run, live."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from opspawn.opscore.v1 import session_pb2, session_pb2_grpc

from opscore.api import workflow_convert as convert
from opscore.api.fields import Violations, require_id
from opscore.runs import RunFilter, SessionStatus
from opscore.sessions import SessionTracker
from opscore.workflow import WorkflowEngine

Context = grpc.aio.ServicerContext[Any, Any]


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, sessions: SessionTracker, engine: WorkflowEngine) -> None:
        self._sessions = sessions
        self._engine = engine

    async def GetSession(
        self, request: session_pb2.GetSessionRequest, context: Context
    ) -> session_pb2.Session:
        session_id = require_id("session_id", request.session_id)
        return convert.session_to_proto(await self._sessions.get(session_id))

    async def ListSessions(
        self, request: session_pb2.ListSessionsRequest, context: Context
    ) -> session_pb2.ListSessionsResponse:
        v = Violations()
        for i, status in enumerate(request.statuses):
            v.enum(f"statuses[{i}]", status, set(SessionStatus) - {SessionStatus.UNSPECIFIED})
        v.identifier("workflow_definition_id", request.workflow_definition_id, required=False)
        v.identifier("agent_id", request.agent_id, required=False)
        v.raise_if_any()
        flt = RunFilter(
            statuses=frozenset(SessionStatus(s) for s in request.statuses),
            workflow_definition_id=request.workflow_definition_id,
            agent_id=request.agent_id,
        )
        page = await self._sessions.list(flt, request.page_size, request.page_token)
        return session_pb2.ListSessionsResponse(
            sessions=[convert.session_to_proto(r) for r in page.items],
            next_page_token=page.next_page_token,
        )

    async def CancelSession(
        self, request: session_pb2.CancelSessionRequest, context: Context
    ) -> session_pb2.Session:
        v = Violations()
        v.identifier("session_id", request.session_id)
        v.text("reason", request.reason, max_len=1024)
        v.raise_if_any()
        run = await self._engine.cancel(request.session_id, request.reason or "cancelled")
        return convert.session_to_proto(run)

    async def ListSessionEvents(
        self, request: session_pb2.ListSessionEventsRequest, context: Context
    ) -> session_pb2.ListSessionEventsResponse:
        session_id = require_id("session_id", request.session_id)
        page = await self._sessions.events(session_id, request.page_size, request.page_token)
        return session_pb2.ListSessionEventsResponse(
            events=[convert.session_event_to_proto(e) for e in page.items],
            next_page_token=page.next_page_token,
        )

    async def WatchSession(
        self, request: session_pb2.WatchSessionRequest, context: Context
    ) -> AsyncIterator[session_pb2.SessionEvent]:
        v = Violations()
        v.identifier("session_id", request.session_id)
        if request.since_sequence < 0:
            v.add("since_sequence", "must not be negative")
        v.raise_if_any()
        async for event in self._sessions.watch(request.session_id, request.since_sequence):
            yield convert.session_event_to_proto(event)
