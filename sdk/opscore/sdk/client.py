"""OpsCoreClient: every RPC of the three services as a Python coroutine.

Plain values in, frozen dataclasses out (`opscore.sdk.types`), OpsCoreError
subclasses raised (`opscore.sdk.errors`). Every call has a deadline. Calls the
server treats as idempotent are retried with exponential backoff and jitter when
the server is UNAVAILABLE; the others are not, since a retry could act twice.
Watches resume on their own after a disconnect or server restart.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from types import EllipsisType, TracebackType
from typing import Any, Self, TypeVar

import grpc
from opspawn.opscore.v1 import (
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)

from opscore.protocol.enums import AgentEventType, AgentState, SessionStatus
from opscore.protocol.errors import InvalidArgumentError, ResourceLimitError, WatcherTooSlowError
from opscore.sdk import convert, types
from opscore.sdk.errors import from_rpc_error

Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")

BACKOFF_BASE = 0.1
BACKOFF_MAX = 2.0

# Short reconnect backoff in the channel itself: its default (1s growing to 120s)
# would keep failing calls long after a restarted server is back. Keepalive pings
# every 30 s, also on an idle task stream (the default stops after two pings without
# data), notice a vanished server; the server accepts pings every 10 s or slower.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", int(BACKOFF_MAX * 1000)),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]

# Failures a call with a retry deadline (`retry_until`) outlasts: the server is down
# or restarting, or did not answer in time (the answers it is used for are idempotent).
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def _resumable(err: grpc.aio.AioRpcError) -> bool:
    """Whether a watch reconnects and resumes after `err`: a lost connection or a
    restart, being dropped as too slow, or a watcher limit. gRPC's own
    RESOURCE_EXHAUSTED (a message over the size limit) would recur, so it is raised."""
    if err.code() is grpc.StatusCode.UNAVAILABLE:
        return True
    return isinstance(from_rpc_error(err), (WatcherTooSlowError, ResourceLimitError))


def backoff_delay(attempt: int) -> float:
    """Exponential (0.1s doubling, at most 2s) with jitter, so clients that lost the
    same server do not all come back in the same instant."""
    return min(BACKOFF_MAX, BACKOFF_BASE * 2.0**attempt) * random.uniform(0.5, 1.0)


async def _paged(fetch: Callable[[str], Awaitable[tuple[Sequence[T], str]]]) -> AsyncIterator[T]:
    token = ""
    while True:
        items, token = await fetch(token)
        for item in items:
            yield item
        if not token:
            return


class _Bearer:
    """Adds `authorization: Bearer <token>` to a call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add(*self._header)
        return details._replace(metadata=metadata)


# grpc.aio files each interceptor under its first matching kind only, hence one class
# per kind.
class _BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def open_channel(
    address: str,
    token: str | None = None,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
) -> grpc.aio.Channel:
    """A channel with the caller's credentials: a bearer token (operator key or agent
    token) and, when any TLS file is given, TLS (mutual with a client cert and key)."""
    interceptors: Any = [_BearerUnary(token), _BearerStream(token)] if token else None
    if tls_ca is None and tls_cert is None and tls_key is None:
        return grpc.aio.insecure_channel(
            address, options=CHANNEL_OPTIONS, interceptors=interceptors
        )
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
        private_key=Path(tls_key).read_bytes() if tls_key else None,
        certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
    )
    return grpc.aio.secure_channel(
        address, credentials, options=CHANNEL_OPTIONS, interceptors=interceptors
    )


