"""Agent: a worker that runs task handlers for Ops-Core.

    agent = Agent("127.0.0.1:50051", agent_id="summarizer-1")

    @agent.handler("summarize")
    async def summarize(ctx: TaskContext) -> dict[str, Any]:
        return {"summary": ctx.input["doc"][:100]}

    agent.run_sync()  # until SIGTERM/SIGINT, then drains

The worker registers, reports IDLE, heartbeats, takes tasks from its StreamTasks
stream, keeps each task's lease alive, reports results, and reconnects (registering
again) whenever the server goes away. Handlers keep running across a lost
connection or a server restart: the attempts stay leased to this agent, its next
stream adopts them, and heartbeats and answers are retried until the server takes
them or the lease has surely ended. On stop it reports DRAINING so the server sends
nothing new, lets in-flight tasks finish, and only then closes its stream.

Each attempt ends at its start_to_close limit, measured from receipt on the local
monotonic clock (so never before the server's): async handlers get CancelledError,
sync ones (run in a bounded thread pool) see `ctx.cancelled`, and the worker
reports the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, overload

from opscore.protocol.enums import AgentState
from opscore.protocol.errors import (
    InvalidArgumentError,
    NotFoundError,
    OpsCoreError,
    ShuttingDownError,
    StorageError,
    TaskDispatchError,
)
from opscore.protocol.limits import MAX_ERROR_MESSAGE_LENGTH
from opscore.protocol.values import JsonObject
from opscore.sdk import types
from opscore.sdk.client import OpsCoreClient, backoff_delay
from opscore.sdk.errors import DeadlineExceededError, NonRetryableError, UnavailableError
from opscore.sdk.results import InputError, M, ResultError, parse_input, to_output

log = logging.getLogger(__name__)

# Errors after which the worker reconnects (and registers again).
_RECONNECT = (
    UnavailableError,
    DeadlineExceededError,
    ShuttingDownError,
    StorageError,
    NotFoundError,
)
_UNREACHABLE = (UnavailableError, DeadlineExceededError)
DEFAULT_LEASE = 60.0
MIN_LEASE_HEARTBEAT = 0.05
# How long past a lease's end (as this process reckons the server's clock) answers
# are still retried: room for the error of that reckoning.
LEASE_MARGIN = 2.0

# Why an attempt was cancelled (ctx.cancel_reason).
SESSION_CANCELLED = "the session was cancelled"
ATTEMPT_ENDED = "the attempt ended on the server (superseded, timed out or cancelled)"
LEASE_LOST = "the lease ran out while the server was unreachable"

HandlerFn = Callable[["TaskContext"], Any]
H = TypeVar("H", bound=HandlerFn)
R = TypeVar("R")


class TaskContext:
    """What a handler gets: one task attempt's payload, and its cancellation."""

    def __init__(
        self,
        assignment: types.TaskAssignment,
        client: OpsCoreClient,
        local_time: Callable[[datetime], float],
    ) -> None:
        self.assignment = assignment
        self.deadline = assignment.deadline
        self._client = client
        self._local_time = local_time
        self._lease_end = local_time(assignment.deadline)
        self._cancelled = threading.Event()
        self._cancel_reason = ""

    @property
    def task_id(self) -> str:
        return self.assignment.task_id

    @property
    def session_id(self) -> str:
        return self.assignment.session_id

    @property
    def attempt(self) -> int:
        return self.assignment.attempt

    @property
    def payload(self) -> JsonObject:
        return self.assignment.payload

    @property
    def parameters(self) -> JsonObject:
        return self.assignment.parameters

    @property
    def input(self) -> JsonObject:
        return self.assignment.input

    @property
    def upstream(self) -> JsonObject:
        return self.assignment.upstream

    @property
    def cancelled(self) -> bool:
        """True once the attempt should stop: the session was cancelled, the attempt
        ended on the server, or its start_to_close limit came. A result would be
        refused. Async handlers are also cancelled; sync ones must poll this."""
        return self._cancelled.is_set()

    @property
    def cancel_requested(self) -> bool:
        """The same as `cancelled` (its earlier name)."""
        return self.cancelled

    @property
    def cancel_reason(self) -> str:
        """Why the attempt was cancelled ("" while it is not)."""
        return self._cancel_reason

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """For sync handlers: blocks until the attempt is cancelled or `timeout`
        seconds pass; returns `cancelled`. A cancellable replacement for sleep()."""
        return self._cancelled.wait(timeout)

    def _cancel(self, reason: str) -> None:
        if not self._cancelled.is_set():
            self._cancel_reason = reason
            self._cancelled.set()

    @property
    def _answer_until(self) -> float:
        """The monotonic instant after which the server surely refuses an answer."""
        return max(self._lease_end, time.monotonic()) + LEASE_MARGIN

    async def heartbeat(self) -> bool:
        """Extends the lease now (the worker also does so every third of the lease),
        retrying while the server is unreachable, until the lease has surely ended;
        returns `cancelled` (a refused heartbeat means the attempt ended)."""
        try:
            beat = await self._client.heartbeat_task(
                self.assignment.task_token, retry_until=self._answer_until
            )
        except TaskDispatchError:
            self._cancel(ATTEMPT_ENDED)
            return True
        if beat.deadline is not None:
            self.deadline = beat.deadline
            self._lease_end = self._local_time(beat.deadline)
        if beat.cancel_requested:
            self._cancel(SESSION_CANCELLED)
        return self.cancelled


