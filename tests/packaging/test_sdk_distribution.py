"""The SDK distribution (`sdk/`, opscore-sdk) stands on its own.

Agent authors `pip install opscore-sdk` without the server: importing `opscore.sdk`
must pull in no server module and none of the server's dependencies, and the wheel
must install and run a workflow in a virtualenv that has nothing but that wheel and
its declared dependencies (a missing dependency or a server import only shows there:
the dev venv has both distributions installed).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import SpawnServer

REPO_ROOT = Path(__file__).resolve().parents[2]
PIP = ("-m", "pip", "--quiet", "--disable-pip-version-check")

# Dependencies of the server only (opscore-sdk does not declare them).
SERVER_ONLY = ["pydantic", "pydantic_settings", "typer", "rich", "grpc_reflection", "grpc_health"]
# grpcio's own `grpc/__init__.py` imports these top-level packages when they are installed
# (a backwards-compatibility alias for `grpc.health` / `grpc.reflection`), so in the dev venv
# `import grpc` alone loads them; only their subpackages hold the actual services.
GRPC_ALIASES = {"grpc_health", "grpc_reflection"}

# Run in a fresh interpreter: imports opscore.sdk and reports what got loaded and, for each
# server-only package, which module imported it first.
IMPORT_PROBE = """
import json, sys

watched = sys.argv[1:]
importers = {}


class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name in watched:
            frame = sys._getframe(1)
            while frame.f_code.co_filename.startswith("<frozen importlib"):
                frame = frame.f_back
            importers.setdefault(name, frame.f_globals.get("__name__"))
        return None


sys.meta_path.insert(0, Recorder())
import opscore.sdk

print(json.dumps({
    "opscore": sorted(m for m in sys.modules if m.startswith("opscore.")),
    "loaded": {m: m in sys.modules for m in watched},
    "importers": importers,
    "services": sorted(
        m for m in sys.modules if m.startswith(("grpc_health.", "grpc_reflection."))
    ),
}))
"""

# Run in the SDK-only venv against a spawned server: one task, one agent, one run.
AGENT_SCRIPT = """
import asyncio, json, sys

from opscore.sdk import Agent, OpsCoreClient, TaskContext

ADDRESS = sys.argv[1]
DEFINITION = {
    "id": "packaging-wf",
    "name": "packaging-wf",
    "version": "1",
    "tasks": [{"task_id": "only", "name": "only", "agent_capability": "echo"}],
}


async def main() -> None:
    agent = Agent(ADDRESS, agent_id="packaging-agent")

    @agent.handler("echo")
    async def echo(ctx: TaskContext) -> dict:
        return {"echoed": ctx.input["word"], "attempt": ctx.attempt}

    worker = asyncio.create_task(agent.run())
    try:
        async with OpsCoreClient(ADDRESS, timeout=5) as client:
            await client.create_workflow(DEFINITION)
            session = await client.start_workflow("packaging-wf", input={"word": "hi"})
            done = await asyncio.wait_for(client.wait_session(session.session_id), 30)
    finally:
        agent.stop()
        await asyncio.wait_for(worker, 10)
    print(json.dumps({"status": done.status.name, "error": done.error, "output": done.output}))


asyncio.run(main())
"""


def clean_env() -> dict[str, str]:
    """The environment without anything that could point Python at the repository."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
    return {
        k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("OPSCORE_")
    }


