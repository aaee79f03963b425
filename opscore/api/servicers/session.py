"""SessionService: what happened in each session, live."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from opspawn.opscore.v1 import session_pb2, session_pb2_grpc

from opscore.api.convert import session as convert
from opscore.domain.sessions.history import SessionHistory
from opscore.domain.workflows.engine import WorkflowEngine
from opscore.protocol.validation import require_id

Context = grpc.aio.ServicerContext[Any, Any]


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, sessions: SessionHistory, engine: WorkflowEngine) -> None:
        self._sessions = sessions
        self._engine = engine

    async def GetSession(
        self, request: session_pb2.GetSessionRequest, context: Context
    ) -> session_pb2.Session:
        session_id = require_id("session_id", request.session_id)
        session = await self._sessions.get(session_id)
        return convert.session_to_proto(session, self._engine.waiting(session))

    async def ListSessions(
        self, request: session_pb2.ListSessionsRequest, context: Context
    ) -> session_pb2.ListSessionsResponse:
        flt = convert.session_filter(request)
        page = await self._sessions.list(flt, request.page_size, request.page_token)
        return session_pb2.ListSessionsResponse(
            sessions=[convert.session_to_proto(s, self._engine.waiting(s)) for s in page.items],
            next_page_token=page.next_page_token,
        )

    async def CancelSession(
        self, request: session_pb2.CancelSessionRequest, context: Context
    ) -> session_pb2.Session:
        session = await self._engine.cancel(*convert.cancel_request(request))
        return convert.session_to_proto(session, self._engine.waiting(session))

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
        async for event in self._sessions.watch(*convert.watch_request(request)):
            yield convert.session_event_to_proto(event)
