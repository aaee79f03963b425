"""StartWorkflow with wait: one call starts a session and returns it once it has ended,
with the output, error or cancellation a client would then read; a retry with the
same request_id waits again or returns the ended session; the call's deadline bounds
the wait but not the session; server shutdown ends the wait with UNAVAILABLE."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
from opspawn.opscore.v1 import session_pb2 as S
from opspawn.opscore.v1 import workflow_pb2 as W
from workflow_support import READ_TIMEOUT, definition, single, task, task_of, to_dict

if TYPE_CHECKING:
    from conftest import Rpc
    from workflow_support import Harness

    from opscore.server.app import OpsCoreServer


def waiting_start(ops: Harness, source: str, **fields: Any) -> asyncio.Task[S.Session]:
    """StartWorkflow with wait=True, running in the background."""
    return asyncio.create_task(ops.start(source, wait=True, **fields))


async def result(call: asyncio.Task[S.Session]) -> S.Session:
    return await asyncio.wait_for(call, READ_TIMEOUT)


async def test_wait_returns_the_completed_session_with_the_final_output(ops: Harness) -> None:
    """A two-step run: the call returns only after the last step completes, with
    status COMPLETED, the final task's output and both tasks completed."""
    await ops.define(definition("pipe", task("a", next_task_id="b"), task("b")))
    agent = await ops.agent("worker")

    call = waiting_start(ops, "pipe", input={"n": 1}, request_id="run-1")
    first = await agent.next()
    await agent.complete(first, {"step": "a"})
    second = await agent.next()
    assert not call.done()
    await agent.complete(second, {"answer": 42})

    ended = await result(call)
    assert ended.session_id == first.session_id
    assert ended.status == S.SESSION_STATUS_COMPLETED
    assert to_dict(ended.output) == {"b": {"answer": 42.0}}
    assert ended.error == ""
    assert ended.HasField("ended_at")
    assert [task_of(ended, t).status for t in ("a", "b")] == [S.TASK_STATUS_COMPLETED] * 2
    assert ended == await ops.session(ended.session_id)


async def test_wait_returns_the_failed_session_with_its_error(ops: Harness) -> None:
    await ops.define(single("flaky"))
    agent = await ops.agent("worker")

    call = waiting_start(ops, "flaky")
    await agent.fail(await agent.next(), "disk on fire", retryable=False)

    ended = await result(call)
    assert ended.status == S.SESSION_STATUS_FAILED
    assert "disk on fire" in ended.error
    assert task_of(ended, "only").status == S.TASK_STATUS_FAILED


async def test_wait_returns_the_session_cancelled_by_another_call(ops: Harness) -> None:
    """A session cancelled from another call while its start waits: the start returns
    it CANCELLED with the reason."""
    await ops.define(single("long"))
    agent = await ops.agent("worker")

    call = waiting_start(ops, "long")
    running = await agent.next()
    cancelled = await ops.sessions.CancelSession(
        S.CancelSessionRequest(session_id=running.session_id, reason="not needed")
    )

    ended = await result(call)
    assert ended.status == S.SESSION_STATUS_CANCELLED
    assert ended.session_id == cancelled.session_id
    assert "not needed" in ended.error
    assert ended == await ops.session(ended.session_id)


async def test_retry_with_the_same_request_id_waits_for_the_same_session(ops: Harness) -> None:
    """Two waiting calls with one request_id share one session and both get its end;
    a retry after the end returns the ended session without running anything again."""
    await ops.define(single("idem"))
    agent = await ops.agent("worker")

    first = waiting_start(ops, "idem", request_id="same")
    assignment = await agent.next()
    again = waiting_start(ops, "idem", request_id="same")
    await asyncio.sleep(0.05)  # let the retry reach the server and wait
    assert not again.done()
    await agent.complete(assignment, {"done": True})

    ended, ended_again = await result(first), await result(again)
    assert ended == ended_again
    assert ended.status == S.SESSION_STATUS_COMPLETED
    late = await result(waiting_start(ops, "idem", request_id="same"))
    assert late == ended
    await agent.expect_none()
    assert [s.session_id for s in await ops.list_all()] == [ended.session_id]


async def test_deadline_ends_the_wait_but_not_the_session(ops: Harness, rpc: Rpc) -> None:
    """When the call's deadline passes the caller gets DEADLINE_EXCEEDED; the session
    goes on, and waiting again with the same request_id returns its end. (The session
    is started first without wait, so a slow machine cannot let the deadline pass
    before the server has it.)"""
    await ops.define(single("slow"))
    agent = await ops.agent("worker")
    started = await ops.start("slow", request_id="deadline")
    assignment = await agent.next()
    request = W.StartWorkflowRequest(
        workflow_definition_id="slow", request_id="deadline", wait=True
    )

    await rpc.fails(
        ops.workflow.StartWorkflow(request, timeout=0.3), grpc.StatusCode.DEADLINE_EXCEEDED
    )
    running = await ops.session(started.session_id)
    assert running.status == S.SESSION_STATUS_RUNNING

    call = waiting_start(ops, "slow", request_id="deadline")
    await agent.complete(assignment, {"late": "but fine"})
    ended = await result(call)
    assert ended.session_id == running.session_id
    assert to_dict(ended.output) == {"only": {"late": "but fine"}}


async def test_wait_with_bad_input_is_invalid_and_starts_nothing(ops: Harness, rpc: Rpc) -> None:
    failure = await rpc.fails(ops.start("-bad id", wait=True), grpc.StatusCode.INVALID_ARGUMENT)
    assert failure.fields == ["workflow_definition_id"]
    await rpc.fails(ops.start("missing", wait=True), grpc.StatusCode.NOT_FOUND)
    assert await ops.list_all() == []


async def test_server_shutdown_ends_the_wait_with_unavailable(
    ops: Harness, wf_server: OpsCoreServer, rpc: Rpc
) -> None:
    """The waiting caller is told to retry (UNAVAILABLE), not left hanging until the
    grace period ends."""
    await ops.define(single("cut"))
    agent = await ops.agent("worker")

    call = waiting_start(ops, "cut", request_id="cut-1")
    await agent.next()
    await wf_server.stop(grace=30)
    failure = await rpc.fails(result(call), grpc.StatusCode.UNAVAILABLE)
    assert failure.reason == "SHUTTING_DOWN"
    assert "retry with the same request_id" in failure.message
