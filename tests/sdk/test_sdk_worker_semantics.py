"""What the Agent worker promises about one attempt, end to end with real agents: the
results it can send and the ones it refuses at once, declared inputs, cancellation of
async and sync handlers, the bounded thread pool, start_to_close timeouts, and a
handler that outlives a server killed with SIGKILL."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import socket
import threading
import time
import uuid
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import pydantic
import pytest

from opscore.protocol.enums import TimeoutType
from opscore.sdk import (
    Agent,
    OpsCoreClient,
    SessionEventType,
    SessionStatus,
    TaskContext,
    TaskStatus,
)

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import SpawnServer

    from opscore.sdk import types
    from opscore.server.app import OpsCoreServer
    from tests.sdk.conftest import Definition, RunAgent

NO_RETRY = {"max_attempts": 1}
RETRY_FAST = {"max_attempts": 3, "initial_interval": "0.05s"}


async def eventually(check: Any, within: float = 5.0) -> None:
    """Polls an async predicate until it holds."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition did not hold in time"
        await asyncio.sleep(0.01)


async def finished(client: OpsCoreClient, session_id: str) -> types.Session:
    return await asyncio.wait_for(client.wait_session(session_id), 10)


async def history(
    client: OpsCoreClient, session_id: str, kind: SessionEventType | None = None
) -> list[types.SessionEvent]:
    """The session's events (of one kind, when given)."""
    return [
        e async for e in client.list_session_events(session_id) if kind is None or e.type is kind
    ]


class Kind(enum.Enum):
    SUMMARY = "summary"


class Report(pydantic.BaseModel):
    title: str
    at: datetime


@dataclasses.dataclass
class Stats:
    words: int
    on: date
    tags: tuple[str, ...]


# --------------------------------------------------------------------------- results


