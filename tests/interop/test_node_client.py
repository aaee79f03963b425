"""Cross-language check: a Node.js client (@grpc/grpc-js + @grpc/proto-loader, the
contract loaded from protos/) runs the agent lifecycle and the sample workflow against
a real `opscore serve` process. See agent_flow.mjs for what the client does."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import SpawnServer

INTEROP_DIR = Path(__file__).resolve().parent
NODE_MODULES = INTEROP_DIR / "node_modules"
LOCKFILE = INTEROP_DIR / "package-lock.json"
# Written into node_modules after a successful install: the lockfile it was made from.
INSTALL_STAMP = NODE_MODULES / ".opscore-installed-lock.sha256"
SCRIPT = INTEROP_DIR / "agent_flow.mjs"
INSTALL_TIMEOUT = 600.0
RUN_TIMEOUT = 30.0  # the script gives up by itself after 20 s


def _missing_tool(message: str) -> None:
    """Fails in CI (where the tool must be present), skips elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (required when CI is set)", pytrace=False)
    pytest.skip(f"{message}; install Node.js >= 18 with npm to run the Node.js interop test")


def _lock_digest() -> str:
    source = LOCKFILE if LOCKFILE.exists() else INTEROP_DIR / "package.json"
    return hashlib.sha256(source.read_bytes()).hexdigest()


def node_with_dependencies() -> str:
    """The `node` executable, with the interop dependencies installed in node_modules
    (`npm ci`, again only when package-lock.json changed). Called from the test itself,
    not a fixture, so a missing Node.js in CI is a test failure rather than an error."""
    node_bin = shutil.which("node")
    npm_bin = shutil.which("npm")
    if node_bin is None or npm_bin is None:
        missing = " and ".join(n for n, p in (("node", node_bin), ("npm", npm_bin)) if p is None)
        _missing_tool(f"{missing} not found on PATH")
    assert node_bin is not None and npm_bin is not None

    digest = _lock_digest()
    installed = INSTALL_STAMP.read_text().strip() if INSTALL_STAMP.exists() else None
    if installed != digest:
        command = [npm_bin, "ci" if LOCKFILE.exists() else "install"]
        command += ["--ignore-scripts", "--no-audit", "--no-fund"]
        try:
            result = subprocess.run(
                command,
                cwd=INTEROP_DIR,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(command)}` took over {INSTALL_TIMEOUT}s", pytrace=False)
        if result.returncode != 0:
            pytest.fail(
                f"`{' '.join(command)}` in {INTEROP_DIR} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}",
                pytrace=False,
            )
        INSTALL_STAMP.write_text(digest + "\n")
    return node_bin


async def run_agent_flow(node: str, address: str) -> dict[str, Any]:
    """Runs agent_flow.mjs against `address`; returns its JSON summary line."""
    proc = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        address,
        cwd=INTEROP_DIR,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"agent_flow.mjs still running after {RUN_TIMEOUT}s") from None
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    assert proc.returncode == 0, (
        f"agent_flow.mjs exited with {proc.returncode}\nstderr:\n{stderr}\nstdout:\n{stdout}"
    )
    lines = stdout.strip().splitlines()
    assert lines, f"agent_flow.mjs printed no summary\nstderr:\n{stderr}"
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary


async def test_node_client_runs_the_agent_lifecycle_and_sample_workflow(
    spawn_server: SpawnServer,
) -> None:
    node = node_with_dependencies()
    server = await spawn_server()

    summary = await run_agent_flow(node, server.address)

    assert summary["ok"] is True
    agent_id = summary["agent_id"]
    assert summary["agent_events"] == [
        "AGENT_EVENT_TYPE_SNAPSHOT",
        "AGENT_EVENT_TYPE_SYNCED",
        "AGENT_EVENT_TYPE_STATE_CHANGED",
    ]
    assert summary["definition_created"] is True, "fresh server: the definition is new"
    assert summary["session_status"] == "SESSION_STATUS_COMPLETED"
    assert summary["session_events"] == [
        "SESSION_EVENT_TYPE_CREATED",
        "SESSION_EVENT_TYPE_TASK_QUEUED",
        "SESSION_EVENT_TYPE_TASK_DISPATCHED",
        "SESSION_EVENT_TYPE_TASK_COMPLETED",
        "SESSION_EVENT_TYPE_TASK_QUEUED",
        "SESSION_EVENT_TYPE_TASK_DISPATCHED",
        "SESSION_EVENT_TYPE_TASK_COMPLETED",
        "SESSION_EVENT_TYPE_SESSION_COMPLETED",
    ]
    assert summary["tasks"] == [
        {"task_id": "step_1", "attempt": 1},
        {"task_id": "step_2", "attempt": 1},
    ]
    step_1_output = {
        "task_id": "step_1",
        "handled_by": agent_id,
        "attempt": 1,
        "parameters": {"message": "This is the first step."},
    }
    assert summary["step_2_upstream"] == {"step_1": step_1_output}
    assert summary["session_output"] == {
        "step_2": {
            "task_id": "step_2",
            "handled_by": agent_id,
            "attempt": 1,
            "parameters": {"value": 123},
        }
    }

    # Running it again on the same server: the definition exists (ALREADY_EXISTS is
    # accepted) and a second agent runs a second session.
    again = await run_agent_flow(node, server.address)
    assert again["definition_created"] is False
    assert again["session_status"] == "SESSION_STATUS_COMPLETED"
    assert again["session_id"] != summary["session_id"]
    assert again["agent_id"] != agent_id
