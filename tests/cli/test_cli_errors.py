"""How the CLI fails: one line naming the problem, exit 1 for what the server refused
or could not be reached, exit 2 for bad usage, and never a traceback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from cli_support import Cli

BAD_DEFINITION = """
id: broken
name: Broken
tasks:
  - {task_id: a, name: A, agent_capability: x, next_task_id: nowhere}
  - {task_id: a, name: A again}
"""


async def test_refusals_are_short_and_exit_1(cli: Cli, tmp_path: Path) -> None:
    agent, session, workflow = await asyncio.gather(
        cli("agent", "get", "ghost"),
        cli("session", "watch", "ghost", "--json"),
        cli("workflow", "get", "ghost", "--json"),
    )
    assert (agent.code, agent.out, agent.err) == (1, "", "opscore: agent 'ghost' not found\n")
    assert (session.code, session.out, session.err) == (
        1,
        "",
        "opscore: session 'ghost' not found\n",
    )
    assert workflow.code == 1
    assert workflow.err == "opscore: workflow definition 'ghost' not found\n"

    # Invalid input: the first line says so, then one line per bad field.
    bad = await cli("agent", "register", "--id", "-bad id", "--name", "")
    assert bad.code == 1 and bad.out == ""
    first, *fields = bad.err.splitlines()
    assert first == "opscore: invalid request"
    assert [line.split(":")[0] for line in fields] == ["  agent_id", "  name"]

    definition = tmp_path / "broken.yaml"
    definition.write_text(BAD_DEFINITION)
    broken = await cli("workflow", "create", "-f", str(definition))
    assert broken.code == 1
    first, *fields = broken.err.splitlines()
    assert first == "opscore: invalid request"
    paths = {line.strip().split(":")[0] for line in fields}
    assert {"definition.tasks[0].next_task_id", "definition.tasks[1].task_id"} <= paths
    assert "definition.tasks[1].agent_capability" in paths

    not_yaml = tmp_path / "broken.json"
    not_yaml.write_text("{not json")
    unreadable = await cli("workflow", "create", "-f", str(not_yaml))
    assert unreadable.code == 1
    assert unreadable.err.splitlines()[1].startswith(f"  {not_yaml}: not valid JSON/YAML")


async def test_server_down_is_unavailable_and_exit_1(offline_cli: Cli, cli: Cli) -> None:
    expected = f"opscore: cannot reach Ops-Core at {offline_cli.address} (UNAVAILABLE)\n"
    results = await asyncio.gather(
        offline_cli("agent", "list"),
        offline_cli("agent", "watch", "--json"),
        offline_cli("session", "watch", "s-1"),
        offline_cli("workflow", "start", "wf", "--wait"),
        # --address wins over OPSCORE_ADDRESS.
        cli("session", "list", "--address", offline_cli.address),
    )
    for result in results:
        assert (result.code, result.out, result.err) == (1, "", expected), str(result)


async def test_bad_usage_exits_2(offline_cli: Cli) -> None:
    """Rejected before any call: the server is not even needed."""
    usages = [
        ("agent", "update-state", "a-1", "OFFLINE"),
        ("agent", "update-state", "a-1", "IDLE", "--details", "[1, 2]"),
        ("agent", "register", "--name", "A", "--meta", "no-equals-sign"),
        ("agent", "list", "--limit", "0"),
        ("session", "list", "--status", "DONE"),
        ("workflow", "start", "wf", "--input", "{not json"),
        ("workflow", "create", "-f", "no/such/file.yaml"),
    ]
    results = await asyncio.gather(*(offline_cli(*args) for args in usages))
    for result in results:
        assert result.code == 2, str(result)
        assert "Traceback" not in result.err and "Usage: opscore" in result.err, str(result)


def test_python_dash_m_opscore_runs_the_same_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "opscore", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("serve", "agent", "workflow", "session"):
        assert command in result.stdout
