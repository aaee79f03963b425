"""Honest attempts through a kill -9: 100 sessions of three steps worked by real SDK
agents, the server killed while handlers run and restarted on the same file and
address. Every figure is exact: each task ran once, as attempt 1 (max_attempts is 1,
so a dishonest count would fail its session), no attempt was dispatched again while
its lease was valid, the answers of attempts that were running at the kill were
accepted, and the history records no failure, timeout or refused answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import TYPE_CHECKING

import grpc
from opspawn.opscore.v1 import session_pb2 as S
from workflow_support import Harness, definition, event_types, of_type, task, to_dict

from opscore.sdk import Agent, TaskContext

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import SpawnServer

SESSIONS = 100
STEPS = ("a", "b", "c")
WORK_SECONDS = 0.15
ONE_ATTEMPT = {"max_attempts": 1}
LIMITS = {"heartbeat": 30}  # long enough to outlive the restart
FINISHED = {S.SESSION_STATUS_COMPLETED, S.SESSION_STATUS_FAILED, S.SESSION_STATUS_CANCELLED}
CHAIN = definition(
    "chain3",
    task("a", next_task_id="b", retry=ONE_ATTEMPT, timeouts=LIMITS),
    task("b", next_task_id="c", retry=ONE_ATTEMPT, timeouts=LIMITS),
    task("c", retry=ONE_ATTEMPT, timeouts=LIMITS),
)


class Ledger:
    """What the handlers saw: each run's task, attempt, and when it ran."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, str, int]] = []
        self.running = 0
        self.killed_at: float | None = None
        self.spanned_kill = 0  # runs that started before the kill and ended after it

    async def work(self, ctx: TaskContext) -> dict[str, str]:
        self.runs.append((ctx.session_id, ctx.task_id, ctx.attempt))
        self.running += 1
        started = time.monotonic()
        try:
            await asyncio.sleep(WORK_SECONDS)
        finally:
            self.running -= 1
        if self.killed_at is not None and started < self.killed_at:
            self.spanned_kill += 1
        return {"by": ctx.task_id}


async def eventually(check: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {within}s: {what}")


async def test_kill_9_mid_run_keeps_every_attempt_honest(
    spawn_server: SpawnServer, tmp_path: Path, unused_tcp_port: int
) -> None:
    db = tmp_path / "kill9.db"
    first = await spawn_server(db, port=unused_tcp_port)
    ledger = Ledger()
    agents = [
        Agent(first.address, agent_id=f"worker-{i}", capabilities=["work"], max_in_flight=4)
        for i in range(2)
    ]
    for agent in agents:
        agent.handler("work")(ledger.work)
    workers = [asyncio.create_task(agent.run()) for agent in agents]
    try:
        async with grpc.aio.insecure_channel(first.address) as channel:
            ops = Harness(channel, None)
            await ops.define(CHAIN)
            sids = [
                (await ops.start("chain3", {"i": i}, request_id=f"run-{i}")).session_id
                for i in range(SESSIONS)
            ]
            await ops.close()

        async def busy_midway() -> bool:
            return len(ledger.runs) >= SESSIONS and ledger.running >= 4

        await eventually(busy_midway, 60, "handlers running with a third of the work done")
        first.kill()
        ledger.killed_at = time.monotonic()
        assert await first.wait_exit(10) is not None
        in_flight_at_kill = ledger.running
        second = await spawn_server(db, port=unused_tcp_port)

        async with grpc.aio.insecure_channel(second.address) as channel:
            ops = Harness(channel, None)

            async def all_ended() -> bool:
                done = await ops.list_all(page_size=500)
                return sum(s.status in FINISHED for s in done) == SESSIONS

            await eventually(all_ended, 120, "every session ended")
            sessions = {sid: await ops.session(sid) for sid in sids}
            histories = {sid: await ops.events(sid) for sid in sids}
            await ops.close()
    finally:
        for agent in agents:
            agent.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*workers, return_exceptions=True), 30)

    assert in_flight_at_kill >= 1
    # Every session completed; no task needed, or was given, a second attempt.
    assert Counter(s.status for s in sessions.values()) == {S.SESSION_STATUS_COMPLETED: SESSIONS}
    assert {(t.attempt, t.max_attempts) for s in sessions.values() for t in s.tasks} == {(1, 1)}
    # Each task reached a handler exactly once, as attempt 1: nothing was dispatched
    # again while an attempt still ran, and the in-flight runs' answers were accepted.
    runs = Counter((sid, task_id) for sid, task_id, _ in ledger.runs)
    assert runs == Counter({(sid, step): 1 for sid in sids for step in STEPS})
    assert {attempt for _, _, attempt in ledger.runs} == {1}
    assert ledger.spanned_kill >= 1
    # The history agrees: one completion per task, and nothing failed, timed out or
    # was refused. A task dispatched twice was one the server committed but whose
    # agent, reconnecting, said it never got (it went back under the same attempt).
    all_events = [e for history in histories.values() for e in history]
    kinds = Counter(event_types(all_events))
    assert kinds["TASK_COMPLETED"] == SESSIONS * len(STEPS)
    for absent in ("TASK_FAILED", "TASK_TIMED_OUT", "TASK_ANSWER_REFUSED", "SESSION_FAILED"):
        assert kinds[absent] == 0, absent
    taken_back = [
        e
        for e in of_type(all_events, "TASK_QUEUED")
        if to_dict(e.detail).get("reason", "").startswith("agent reconnected")
    ]
    assert kinds["TASK_DISPATCHED"] == SESSIONS * len(STEPS) + len(taken_back)
    for history in histories.values():
        assert [e.sequence for e in history] == list(range(1, len(history) + 1))
