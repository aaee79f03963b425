"""`opscore session ...` through the real entry point against a server process."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

import pytest
import typer
from cli_support import Cli, plain, read_json_lines

from opscore.cli.sessions import STATUSES
from opscore.protocol.enums import SessionStatus

if TYPE_CHECKING:
    from conftest import StartWorker

SAMPLE = "examples/sample_workflow.json"
# What a-1 needs to be pinned to runs of SAMPLE.
CAPABLE = ("--capability", "test_capability", "--capability", "another_capability")


def test_status_choices_are_the_domain_statuses() -> None:
    expected = [s.name for s in SessionStatus if s != SessionStatus.UNSPECIFIED]
    assert [STATUSES(name.lower()) for name in expected] == expected
    with pytest.raises(typer.BadParameter, match="RUNNING"):
        STATUSES("UNSPECIFIED")


async def test_list_get_events_and_cancel(cli: Cli) -> None:
    """Without an agent the runs stay PENDING, so they can be listed and cancelled."""
    await cli.ok("workflow", "create", "-f", SAMPLE)
    await cli.ok("agent", "register", "--id", "a-1", "--name", "A", *CAPABLE)
    older = await cli.json("workflow", "start", "sample_workflow_id", "--input", '{"n": 1}')
    newer = await cli.json("workflow", "start", "sample_workflow_id", "--agent", "a-1")
    ids = [newer["session_id"], older["session_id"]]

    listed, pending, by_workflow, by_agent, done, one, history = await asyncio.gather(
        cli.json("session", "list"),
        cli.json("session", "list", "--status", "pending"),
        cli.json("session", "list", "--workflow", "sample_workflow_id", "--limit", "5"),
        cli.json("session", "list", "--agent", "a-1"),
        cli.json("session", "list", "--status", "COMPLETED", "--status", "FAILED"),
        cli.json("session", "get", older["session_id"]),
        cli.json("session", "events", older["session_id"]),
    )
    assert [s["session_id"] for s in listed] == ids
    assert pending == by_workflow == listed
    assert [s["session_id"] for s in by_agent] == ids[:1]
    assert done == []
    assert (one["status"], one["input"]) == ("PENDING", {"n": 1})
    assert [(t["task_id"], t["status"]) for t in one["tasks"]] == [
        ("step_1", "PENDING"),
        ("step_2", "PENDING"),
    ]
    waiting = one["tasks"][0]
    assert (waiting["waiting_reason"], waiting["max_attempts"]) == ("NO_CAPABLE_AGENT", 3)
    assert one["tasks"][1]["waiting_reason"] == "DEPENDENCIES"
    assert [(e["sequence"], e["type"]) for e in history] == [(1, "CREATED"), (2, "TASK_QUEUED")]
    assert history[1]["task_id"] == "step_1"

    table, view, events = await asyncio.gather(
        cli.ok("session", "list"),
        cli.ok("session", "get", older["session_id"]),
        cli.ok("session", "events", older["session_id"]),
    )
    assert ids[0] in table.out and ids[1] in table.out and "PENDING" in table.out
    assert "step_2" in view.out and '{"n": 1}' in view.out
    assert "waiting: no connected agent with capability 'test_capability'" in view.out
    assert "0/3" in view.out
    assert (await cli.ok("session", "show", older["session_id"])).out == view.out
    assert "TASK_QUEUED" in events.out and "step_1" in events.out

    cancelled, said = await asyncio.gather(
        cli.json("session", "cancel", older["session_id"], "--reason", "not needed"),
        cli.ok("session", "cancel", newer["session_id"]),
    )
    assert cancelled["status"] == "CANCELLED"
    assert said.out.strip() == f"Session {newer['session_id']} is CANCELLED"

    # Cancelling again is refused; a watch of an ended run replays it and ends by itself.
    again, replayed = await asyncio.gather(
        cli("session", "cancel", older["session_id"]),
        cli.json_lines("session", "watch", older["session_id"]),
    )
    assert again.code == 1
    assert len(again.err.splitlines()) == 1
    assert again.err.startswith(f"opscore: session {older['session_id']} already ended")
    assert [e["type"] for e in replayed][-2:] == ["TASK_CANCELLED", "SESSION_CANCELLED"]


async def test_watch_follows_a_run_and_ends_with_it(cli: Cli, start_worker: StartWorker) -> None:
    await cli.ok("workflow", "create", "-f", SAMPLE)
    session_id = (await cli.json("workflow", "start", "sample_workflow_id"))["session_id"]
    watch = await cli.spawn("session", "watch", session_id, "--json")
    created, queued = await read_json_lines(watch, 2)
    assert (created["type"], queued["type"]) == ("CREATED", "TASK_QUEUED")

    start_worker()  # the run goes on while the watch is open, and the watch ends with it
    out, err = await asyncio.wait_for(watch.communicate(), 10)
    assert (watch.returncode, err) == (0, b"")
    events = [created, queued, *map(json.loads, out.splitlines())]
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert {e["session_id"] for e in events} == {session_id}
    assert events[-1]["type"] == "SESSION_COMPLETED"
    assert [e["task_id"] for e in events if e["type"] == "TASK_COMPLETED"] == ["step_1", "step_2"]

    resumed, piped, live = await asyncio.gather(
        cli.json_lines("session", "watch", session_id, "--since", "3"),
        cli.ok("session", "watch", session_id),
        cli.ok("session", "watch", session_id, TTY_COMPATIBLE="1", COLUMNS="120"),
    )
    assert resumed == events[3:]
    assert len(piped.out.splitlines()) == len(events)
    assert "SESSION_COMPLETED" in piped.out.splitlines()[-1]
    # On a terminal the live view ends showing the run's tasks and its last events.
    view = plain(live.out)
    assert f"Session {session_id} is COMPLETED" in view
    assert "another_capability" in view and "SESSION_COMPLETED" in view