@dataclass(frozen=True)
class _Handler:
    fn: Callable[..., Any]
    # A declared input model: the data is validated and passed as a second argument.
    input: type[Any] | None


class Agent:
    """A worker process for one agent_id; see the module docstring.

    `max_threads` bounds the threads that run sync handlers (default: max_in_flight).
    A thread cannot be stopped: a sync handler that ignores `ctx.cancelled` keeps its
    thread until it returns, and later sync tasks wait for a free one."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        agent_id: str = "",
        name: str = "",
        capabilities: Iterable[str] | None = None,
        max_in_flight: int = 1,
        max_threads: int | None = None,
        heartbeat_interval: float | None = None,
        deregister_on_stop: bool = False,
        version: str = "",
        metadata: dict[str, str] | None = None,
        timeout: float = 10.0,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        self.address = address
        # This agent's token (issued when an operator registered it) and TLS files.
        self._credentials: dict[str, Any] = {
            "token": token,
            "tls_ca": tls_ca,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
        }
        self.agent_id = agent_id or f"agent-{uuid.uuid4().hex[:12]}"
        self.name = name or self.agent_id
        self.max_in_flight = max_in_flight
        self.max_threads = max_threads or max_in_flight
        self.heartbeat_interval = heartbeat_interval
        self.deregister_on_stop = deregister_on_stop
        self.version = version
        self.metadata = dict(metadata or {})
        self.timeout = timeout
        self._capabilities = list(capabilities) if capabilities is not None else None
        self._handlers: dict[str, _Handler] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._clock_offset = timedelta(0)
        self._failures = 0
        self._stop_requested = False
        self._stop_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def capabilities(self) -> list[str]:
        """As given, or else the capabilities of the registered handlers."""
        return list(self._handlers) if self._capabilities is None else self._capabilities

    @overload
    def handler(self, capability: str) -> Callable[[H], H]: ...

    @overload
    def handler(
        self, capability: str, *, input: type[M]
    ) -> Callable[[Callable[[TaskContext, M], R]], Callable[[TaskContext, M], R]]: ...

    def handler(self, capability: str, *, input: type[Any] | None = None) -> Callable[[Any], Any]:
        """Registers the decorated function for tasks of `capability`. Async functions
        run on the event loop; plain ones in the worker's thread pool, so they may
        block. With `input` (a pydantic v2 model, or any class with `model_validate`)
        the task's parameters merged over the session input (parameters win) are
        validated and passed as the second argument; a mismatch fails the task at
        once, naming the fields."""

        def register(fn: Any) -> Any:
            self._handlers[capability] = _Handler(fn, input)
            return fn

        return register

    def stop(self) -> None:
        """Asks a running worker to drain and stop; safe from any thread or signal."""
        self._stop_requested = True
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)

    def run_sync(self) -> None:
        """Runs until SIGTERM or SIGINT (or stop()), then drains."""
        asyncio.run(self.run_forever())

    async def run_forever(self) -> None:
        """`run()` with SIGTERM and SIGINT wired to stop()."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.run()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def run(self) -> None:
        """Works until stop(): connects, reconnects with backoff when the server goes
        away (in-flight handlers carry on), and on stop lets in-flight tasks finish,
        then deregisters (deregister_on_stop) or reports IDLE."""
        if not self.capabilities:
            raise ValueError("the agent has no capabilities: register a handler first")
        self._loop = asyncio.get_running_loop()
        stop = self._stop_event = asyncio.Event()
        if self._stop_requested:
            stop.set()
        self._pool = ThreadPoolExecutor(self.max_threads, thread_name_prefix=self.agent_id)
        try:
            async with OpsCoreClient(
                self.address, timeout=self.timeout, **self._credentials
            ) as client:
                while not stop.is_set():
                    try:
                        await self._serve(client, stop)
                    except _RECONNECT as exc:
                        log.warning(
                            "connection to ops-core lost; reconnecting",
                            extra={
                                "agent_id": self.agent_id,
                                "error": str(exc),
                                "in_flight": len(self._running),
                            },
                        )
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), backoff_delay(self._failures))
                        self._failures += 1
                await self._finish_in_flight()
                await self._leave(client)
        finally:
            # Only left over when run() itself was cancelled or failed.
            for task in self._running.values():
                task.cancel()
            await asyncio.gather(*self._running.values(), return_exceptions=True)
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- one connection ------------------------------------------------------------

    async def _serve(self, client: OpsCoreClient, stop: asyncio.Event) -> None:
        """Registers and works until stop (then drains) or until the connection fails."""
        await client.register_agent(
            self.name,
            self.capabilities,
            agent_id=self.agent_id,
            version=self.version,
            metadata=self.metadata,
        )
        self._failures = 0
        await client.update_agent_state(self.agent_id, AgentState.IDLE)
        interval = await self._heartbeat(client)
        workers = [
            asyncio.create_task(self._heartbeat_loop(client, interval)),
            asyncio.create_task(self._receive(client)),
        ]
        stopped = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*workers, stopped], return_when=asyncio.FIRST_COMPLETED)
            if stopped in done:
                await self._drain(client)
                return
            for task in done:
                task.result()
            raise UnavailableError("task stream ended")
        finally:
            for task in (*workers, stopped):
                task.cancel()
            await asyncio.gather(*workers, stopped, return_exceptions=True)

    async def _heartbeat(self, client: OpsCoreClient) -> float:
        """Heartbeats; learns the server's clock (leases are in its time) and the
        heartbeat interval (half the liveness timeout unless configured)."""
        beat = await client.heartbeat(self.agent_id)
        self._clock_offset = beat.server_time - datetime.now(UTC)
        return self.heartbeat_interval or beat.liveness_timeout / 2

    async def _heartbeat_loop(self, client: OpsCoreClient, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._heartbeat(client)

    async def _receive(self, client: OpsCoreClient) -> None:
        held = list(self._running)  # attempts still running from before a reconnect
        async for assignment in client.stream_tasks(self.agent_id, self.max_in_flight, held):
            received = time.monotonic()
            token = assignment.task_token
            if token in self._running:
                log.info("attempt already running here", extra={"task_id": assignment.task_id})
                continue
            task = asyncio.create_task(self._execute(client, assignment, received))
            self._running[token] = task
            task.add_done_callback(functools.partial(self._forget, token))

    def _forget(self, token: str, _: asyncio.Task[None]) -> None:
        self._running.pop(token, None)

    async def _drain(self, client: OpsCoreClient) -> None:
        """DRAINING first, so no new task is sent, then let in-flight tasks finish while
        the stream (which holds them) stays open."""
        log.info("draining", extra={"agent_id": self.agent_id, "in_flight": len(self._running)})
        try:
            await client.update_agent_state(self.agent_id, AgentState.DRAINING)
        except OpsCoreError as exc:
            log.warning("could not report DRAINING", extra={"error": str(exc)})
        await self._finish_in_flight()

    async def _finish_in_flight(self) -> None:
        while self._running:
            await asyncio.wait(list(self._running.values()))

    async def _leave(self, client: OpsCoreClient) -> None:
        try:
            if self.deregister_on_stop:
                await client.deregister_agent(self.agent_id)
            else:
                await client.update_agent_state(self.agent_id, AgentState.IDLE)
        except OpsCoreError as exc:
            log.warning("could not sign off", extra={"agent_id": self.agent_id, "error": str(exc)})

    def _local_time(self, moment: datetime) -> float:
        """A server-clock instant as a time.monotonic() instant."""
        server_now = datetime.now(UTC) + self._clock_offset
        return time.monotonic() + (moment - server_now).total_seconds()

    # -- one task ------------------------------------------------------------------

    async def _execute(
        self, client: OpsCoreClient, assignment: types.TaskAssignment, received: float
    ) -> None:
        """Runs one attempt to its answer: the handler's result or failure, or the
        start_to_close timeout; nothing when the attempt was taken away."""
        ctx = TaskContext(assignment, client, self._local_time)
        handler = self._handlers.get(assignment.agent_capability)
        if handler is None:
            message = f"agent {self.agent_id} has no handler for {assignment.agent_capability!r}"
            await self._answer(ctx, "fail", client.fail_task, message, True)
            return
        run = asyncio.create_task(self._invoke(handler, ctx))
        keeper = asyncio.create_task(self._keep_lease(ctx, run))
        limit = assignment.start_to_close
        remaining = None if limit is None else received + limit - time.monotonic()
        try:
            done, _ = await asyncio.wait({run}, timeout=remaining)
        except asyncio.CancelledError:
            run.cancel()
            raise
        finally:
            keeper.cancel()
        if not done:
            assert limit is not None
            message = f"start_to_close timeout of {limit:g}s reached; handler cancelled"
            ctx._cancel(message)
            run.cancel()
            log.warning("task timed out", extra={"task_id": ctx.task_id, "limit": limit})
            await self._answer(ctx, "timeout", client.fail_task, message, True)
            await asyncio.wait({run})  # an async handler unwinds; a thread cannot be stopped
            return
        await self._conclude(client, ctx, run)

    async def _conclude(
        self, client: OpsCoreClient, ctx: TaskContext, run: asyncio.Task[Any]
    ) -> None:
        """Reports how the handler ended (unless the attempt was taken away)."""
        where = {"task_id": ctx.task_id, "session_id": ctx.session_id, "attempt": ctx.attempt}
        exc = None if run.cancelled() else run.exception()
        if ctx.cancelled:
            log.info("task cancelled", extra={**where, "reason": ctx.cancel_reason})
        elif run.cancelled():
            await self._answer(ctx, "fail", client.fail_task, "handler was cancelled", True)
        elif isinstance(exc, NonRetryableError | InputError):
            log.warning("task failed, not retryable", extra={**where, "error": str(exc)})
            await self._answer(ctx, "fail", client.fail_task, _describe(exc), False)
        elif exc is not None:
            log.warning("task handler failed", exc_info=exc, extra=where)
            await self._answer(ctx, "fail", client.fail_task, _describe(exc), True)
        else:
            await self._complete(client, ctx, run.result())

    async def _complete(self, client: OpsCoreClient, ctx: TaskContext, result: Any) -> None:
        """Sends the converted result; a result that cannot be sent, or that the server
        refuses as too large, fails the task at once."""
        try:
            output = to_output(result)
        except ResultError as exc:
            log.warning(
                "task result cannot be sent", extra={"task_id": ctx.task_id, "error": str(exc)}
            )
            await self._answer(ctx, "fail", client.fail_task, _describe(exc), False)
            return
        try:
            await self._answer(ctx, "complete", client.complete_task, output)
        except InvalidArgumentError as exc:
            message = f"the server refused the result: {exc}"
            log.warning("task result refused", extra={"task_id": ctx.task_id, "error": str(exc)})
            await self._answer(
                ctx, "fail", client.fail_task, message[:MAX_ERROR_MESSAGE_LENGTH], False
            )

    async def _invoke(self, handler: _Handler, ctx: TaskContext) -> Any:
        args: tuple[Any, ...] = (ctx,)
        if handler.input is not None:
            args = (ctx, parse_input(handler.input, {**ctx.input, **ctx.parameters}))
        if inspect.iscoroutinefunction(handler.fn):
            return await handler.fn(*args)
        assert self._pool is not None
        call = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(self._pool, call, handler.fn, *args)

    async def _keep_lease(self, ctx: TaskContext, run: asyncio.Task[Any]) -> None:
        """Heartbeats the task every third of its lease; cancels the handler when the
        server asks to stop, the attempt is no longer current, or the lease ran out
        with the server unreachable. Stops at the attempt's start_to_close deadline,
        which no heartbeat can extend (the worker's own timer ends the attempt)."""
        lease = ctx.assignment.lease or (ctx._lease_end - time.monotonic())
        interval = max(MIN_LEASE_HEARTBEAT, (lease if lease > 0 else DEFAULT_LEASE) / 3)
        end = ctx.assignment.attempt_deadline
        attempt_end = None if end is None else self._local_time(end)
        while True:
            await asyncio.sleep(interval)
            if attempt_end is not None and time.monotonic() >= attempt_end:
                return
            try:
                cancel = await ctx.heartbeat()
            except _UNREACHABLE:
                ctx._cancel(LEASE_LOST)
                cancel = True
            except OpsCoreError as exc:
                log.warning("task heartbeat failed", extra={"error": str(exc)})
                continue
            if cancel:
                run.cancel()
                return

    @staticmethod
    async def _answer(
        ctx: TaskContext, what: str, send: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        """Sends an answer, retried while the server is unreachable until the lease
        has surely ended. A refusal (the attempt already ended or was superseded) is
        expected after a timeout or a restart and is only logged; InvalidArgumentError
        is raised for the caller to handle."""
        where = {"task_id": ctx.task_id, "session_id": ctx.session_id, "answer": what}
        try:
            await send(ctx.assignment.task_token, *args, retry_until=ctx._answer_until)
        except TaskDispatchError as exc:
            log.info(
                "task answer refused: the attempt already ended", extra={**where, "error": str(exc)}
            )
        except _UNREACHABLE as exc:
            log.warning(
                "task answer not delivered before the lease ended",
                extra={**where, "error": str(exc)},
            )
        except InvalidArgumentError:
            raise
        except OpsCoreError as exc:
            log.warning("task answer not accepted", extra={**where, "error": str(exc)})


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_MESSAGE_LENGTH]