async def test_pydantic_models_dataclasses_and_datetimes_are_sent_as_json(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    agent = Agent(live_server.address, agent_id="json-1")
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    @agent.handler("mixed")
    async def mixed(ctx: TaskContext) -> dict[str, Any]:
        return {
            "report": Report(title="q3", at=moment),
            "stats": Stats(words=3, on=date(2026, 1, 2), tags=("a", "b")),
            "kind": Kind.SUMMARY,
            "id": uuid.UUID(int=7),
            "when": moment,
        }

    @agent.handler("model")
    def model(ctx: TaskContext) -> Report:
        return Report(title="whole", at=moment)

    run_agent(agent)
    await client.create_workflow(definition("wf", ("a", "mixed"), ("b", "model")))
    done = await finished(client, (await client.start_workflow("wf")).session_id)
    assert done.status is SessionStatus.COMPLETED
    assert done.task("a").output == {
        "report": {"title": "q3", "at": "2026-01-02T03:04:05Z"},
        "stats": {"words": 3, "on": "2026-01-02", "tags": ["a", "b"]},
        "kind": "summary",
        "id": "00000000-0000-0000-0000-000000000007",
        "when": "2026-01-02T03:04:05Z",
    }
    # A model is a mapping of fields: it is the output itself, not {"result": ...}.
    assert done.output == {"b": {"title": "whole", "at": "2026-01-02T03:04:05Z"}}


async def test_a_result_json_cannot_carry_fails_the_task_at_once_naming_the_type(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    """No retries and no waiting for a lease to expire: the first attempt fails, not
    retryable, and the error says what was returned and where."""
    agent = Agent(live_server.address, agent_id="opaque-1")

    class Opaque:
        pass

    @agent.handler("cap")
    async def opaque(ctx: TaskContext) -> dict[str, Any]:
        return {"items": [1, Opaque()]}

    run_agent(agent)
    await client.create_workflow(definition("wf", ("a", "cap"), retry_policy=RETRY_FAST))
    done = await finished(client, (await client.start_workflow("wf")).session_id)
    assert done.status is SessionStatus.FAILED
    assert done.task("a").attempt == 1
    assert "cannot be sent as JSON (at output.items[1])" in done.error
    assert "Opaque" in done.error
    failed = await history(client, done.session_id, SessionEventType.TASK_FAILED)
    assert [e.detail["retryable"] for e in failed] == [False]


async def test_a_result_the_server_refuses_as_too_large_fails_the_task_at_once(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    agent = Agent(live_server.address, agent_id="huge-1")
    agent.handler("cap")(lambda ctx: {"text": "x" * (live_server.settings.max_payload_bytes + 1)})
    run_agent(agent)
    await client.create_workflow(definition("wf", ("a", "cap"), retry_policy=RETRY_FAST))
    done = await finished(client, (await client.start_workflow("wf")).session_id)
    assert done.status is SessionStatus.FAILED and done.task("a").attempt == 1
    assert "the server refused the result" in done.error


# --------------------------------------------------------------------------- inputs


class Summarize(pydantic.BaseModel):
    doc: str
    limit: int
    style: str = "plain"


async def test_a_declared_input_is_validated_and_passed_to_the_handler(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    """The task's parameters merged over the session input, parameters winning."""
    agent = Agent(live_server.address, agent_id="typed-1")
    seen: list[Summarize] = []

    @agent.handler("summarize", input=Summarize)
    async def summarize(ctx: TaskContext, data: Summarize) -> dict[str, Any]:
        seen.append(data)
        return {"summary": data.doc[: data.limit]}

    run_agent(agent)
    params = {"limit": 3, "style": "terse"}
    await client.create_workflow(definition("wf", ("a", "summarize"), parameters=params))
    session = await client.start_workflow("wf", input={"doc": "abcdef", "style": "long"})
    done = await finished(client, session.session_id)
    assert done.status is SessionStatus.COMPLETED and done.output == {"a": {"summary": "abc"}}
    assert seen == [Summarize(doc="abcdef", limit=3, style="terse")]


async def test_an_input_that_does_not_match_fails_the_task_at_once_naming_the_fields(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    agent = Agent(live_server.address, agent_id="typed-2")
    calls: list[int] = []

    @agent.handler("summarize", input=Summarize)
    def summarize(ctx: TaskContext, data: Summarize) -> None:
        calls.append(ctx.attempt)

    run_agent(agent)
    params = {"limit": "many"}
    wf = definition("wf", ("a", "summarize"), parameters=params, retry_policy=RETRY_FAST)
    await client.create_workflow(wf)
    done = await finished(client, (await client.start_workflow("wf")).session_id)
    assert done.status is SessionStatus.FAILED and done.task("a").attempt == 1
    assert "input does not match Summarize: doc: Field required; limit: Input should be" in (
        done.error
    )
    assert calls == []


# --------------------------------------------------------------------------- cancellation


async def test_a_sync_handler_sees_the_session_cancelled(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    agent = Agent(live_server.address, agent_id="sync-cancel-1")
    started = threading.Event()
    reasons: list[str] = []

    @agent.handler("cap")
    def poll(ctx: TaskContext) -> None:
        started.set()
        while not ctx.wait_cancelled(0.01):
            pass
        reasons.append(ctx.cancel_reason)

    run_agent(agent)
    await client.create_workflow(definition("wf", ("a", "cap"), timeout="0.3s"))
    session = await client.start_workflow("wf")
    await asyncio.to_thread(started.wait, 5)
    await client.cancel_session(session.session_id)

    async def stopped() -> bool:
        return reasons == ["the session was cancelled"]

    await eventually(stopped)
    done = await client.get_session(session.session_id)
    assert done.status is SessionStatus.CANCELLED
    assert done.task("a").status is TaskStatus.CANCELLED


async def test_sync_handlers_run_in_a_bounded_thread_pool(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    """Four tasks in flight, two threads: two handlers run, two wait for a thread."""
    agent = Agent(live_server.address, agent_id="pool-1", max_in_flight=4, max_threads=2)
    release = threading.Event()
    lock = threading.Lock()
    running: list[str] = []
    most = 0
    threads: set[str] = set()

    @agent.handler("cap")
    def block(ctx: TaskContext) -> None:
        nonlocal most
        with lock:
            running.append(ctx.session_id)
            most = max(most, len(running))
            threads.add(threading.current_thread().name)
        release.wait(10)
        with lock:
            running.remove(ctx.session_id)

    run_agent(agent)
    await client.create_workflow(definition("wf", ("a", "cap")))
    sessions = [(await client.start_workflow("wf")).session_id for _ in range(4)]

    async def all_dispatched() -> bool:
        tasks = [(await client.get_session(sid)).task("a") for sid in sessions]
        return all(t.status is TaskStatus.RUNNING or t.agent_id for t in tasks)

    await eventually(all_dispatched)

    async def two_running() -> bool:
        return len(running) == 2

    await eventually(two_running)
    assert most == 2
    release.set()
    for sid in sessions:
        assert (await finished(client, sid)).status is SessionStatus.COMPLETED
    assert most == 2 and len(threads) == 2
    assert all(name.startswith("pool-1") for name in threads)


# --------------------------------------------------------------------------- timeouts


async def test_start_to_close_cancels_an_async_handler_and_the_retry_runs(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    """The first attempt heartbeats but hangs: at its start_to_close limit the handler
    gets CancelledError, the history says TIMED_OUT (START_TO_CLOSE), and the second
    attempt completes."""
    agent = Agent(live_server.address, agent_id="s2c-1")
    cancelled: list[tuple[int, bool, str]] = []

    @agent.handler("cap")
    async def hang(ctx: TaskContext) -> dict[str, int]:
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.append((ctx.attempt, ctx.cancelled, ctx.cancel_reason))
                raise
        return {"attempt": ctx.attempt}

    run_agent(agent)
    timeouts = {"start_to_close": "0.6s", "heartbeat": "0.2s"}
    retry = {"max_attempts": 2, "initial_interval": "0.05s"}
    await client.create_workflow(
        definition("wf", ("a", "cap"), timeouts=timeouts, retry_policy=retry)
    )
    done = await finished(client, (await client.start_workflow("wf")).session_id)
    assert done.status is SessionStatus.COMPLETED and done.output == {"a": {"attempt": 2}}
    message = "start_to_close timeout of 0.6s reached; handler cancelled"
    assert cancelled == [(1, True, message)]
    timed_out = await history(client, done.session_id, SessionEventType.TASK_TIMED_OUT)
    assert [(e.attempt, e.timeout_type) for e in timed_out] == [(1, TimeoutType.START_TO_CLOSE)]


async def test_start_to_close_tells_a_sync_handler_to_stop(
    client: OpsCoreClient, live_server: OpsCoreServer, run_agent: RunAgent, definition: Definition
) -> None:
    agent = Agent(live_server.address, agent_id="s2c-2")
    reasons: list[str] = []

    @agent.handler("cap")
    def poll(ctx: TaskContext) -> dict[str, str]:
        while not ctx.wait_cancelled(0.01):
            pass
        reasons.append(ctx.cancel_reason)
        return {"too": "late"}

    run_agent(agent)
    timeouts = {"start_to_close": "0.5s"}
    await client.create_workflow(
        definition("wf", ("a", "cap"), timeouts=timeouts, retry_policy=NO_RETRY)
    )
    done = await finished(client, (await client.start_workflow("wf")).session_id)
    assert done.status is SessionStatus.FAILED and done.task("a").attempt == 1
    assert "start_to_close timeout of 0.5s reached" in done.error

    async def told() -> bool:
        return reasons == ["start_to_close timeout of 0.5s reached; handler cancelled"]

    await eventually(told)
    assert await history(client, done.session_id, SessionEventType.TASK_COMPLETED) == []


# --------------------------------------------------------------------------- restarts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("finish", ["after the restart", "while the server is down"])
async def test_a_handler_outlives_a_server_killed_with_sigkill(
    spawn_server: SpawnServer,
    tmp_path: Path,
    run_agent: RunAgent,
    definition: Definition,
    finish: str,
) -> None:
    """The server is killed while a handler runs and restarted on the same file and
    port: the handler is not cancelled, the task is not dispatched again, and its
    completion (sent after the restart, or retried from while the server was down)
    is accepted as attempt 1."""
    db, port = tmp_path / "restart.db", free_port()
    first = await spawn_server(db, port=port, OPSCORE_SCHEDULER_INTERVAL="0.05")
    agent = Agent(first.address, agent_id="survivor-1", heartbeat_interval=0.2)
    started = asyncio.Event()
    release = asyncio.Event()
    returned = asyncio.Event()
    runs: list[int] = []

    @agent.handler("cap")
    async def work(ctx: TaskContext) -> dict[str, int]:
        runs.append(ctx.attempt)
        started.set()
        await release.wait()
        returned.set()
        return {"attempt": ctx.attempt}

    running = run_agent(agent)
    async with OpsCoreClient(first.address, timeout=5) as client:
        await client.create_workflow(definition("wf", ("a", "cap"), timeout="30s"))
        session = await client.start_workflow("wf")
        await asyncio.wait_for(started.wait(), 10)
        first.kill()
        assert await first.wait_exit(10) is not None
        if finish == "while the server is down":
            release.set()
            await asyncio.wait_for(returned.wait(), 10)
        second = await spawn_server(db, port=port, OPSCORE_SCHEDULER_INTERVAL="0.05")
        assert second.address == first.address
        release.set()
        done = await finished(client, session.session_id)
    assert done.status is SessionStatus.COMPLETED and done.output == {"a": {"attempt": 1}}
    assert done.task("a").attempt == 1 and runs == [1]
    assert not running.done()


async def test_a_handler_whose_lease_ran_out_while_the_server_was_down_is_cancelled(
    spawn_server: SpawnServer, tmp_path: Path, run_agent: RunAgent, definition: Definition
) -> None:
    """Heartbeats are retried while the server is away, but only until the lease has
    surely ended: then the handler is told to stop (the server times that attempt
    out), and once the server is back the task runs again and completes."""
    db, port = tmp_path / "lost.db", free_port()
    first = await spawn_server(db, port=port, OPSCORE_SCHEDULER_INTERVAL="0.05")
    agent = Agent(first.address, agent_id="orphan-1", heartbeat_interval=0.2)
    started = asyncio.Event()
    reasons: list[str] = []

    @agent.handler("cap")
    async def work(ctx: TaskContext) -> dict[str, int]:
        if not started.is_set():
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                reasons.append(ctx.cancel_reason)
                raise
        return {"attempt": ctx.attempt}

    run_agent(agent)
    async with OpsCoreClient(first.address, timeout=5) as client:
        retry = {"max_attempts": 3, "initial_interval": "0.05s"}
        await client.create_workflow(
            definition("wf", ("a", "cap"), timeout="0.5s", retry_policy=retry)
        )
        session = await client.start_workflow("wf")
        await asyncio.wait_for(started.wait(), 10)
        first.kill()
        assert await first.wait_exit(10) is not None

        async def told() -> bool:
            return reasons == ["the lease ran out while the server was unreachable"]

        await eventually(told, within=15)
        await spawn_server(db, port=port, OPSCORE_SCHEDULER_INTERVAL="0.05")
        done = await finished(client, session.session_id)
    assert done.status is SessionStatus.COMPLETED