class OpsCoreClient:
    """An async client for one Ops-Core server; use `async with` or call `close()`.

    `token` is an operator key or an agent token (when the server has authentication
    on); `tls_ca` (plus `tls_cert`/`tls_key` for mutual TLS) switches to TLS."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: float = 10.0,
        retries: int = 3,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self._channel = open_channel(address, token, tls_ca, tls_cert, tls_key)
        self._lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(self._channel)
        self._workflow = workflow_pb2_grpc.WorkflowServiceStub(self._channel)
        self._sessions = session_pb2_grpc.SessionServiceStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel; open watches and task streams end."""
        await self._channel.close(grace=None)

    async def _call(
        self,
        rpc: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        idempotent: bool,
        until: float | None = None,
        limit: float | EllipsisType | None = ...,
    ) -> Resp:
        """Calls `rpc` within `limit` seconds (default: the client's timeout; None: no
        deadline); an
        idempotent call is retried while UNAVAILABLE, `retries` times, or with `until`
        (a time.monotonic() instant) while UNAVAILABLE or DEADLINE_EXCEEDED for as long
        as a retry would start before that instant."""
        timeout = self.timeout if isinstance(limit, EllipsisType) else limit
        attempt = 0
        while True:
            try:
                return await rpc(request, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                delay = backoff_delay(attempt)
                if until is None:
                    retry = attempt < self.retries and err.code() == grpc.StatusCode.UNAVAILABLE
                else:
                    retry = err.code() in _TRANSIENT and time.monotonic() + delay < until
                if not (idempotent and retry):
                    raise from_rpc_error(err) from err
            await asyncio.sleep(delay)
            attempt += 1

    # ----------------------------------------------------------------- LifecycleService

    async def register_agent(
        self,
        name: str,
        capabilities: Iterable[str] = (),
        agent_id: str = "",
        version: str = "",
        contact_endpoint: str = "",
        metadata: dict[str, str] | None = None,
    ) -> types.Agent:
        """Creates or re-registers an agent. Retried only with an agent_id: without one,
        each attempt would create another agent."""
        request = lifecycle_pb2.RegisterAgentRequest(
            agent_id=agent_id,
            name=name,
            version=version,
            capabilities=list(capabilities),
            contact_endpoint=contact_endpoint,
            metadata=metadata or {},
        )
        msg = await self._call(self._lifecycle.RegisterAgent, request, idempotent=bool(agent_id))
        return convert.agent(msg)

    async def rotate_agent_token(self, agent_id: str) -> types.Agent:
        """Issues a new token for the agent (in `agent_token`); the old one stops working."""
        request = lifecycle_pb2.RotateAgentTokenRequest(agent_id=agent_id)
        return convert.agent(
            await self._call(self._lifecycle.RotateAgentToken, request, idempotent=False)
        )

    async def deregister_agent(self, agent_id: str) -> types.Agent:
        """Removes the agent; returns its last snapshot."""
        request = lifecycle_pb2.DeregisterAgentRequest(agent_id=agent_id)
        return convert.agent(
            await self._call(self._lifecycle.DeregisterAgent, request, idempotent=False)
        )

    async def get_agent(self, agent_id: str) -> types.Agent:
        request = lifecycle_pb2.GetAgentRequest(agent_id=agent_id)
        return convert.agent(await self._call(self._lifecycle.GetAgent, request, idempotent=True))

    def list_agents(
        self,
        states: Iterable[AgentState | int | str] = (),
        capability: str = "",
        page_size: int = 100,
    ) -> AsyncIterator[types.Agent]:
        """Every matching agent, ordered by agent_id, fetched page by page."""
        state_values = [convert.to_state(s).value for s in states]

        async def fetch(token: str) -> tuple[list[types.Agent], str]:
            request = lifecycle_pb2.ListAgentsRequest(
                page_size=page_size,
                page_token=token,
                states=state_values,  # type: ignore[arg-type]
                capability=capability,
            )
            page = await self._call(self._lifecycle.ListAgents, request, idempotent=True)
            return [convert.agent(a) for a in page.agents], page.next_page_token

        return _paged(fetch)

    async def update_agent_state(
        self,
        agent_id: str,
        state: AgentState | int | str,
        details: dict[str, Any] | None = None,
        observed_at: datetime | None = None,
    ) -> types.Agent:
        """Reports the agent's state. Retried only with observed_at: the server then
        recognizes a repeated report, while without it a late retry could overwrite a
        newer report."""
        request = lifecycle_pb2.UpdateAgentStateRequest(
            agent_id=agent_id,
            state=convert.to_state(state).value,  # type: ignore[arg-type]
            details=convert.to_struct(details),
        )
        if observed_at is not None:
            request.observed_at.CopyFrom(convert.to_timestamp(observed_at))
        msg = await self._call(
            self._lifecycle.UpdateAgentState, request, idempotent=observed_at is not None
        )
        return convert.agent(msg)

    async def heartbeat(self, agent_id: str) -> types.AgentHeartbeat:
        """Keeps the agent live; an OFFLINE agent comes back IDLE."""
        request = lifecycle_pb2.HeartbeatRequest(agent_id=agent_id)
        msg = await self._call(self._lifecycle.Heartbeat, request, idempotent=True)
        return convert.agent_heartbeat(msg)

    async def watch_agents(
        self,
        agent_ids: Iterable[str] = (),
        capability: str = "",
        since_revision: int | None = None,
        send_initial_state: bool = False,
    ) -> AsyncIterator[types.AgentEvent]:
        """Agent events, one at a time, for as long as the caller iterates.

        After a disconnect (server restart, watcher dropped as too slow) the watch
        reconnects with backoff and resumes after the last event it yielded, so no
        event is lost or repeated; it retries for as long as the caller keeps
        iterating. With send_initial_state it resumes after the SYNCED event (a
        disconnect during the snapshot starts the snapshot again). A live-only watch
        that has seen no event yet resumes live-only. RevisionCompactedError is raised
        when the resume point has been compacted away, RevisionAheadError when the
        server has not reached it (another server, or a database restored from an
        older copy): list the agents and watch anew.
        """
        ids = list(agent_ids)
        resume = since_revision
        initial = send_initial_state
        failures = 0
        while True:
            request = lifecycle_pb2.WatchAgentStatesRequest(
                agent_ids=ids, capability=capability, send_initial_state=initial
            )
            if resume is not None:
                request.since_revision = resume
            call = self._lifecycle.WatchAgentStates(request)
            try:
                async for response in call:
                    failures = 0
                    for msg in response.events:
                        event = convert.agent_event(msg)
                        if event.type is not AgentEventType.SNAPSHOT:
                            resume, initial = event.revision, False
                        yield event
            except grpc.aio.AioRpcError as err:
                if not _resumable(err):
                    raise from_rpc_error(err) from err
            finally:
                call.cancel()
            await asyncio.sleep(backoff_delay(failures))
            failures += 1

    # ----------------------------------------------------------------- WorkflowService

    async def create_workflow(
        self, definition: convert.DefinitionSource
    ) -> types.WorkflowDefinition:
        """Stores a definition given as a dict (the JSON/YAML file shape), a .json or
        .yaml path, or a WorkflowDefinition proto. WorkflowDefinitionError
        (ALREADY_EXISTS) when its id + version is taken."""
        request = workflow_pb2.CreateWorkflowDefinitionRequest(
            definition=convert.to_definition(definition)
        )
        msg = await self._call(self._workflow.CreateWorkflowDefinition, request, idempotent=False)
        return convert.workflow_definition(msg)

    async def get_workflow_definition(
        self, definition_id: str, version: str = ""
    ) -> types.WorkflowDefinition:
        """One definition; the newest version when version is empty."""
        request = workflow_pb2.GetWorkflowDefinitionRequest(id=definition_id, version=version)
        msg = await self._call(self._workflow.GetWorkflowDefinition, request, idempotent=True)
        return convert.workflow_definition(msg)

    def list_workflow_definitions(
        self, page_size: int = 100
    ) -> AsyncIterator[types.WorkflowDefinition]:
        """Every definition, ordered by id and version, fetched page by page."""

        async def fetch(token: str) -> tuple[list[types.WorkflowDefinition], str]:
            request = workflow_pb2.ListWorkflowDefinitionsRequest(
                page_size=page_size, page_token=token
            )
            page = await self._call(
                self._workflow.ListWorkflowDefinitions, request, idempotent=True
            )
            return [convert.workflow_definition(d) for d in page.definitions], page.next_page_token

        return _paged(fetch)

    async def delete_workflow_definition(self, definition_id: str, version: str) -> None:
        request = workflow_pb2.DeleteWorkflowDefinitionRequest(id=definition_id, version=version)
        await self._call(self._workflow.DeleteWorkflowDefinition, request, idempotent=False)

    async def start_workflow(
        self,
        workflow_id: str | None = None,
        *,
        definition: convert.DefinitionSource | None = None,
        version: str = "",
        input: dict[str, Any] | None = None,
        agent_id: str = "",
        request_id: str | None = None,
        wait: bool = False,
        max_wait: float | None = None,
    ) -> types.Session:
        """Starts a session of a stored workflow (`workflow_id`, newest version unless
        `version`) or of an inline `definition`. A request_id is generated when none is
        given, so the retries of this call return the same session. With `wait` the
        call returns once the session has ended, waiting at most `max_wait` seconds
        (default: as long as it runs; see execute_workflow)."""
        if (workflow_id is None) == (definition is None):
            raise InvalidArgumentError.single("workflow_id", "give workflow_id or definition")
        request = workflow_pb2.StartWorkflowRequest(
            workflow_definition_version=version,
            input=convert.to_struct(input),
            agent_id=agent_id,
            request_id=request_id or str(uuid.uuid4()),
            wait=wait,
        )
        if definition is not None:
            request.definition.CopyFrom(convert.to_definition(definition))
        else:
            request.workflow_definition_id = workflow_id or ""
        limit = max_wait if wait else ...
        msg = await self._call(self._workflow.StartWorkflow, request, idempotent=True, limit=limit)
        return convert.session(msg)

    async def execute_workflow(
        self,
        workflow_id: str | None = None,
        *,
        definition: convert.DefinitionSource | None = None,
        version: str = "",
        input: dict[str, Any] | None = None,
        agent_id: str = "",
        request_id: str | None = None,
        max_wait: float | None = None,
    ) -> types.Session:
        """Starts a session and returns it once it has ended, in one call: check its
        `status` (COMPLETED, FAILED or CANCELLED), then `output` or `error`. Waits as
        long as the session runs unless `max_wait` (seconds) is given; when that passes,
        DeadlineExceededError and the session goes on (call again with the same
        request_id to wait again). A retry after a lost connection reuses the
        request_id, so it never starts a second session."""
        return await self.start_workflow(
            workflow_id,
            definition=definition,
            version=version,
            input=input,
            agent_id=agent_id,
            request_id=request_id,
            wait=True,
            max_wait=max_wait,
        )

    async def stream_tasks(
        self, agent_id: str, max_in_flight: int = 1, held_task_tokens: Iterable[str] = ()
    ) -> AsyncIterator[types.TaskAssignment]:
        """The agent's dispatch channel: tasks pushed as they become ready. Not
        resumed: the caller reconnects itself (the `Agent` worker does), naming in
        `held_task_tokens` the attempts it still works on; the new stream takes them
        over (they count against max_in_flight) and their answers are accepted within
        their leases. Attempts the agent held but does not name are re-queued."""
        request = workflow_pb2.StreamTasksRequest(
            agent_id=agent_id,
            max_in_flight=max_in_flight,
            held_task_tokens=list(held_task_tokens),
        )
        call = self._workflow.StreamTasks(request)
        try:
            async for msg in call:
                yield convert.task_assignment(msg)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()

    # The three answers of a task attempt. With `retry_until` (a time.monotonic()
    # instant, e.g. the lease end) an answer outlasts a server restart: it is retried
    # until then while the server is unreachable; the Agent worker passes its lease.

    async def complete_task(
        self,
        task_token: str,
        output: dict[str, Any] | None = None,
        *,
        retry_until: float | None = None,
    ) -> None:
        """Reports a successful attempt. AttemptEndedError when the attempt was
        superseded or ended otherwise (timed out, cancelled); repeating an accepted
        completion is a no-op."""
        request = workflow_pb2.CompleteTaskRequest(
            task_token=task_token, output=convert.to_struct(output)
        )
        await self._call(self._workflow.CompleteTask, request, idempotent=True, until=retry_until)

    async def fail_task(
        self,
        task_token: str,
        error_message: str,
        retryable: bool = True,
        *,
        retry_until: float | None = None,
    ) -> None:
        """Reports a failed attempt; retryable=False fails the task without retries."""
        request = workflow_pb2.FailTaskRequest(
            task_token=task_token, error_message=error_message, retryable=retryable
        )
        await self._call(self._workflow.FailTask, request, idempotent=True, until=retry_until)

    async def heartbeat_task(
        self, task_token: str, *, retry_until: float | None = None
    ) -> types.TaskHeartbeat:
        """Extends the attempt's lease; stop the work when `cancel_requested`."""
        request = workflow_pb2.HeartbeatTaskRequest(task_token=task_token)
        msg = await self._call(
            self._workflow.HeartbeatTask, request, idempotent=True, until=retry_until
        )
        return convert.task_heartbeat(msg)

    # ----------------------------------------------------------------- SessionService

    async def get_session(self, session_id: str) -> types.Session:
        request = session_pb2.GetSessionRequest(session_id=session_id)
        return convert.session(
            await self._call(self._sessions.GetSession, request, idempotent=True)
        )

    def list_sessions(
        self,
        statuses: Iterable[SessionStatus | int | str] = (),
        workflow_definition_id: str = "",
        agent_id: str = "",
        page_size: int = 100,
    ) -> AsyncIterator[types.Session]:
        """Every matching session, newest first, fetched page by page."""
        status_values = [convert.to_session_status(s).value for s in statuses]

        async def fetch(token: str) -> tuple[list[types.Session], str]:
            request = session_pb2.ListSessionsRequest(
                page_size=page_size,
                page_token=token,
                statuses=status_values,  # type: ignore[arg-type]
                workflow_definition_id=workflow_definition_id,
                agent_id=agent_id,
            )
            page = await self._call(self._sessions.ListSessions, request, idempotent=True)
            return [convert.session(s) for s in page.sessions], page.next_page_token

        return _paged(fetch)

    async def cancel_session(self, session_id: str, reason: str = "") -> types.Session:
        """Cancels a session; InvalidStateError if it already ended."""
        request = session_pb2.CancelSessionRequest(session_id=session_id, reason=reason)
        return convert.session(
            await self._call(self._sessions.CancelSession, request, idempotent=False)
        )

    def list_session_events(
        self, session_id: str, page_size: int = 100
    ) -> AsyncIterator[types.SessionEvent]:
        """The session's whole history in sequence order, fetched page by page."""

        async def fetch(token: str) -> tuple[list[types.SessionEvent], str]:
            request = session_pb2.ListSessionEventsRequest(
                session_id=session_id, page_size=page_size, page_token=token
            )
            page = await self._call(self._sessions.ListSessionEvents, request, idempotent=True)
            return [convert.session_event(e) for e in page.events], page.next_page_token

        return _paged(fetch)

    async def watch_session(
        self, session_id: str, since_sequence: int = 0
    ) -> AsyncIterator[types.SessionEvent]:
        """The session's history after since_sequence, then live events; ends after the
        terminal event. Resumes after the last yielded event when disconnected, so
        nothing is lost or repeated across a server restart. SequenceAheadError when
        since_sequence is beyond the session's last event."""
        resume = since_sequence
        failures = 0
        while True:
            request = session_pb2.WatchSessionRequest(session_id=session_id, since_sequence=resume)
            call = self._sessions.WatchSession(request)
            try:
                async for msg in call:
                    failures = 0
                    event = convert.session_event(msg)
                    resume = event.sequence
                    yield event
                    if event.terminal:
                        return
            except grpc.aio.AioRpcError as err:
                if not _resumable(err):
                    raise from_rpc_error(err) from err
            finally:
                call.cancel()
            await asyncio.sleep(backoff_delay(failures))
            failures += 1

    async def wait_session(self, session_id: str) -> types.Session:
        """Waits until the session ends (surviving restarts) and returns it."""
        async for _ in self.watch_session(session_id):
            pass
        return await self.get_session(session_id)
