"""`opscore agent ...` through the real entry point against a server process."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pytest
import typer
from cli_support import Cli, read_json_lines, read_until

from opscore.cli.agents import REPORTED_STATES, STATES
from opscore.protocol.enums import REPORTABLE_STATES, AgentState

if TYPE_CHECKING:
    from conftest import StartWorker


def test_state_choices_are_the_domain_states() -> None:
    expected = [s.name for s in AgentState if s != AgentState.UNSPECIFIED]
    assert [STATES(name.lower()) for name in expected] == expected
    assert {REPORTED_STATES(s.name) for s in REPORTABLE_STATES} == {
        s.name for s in REPORTABLE_STATES
    }
    with pytest.raises(typer.BadParameter, match="DRAINING"):
        REPORTED_STATES("offline")  # decided by the server


async def test_register_get_list_and_update_state(cli: Cli) -> None:
    worker = await cli.json(
        *("agent", "register", "--id", "summarizer-1", "--name", "Summarizer"),
        *("--capability", "summarize", "--capability", "translate", "--version", "1.2.0"),
        *("--endpoint", "http://10.0.0.7:8080", "--meta", "team=ml", "--meta", "zone=eu-1"),
    )
    assert worker["agent_id"] == "summarizer-1"
    assert worker["capabilities"] == ["summarize", "translate"]
    assert worker["metadata"] == {"team": "ml", "zone": "eu-1"}
    assert worker["state"] == "INITIALIZING"
    assert (worker["version"], worker["contact_endpoint"]) == ("1.2.0", "http://10.0.0.7:8080")
    generated = await cli.json("agent", "register", "--name", "Fetcher", "--capability", "fetch")
    assert generated["agent_id"] and generated["name"] == "Fetcher"

    busy = await cli.json("agent", "update-state", "summarizer-1", "busy", "--details", '{"n": 3}')
    assert (busy["state"], busy["state_details"]) == ("BUSY", {"n": 3})
    assert busy["revision"] > worker["revision"]
    assert await cli.json("agent", "get", "summarizer-1") == busy

    listed, only_busy, both, fetchers, first, idle = await asyncio.gather(
        cli.json("agent", "list"),
        cli.json("agent", "list", "--state", "BUSY"),
        cli.json("agent", "list", "--state", "busy", "--state", "initializing"),
        cli.json("agent", "list", "--capability", "fetch"),
        cli.json("agent", "list", "--limit", "1"),
        cli.json("agent", "list", "--state", "IDLE"),
    )
    assert [a["agent_id"] for a in listed] == sorted(["summarizer-1", generated["agent_id"]])
    assert only_busy == [busy]
    assert both == listed
    assert fetchers == [generated]
    assert first == listed[:1]
    assert idle == []

    # People get tables and one-line confirmations.
    table, one, empty = await asyncio.gather(
        cli.ok("agent", "list"),
        cli.ok("agent", "get", "summarizer-1"),
        cli.ok("agent", "list", "--state", "ERROR"),
    )
    assert "summarizer-1" in table.out and "BUSY" in table.out and "Fetcher" in table.out
    assert "Summarizer" in one.out and "team=ml" in one.out and '{"n": 3}' in one.out
    assert empty.out.strip() == "No agents."
    again = await cli.ok("agent", "register", "--id", "a-9", "--name", "Nine", "--capability", "x")
    assert again.out.startswith("Registered agent a-9 (INITIALIZING, revision ")
    state = await cli.ok("agent", "update-state", "a-9", "IDLE")
    assert state.out.startswith("Agent a-9 is IDLE (revision ")


async def test_watch(cli: Cli) -> None:
    await cli.ok("agent", "register", "--id", "a-1", "--name", "A", "--capability", "x")
    watch = await cli.spawn("agent", "watch", "--json", "--initial")
    snapshot, synced = await read_json_lines(watch, 2)
    assert (snapshot["type"], snapshot["agent"]["agent_id"]) == ("SNAPSHOT", "a-1")
    assert (synced["type"], synced["agent"]) == ("SYNCED", None)

    await cli.ok("agent", "register", "--id", "a-2", "--name", "B", "--capability", "y")
    await cli.ok("agent", "update-state", "a-1", "BUSY")
    registered, changed = await read_json_lines(watch, 2)
    assert (registered["type"], registered["agent"]["agent_id"]) == ("REGISTERED", "a-2")
    assert (changed["type"], changed["agent"]["state"]) == ("STATE_CHANGED", "BUSY")
    assert changed["revision"] > registered["revision"] > snapshot["revision"]

    watch.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(watch.communicate(), 10)
    assert watch.returncode == 130
    assert err == b"", err.decode()

    # Filters and replay: only a-1's events after the first revision.
    watch = await cli.spawn("agent", "watch", "--json", "--agent", "a-1", "--since", "1")
    (event,) = await read_json_lines(watch, 1)
    assert (event["type"], event["agent"]["agent_id"]) == ("STATE_CHANGED", "a-1")
    watch.terminate()
    await watch.wait()

    # For people, piped: one line per event.
    lines = await cli.spawn("agent", "watch", "--initial", "--capability", "x")
    text = await read_until(lines, "SYNCED")
    assert "SNAPSHOT" in text and "a-1" in text and "BUSY" in text and "a-2" not in text
    lines.send_signal(signal.SIGINT)
    await lines.wait()

    # On a terminal: a live board of the agents.
    board = await cli.spawn("agent", "watch", "--initial", TTY_COMPATIBLE="1", COLUMNS="120")
    await read_until(board, "a-2")
    await cli.ok("agent", "register", "--id", "a-3", "--name", "C", "--capability", "z")
    await read_until(board, "a-3")
    board.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(board.communicate(), 10)
    assert (board.returncode, err) == (130, b"")


async def test_list_and_get_show_connection_free_slots_and_last_contact(
    cli: Cli, start_worker: StartWorker
) -> None:
    """`agent list` and `agent get` say whether an agent has a task stream open, how many
    of its slots are free, and when the server last heard from it."""
    await cli.ok("agent", "register", "--id", "idle-1", "--name", "Idle", "--capability", "x")
    start_worker()
    deadline = time.monotonic() + 15
    worker: dict[str, Any] = {}
    while not worker.get("connected"):
        assert time.monotonic() < deadline, f"worker-1 never connected: {worker}"
        await asyncio.sleep(0.1)
        listed = await cli.json("agent", "list")
        worker = next((a for a in listed if a["agent_id"] == "worker-1"), {})
    assert worker["free_slots"] == 1
    contact = datetime.fromisoformat(worker["last_contact_at"])
    assert contact >= datetime.fromisoformat(worker["last_heartbeat_at"])
    idle = await cli.json("agent", "get", "idle-1")
    assert (idle["connected"], idle["free_slots"]) == (False, 0)
    assert idle["last_contact_at"] == idle["last_heartbeat_at"]

    table = await cli.ok("agent", "list", COLUMNS="200")
    rows = {line.split()[1]: line for line in table.out.splitlines() if "-1 " in line}
    assert "yes, 1 free" in rows["worker-1"]
    assert " no " in rows["idle-1"]
    one = await cli.ok("agent", "get", "worker-1")
    assert "Connected" in one.out and "yes, 1 free" in one.out and "Last contact" in one.out
