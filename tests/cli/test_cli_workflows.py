"""`opscore workflow ...` through the real entry point against a server process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from cli_support import Cli

if TYPE_CHECKING:
    from conftest import StartWorker

SAMPLE = "examples/sample_workflow.json"
# What a-1 needs to be pinned to runs of SAMPLE.
CAPABLE = ("--capability", "test_capability", "--capability", "another_capability")
FAN_OUT = "examples/fan_out_fan_in.yaml"
EXPLODING = """
id: exploding
name: Exploding
version: "1"
tasks:
  - {task_id: boom, name: Boom, agent_capability: explode}
"""


async def test_create_list_get_and_start(cli: Cli) -> None:
    sample = await cli.json("workflow", "create", "-f", SAMPLE)
    assert (sample["id"], sample["version"]) == ("sample_workflow_id", "1.0")
    assert [(t["task_id"], t["next_task_id"]) for t in sample["tasks"]] == [
        ("step_1", "step_2"),
        ("step_2", ""),
    ]
    created = await cli.ok("workflow", "create", "--file", FAN_OUT)
    assert created.out.strip() == "Created workflow research_digest version 1 (4 tasks)"

    listed, first, digest, pinned = await asyncio.gather(
        cli.json("workflow", "list"),
        cli.json("workflow", "list", "--limit", "1"),
        cli.json("workflow", "get", "research_digest"),
        cli.json("workflow", "get", "sample_workflow_id", "--version", "1.0"),
    )
    assert [d["id"] for d in listed] == ["research_digest", "sample_workflow_id"]
    assert first == listed[:1]
    publish = digest["tasks"][-1]
    assert (publish["task_id"], publish["depends_on"]) == ("publish", ["summarize", "translate"])
    assert digest["tasks"][0]["timeout"] == 30
    assert pinned == sample

    table, view = await asyncio.gather(
        cli.ok("workflow", "list"), cli.ok("workflow", "get", "research_digest")
    )
    assert "research_digest" in table.out and "Sample Load Test Workflow" in table.out
    assert "summarize, translate" in view.out and "https://example.com/paper.pdf" in view.out

    again, _ = await asyncio.gather(
        cli("workflow", "create", "-f", SAMPLE),
        cli.ok("agent", "register", "--id", "a-1", "--name", "A", *CAPABLE),
    )
    assert again.code == 1
    assert again.err.splitlines() == [
        "opscore: workflow definition 'sample_workflow_id' version '1.0' already exists; "
        "use a new version"
    ]

    # Starting runs (no agent is connected, so they stay PENDING).
    start = ("workflow", "start", "sample_workflow_id", "--request-id", "run-1")
    run, retried = await cli.json(*start), await cli.json(*start)
    assert run["session_id"] == retried["session_id"]
    assert run["status"] == "PENDING"
    pinned_run, started = await asyncio.gather(
        cli.json("workflow", "start", "sample_workflow_id", "--version", "1.0", "--agent", "a-1"),
        cli.ok("workflow", "start", "sample_workflow_id"),
    )
    assert (pinned_run["agent_id"], pinned_run["workflow_definition_version"]) == ("a-1", "1.0")
    assert pinned_run["session_id"] != run["session_id"]
    assert started.out.startswith("Started session ")
    assert started.out.rstrip().endswith("of sample_workflow_id version 1.0 (PENDING)")


async def test_start_and_wait(cli: Cli, start_worker: StartWorker, tmp_path: Path) -> None:
    start_worker()
    exploding = tmp_path / "exploding.yaml"
    exploding.write_text(EXPLODING)
    for path in (SAMPLE, FAN_OUT, str(exploding)):
        await cli.ok("workflow", "create", "-f", path)

    done = await cli.json(
        "workflow", "start", "sample_workflow_id", "--input", '{"doc": "q3"}', "--wait"
    )
    assert done["status"] == "COMPLETED"
    assert done["input"] == {"doc": "q3"}
    assert done["output"]["step_2"] == {
        "task": "step_2",
        "input": {"doc": "q3"},
        "upstream": ["step_1"],
    }

    followed = await cli.ok("workflow", "start", "research_digest", "--wait")
    lines = followed.out.splitlines()
    assert lines[0].startswith("Started session ")
    assert "SESSION_COMPLETED" in lines[-2]
    assert lines[-1].endswith(" is COMPLETED")
    assert sum("TASK_COMPLETED" in line for line in lines) == 4

    failed = await cli("workflow", "start", "exploding", "--wait", "--json")
    assert failed.code == 1
    session = failed.json()
    assert session["status"] == "FAILED"
    assert failed.err.splitlines() == [
        f"opscore: session {session['session_id']} ended FAILED: {session['error']}"
    ]
    assert "boom exploded" in session["error"]


async def test_start_and_wait_for_a_cancelled_session(cli: Cli) -> None:
    """--wait --json returns when another command cancels the session: the final
    session on stdout, exit 1 with the reason on stderr."""
    await cli.ok("workflow", "create", "-f", SAMPLE)
    waiting = asyncio.create_task(
        cli("workflow", "start", "sample_workflow_id", "--request-id", "r-9", "--wait", "--json")
    )
    for _ in range(100):  # until the waiting start has created the session
        if listed := await cli.json("session", "list"):
            break
    cancelled = await cli.json("session", "cancel", listed[0]["session_id"], "--reason", "stop")
    assert cancelled["status"] == "CANCELLED"

    ended = await waiting
    assert ended.code == 1
    session = ended.json()
    assert (session["session_id"], session["status"]) == (listed[0]["session_id"], "CANCELLED")
    assert ended.err.splitlines() == [
        f"opscore: session {session['session_id']} ended CANCELLED: {session['error']}"
    ]
    again = await cli("workflow", "start", "sample_workflow_id", "--request-id", "r-9", "--wait")
    assert again.code == 1
    assert again.out.rstrip().endswith(" is CANCELLED")