def run(*cmd: str | Path, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Runs a command with a bounded time; fails the test with its output if it fails."""
    proc = subprocess.run(
        [str(part) for part in cmd],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_sdk_import_loads_no_server_module(tmp_path: Path) -> None:
    """The server portion of the `opscore` namespace is importable in the dev venv, so this
    catches an SDK module importing server code (or a server-only dependency)."""
    proc = run(sys.executable, "-I", "-c", IMPORT_PROBE, *SERVER_ONLY, cwd=tmp_path, timeout=60)
    report = json.loads(proc.stdout)

    assert "opscore.sdk" in report["opscore"]
    foreign = [m for m in report["opscore"] if m.split(".")[1] not in {"sdk", "protocol"}]
    assert not foreign, f"import opscore.sdk loaded server modules: {foreign}"

    # pydantic & co. must not load at all; grpcio's alias (importer "grpc") may load the
    # bare grpc_health / grpc_reflection packages, but never their service subpackages.
    by_importer = {m: report["importers"].get(m) for m, on in report["loaded"].items() if on}
    unexpected = {
        m: who for m, who in by_importer.items() if m not in GRPC_ALIASES or who != "grpc"
    }
    assert not unexpected, f"server-only packages loaded, by module: {unexpected}"
    assert not report["services"], f"server-only services loaded: {report['services']}"


def build_wheels(out: Path) -> dict[str, Path]:
    """Builds both wheels as a release would (isolated builds, no dependencies)."""
    for source in (REPO_ROOT / "sdk", REPO_ROOT):
        # An absolute path: a bare `sdk` would be looked up as a project on the index.
        run(sys.executable, *PIP, "wheel", "--no-deps", source, "-w", out, cwd=out, timeout=120)
    built = {path.name.split("-")[0]: path for path in out.glob("*.whl")}
    assert set(built) == {"opscore", "opscore_sdk"}, f"unexpected wheels: {sorted(built)}"
    return built


def check_wheel_contents(sdk_wheel: Path, server_wheel: Path) -> None:
    """Type markers and generated code ship with the SDK; each wheel ships only its half of
    the `opscore` namespace and no `opscore/__init__.py` (that would hide the other half)."""
    with zipfile.ZipFile(sdk_wheel) as wheel:
        sdk_files = set(wheel.namelist())
    with zipfile.ZipFile(server_wheel) as wheel:
        server_files = set(wheel.namelist())

    expected = {"opscore/sdk/py.typed", "opscore/protocol/py.typed", "opspawn/opscore/v1/py.typed"}
    expected |= {
        f"opspawn/opscore/v1/{service}_pb2{suffix}.py"
        for service in ("lifecycle", "session", "workflow")
        for suffix in ("", "_grpc")
    }
    assert expected <= sdk_files, f"missing from the SDK wheel: {sorted(expected - sdk_files)}"
    sdk_halves = {f.split("/")[1] for f in sdk_files if f.startswith("opscore/")}
    server_halves = {f.split("/")[1] for f in server_files if f.startswith("opscore/")}
    assert sdk_halves == {"sdk", "protocol"}, f"SDK wheel ships opscore/{sdk_halves}"
    assert not server_halves & {"sdk", "protocol", "__init__.py"}, sorted(server_halves)
    assert not any(f.startswith("opspawn/") for f in server_files)


async def venv_run(python: Path, *args: str, cwd: Path, within: float) -> tuple[int, str, str]:
    """Runs the fresh venv's python in isolated mode (no cwd, PYTHONPATH or user site on
    sys.path, so nothing from the repository can leak in)."""
    proc = await asyncio.create_subprocess_exec(
        python,
        "-I",
        *args,
        cwd=cwd,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{args} still running after {within}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def sdk_venv(tmp_path: Path) -> Path:
    """Builds the wheels, checks them, and installs the SDK wheel alone into a fresh venv
    (its dependencies come from the index); returns the venv's directory."""
    out = tmp_path / "wheels"
    out.mkdir()
    built = build_wheels(out)
    check_wheel_contents(built["opscore_sdk"], built["opscore"])
    venv = tmp_path / "sdk-venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path, timeout=120)
    run(venv / "bin" / "python", *PIP, "install", built["opscore_sdk"], cwd=tmp_path, timeout=240)
    return venv


@pytest.mark.timeout(300)
async def test_sdk_wheel_installs_and_runs_alone(
    sdk_venv: Path, tmp_path: Path, spawn_server: SpawnServer
) -> None:
    """The wheel's declared dependencies are enough to run an agent and a client against a
    real server, and the server code is really absent from that venv."""
    python = sdk_venv / "bin" / "python"
    code, _, err = await venv_run(python, "-c", "import opscore.server", cwd=tmp_path, within=30)
    assert code != 0 and "ModuleNotFoundError" in err, err
    where = "import opscore.sdk; print(opscore.sdk.__file__)"
    code, out, err = await venv_run(python, "-c", where, cwd=tmp_path, within=30)
    assert code == 0, err
    assert Path(out.strip()).is_relative_to(sdk_venv), out

    server = await spawn_server()
    script = tmp_path / "agent_script.py"
    script.write_text(AGENT_SCRIPT)
    code, out, err = await venv_run(python, str(script), server.address, cwd=tmp_path, within=60)
    assert code == 0, f"agent script failed:\n{err}\nserver log:\n{server.log_tail()}"
    result = json.loads(out.splitlines()[-1])
    assert result["status"] == "COMPLETED", result
    assert result["output"] == {"only": {"echoed": "hi", "attempt": 1}}
