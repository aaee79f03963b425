"""The README's grpcurl walkthroughs, run as written against a real server.

Every `grpcurl` command of README.md's ```sh blocks is run in order, through bash from
the repository root (one uses `$(cat examples/sample_workflow.json)`), against an
`opscore serve` process: `localhost:50051` becomes the server's address and the
placeholders `<token>` / `<session_id>` become values captured from earlier outputs.
Streaming commands run in the background while later commands run. A command shown
with a `$ ` prompt is followed by its sample output, which the real output must match
("..." in a JSON value matches anything). If the README's commands change, STEPS below
must change with them: the README cannot drift from what the server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import ServerProcess, SpawnServer

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
SAMPLE_WORKFLOW = REPO_ROOT / "examples" / "sample_workflow.json"
LIFECYCLE_PROTO = REPO_ROOT / "protos" / "opspawn" / "opscore" / "v1" / "lifecycle.proto"
README_ADDRESS = "localhost:50051"
COMMAND_TIMEOUT = 10.0
WAIT_TIMEOUT = 5.0
SERVICES = {
    "opspawn.opscore.v1.LifecycleService",
    "opspawn.opscore.v1.WorkflowService",
    "opspawn.opscore.v1.SessionService",
}

Json = dict[str, Any]


# --------------------------------------------------------------------------- README parsing


@dataclass
class Command:
    """One grpcurl command of the README: continuation lines joined, newlines inside
    quoted arguments kept."""

    text: str
    # The sample output printed under a `$ `-prompted command (empty otherwise).
    sample_output: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        """The RPC's method name ("RegisterAgent"), or the verb "list" / "describe"."""
        words = shlex.split(self.text)
        verb = next((w for w in words[1:] if w in {"list", "describe"}), None)
        return verb or words[-1].rsplit("/", 1)[-1]


def _quotes_closed(line: str) -> bool:
    try:
        shlex.split(line)
    except ValueError:
        return False
    return True


def readme_commands(markdown: str) -> list[Command]:
    """The grpcurl commands of the ```sh blocks, in order."""
    commands: list[Command] = []
    for block in re.findall(r"^```sh\n(.*?)^```", markdown, flags=re.M | re.S):
        lines = iter(block.splitlines())
        prompted: Command | None = None
        for first in lines:
            line = first
            while line.endswith("\\") or (
                line.startswith(("grpcurl", "$ grpcurl")) and not _quotes_closed(line)
            ):
                following = next(lines, None)
                assert following is not None, f"unterminated command in README: {line}"
                if line.endswith("\\"):  # a continuation line
                    line = line[:-1].rstrip() + " " + following.strip()
                else:  # a newline inside a quoted argument
                    line += "\n" + following
            if line.startswith("$ grpcurl"):
                prompted = Command(line[2:].strip())
                commands.append(prompted)
            elif line.startswith("grpcurl"):
                prompted = None
                commands.append(Command(line))
            elif prompted is not None and line.strip():
                prompted.sample_output.append(line)
    return commands


def grpcurl_path() -> str | None:
    """grpcurl from this virtualenv first, then from PATH."""
    venv_bins = [Path(sys.executable).parent, REPO_ROOT / ".venv" / "bin"]
    search = os.pathsep.join([*map(str, venv_bins), os.environ.get("PATH", "")])
    return shutil.which("grpcurl", path=search)


# --------------------------------------------------------------------------- running commands


@dataclass
class Result:
    """A finished command."""

    command: str
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Json:
        """The single JSON message printed by a successful unary call."""
        assert self.returncode == 0, f"command failed: {self}"
        value: Json = json.loads(self.stdout)
        return value

    def __str__(self) -> str:
        return (
            f"{self.command}\n-> exit {self.returncode}\n"
            f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )


def split_messages(text: str) -> tuple[list[Json], str]:
    """The complete JSON messages at the start of grpcurl's output, and the rest."""
    decoder = json.JSONDecoder()
    messages: list[Json] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        try:
            message, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return messages, text[position:]
        messages.append(message)


class Streaming:
    """A long-lived command (a server stream) whose stdout is read as it arrives."""

    def __init__(self, command: str, proc: asyncio.subprocess.Process) -> None:
        self.command = command
        self.proc = proc
        self.messages: list[Json] = []
        self.stderr = b""
        self._pending = ""
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        stderr = asyncio.create_task(self.proc.stderr.read())
        while chunk := await self.proc.stdout.read(65536):
            messages, self._pending = split_messages(self._pending + chunk.decode())
            self.messages.extend(messages)
            self._changed.set()
        self.stderr = await stderr
        await self.proc.wait()
        self._changed.set()

    @property
    def done(self) -> bool:
        return self._reader.done()

    def describe(self) -> str:
        return (
            f"{self.command}\nmessages so far: {json.dumps(self.messages, indent=1)}\n"
            f"unparsed: {self._pending!r}\nstderr: {self.stderr.decode(errors='replace')}"
        )

    async def wait_for(
        self, check: Callable[[list[Json]], bool], what: str, within: float = WAIT_TIMEOUT
    ) -> list[Json]:
        """Waits until `check(messages so far)` holds."""
        deadline = time.monotonic() + within
        while not check(self.messages):
            assert not self.done, f"stream ended before {what}:\n{self.describe()}"
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {within}s:\n{self.describe()}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.messages

    async def finished(self, within: float = WAIT_TIMEOUT) -> int:
        """Waits for the command to end by itself; returns its exit code."""
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), within)
        except TimeoutError:
            raise AssertionError(f"still running after {within}s:\n{self.describe()}") from None
        assert not self._pending.strip(), f"unparsed output:\n{self.describe()}"
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def stop(self) -> None:
        """Ends the command's process group (it was started in its own session)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 5)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        self._reader.cancel()


class Walkthrough:
    """Runs README commands against one server, with the values captured so far."""

    def __init__(self, grpcurl: str, server: ServerProcess) -> None:
        self.grpcurl = grpcurl
        self.server = server
        self.values: dict[str, str] = {}
        self.streams: dict[str, Streaming] = {}

    def shell_command(self, command: Command, **replace: str) -> str:
        """The README command with our grpcurl, our address and real values."""
        assert command.text.startswith("grpcurl "), command.text
        text = shlex.quote(self.grpcurl) + command.text.removeprefix("grpcurl")
        assert README_ADDRESS in text, f"command does not use {README_ADDRESS}: {text}"
        text = text.replace(README_ADDRESS, self.server.address)
        for placeholder in re.findall(r"<[a-z_]+>", text):
            name = placeholder[1:-1]
            assert name in self.values, f"no value captured yet for {placeholder}: {text}"
            text = text.replace(placeholder, self.values[name])
        for old, new in replace.items():
            assert old in text, f"{old!r} not in {text}"
            text = text.replace(old, new)
        return text

    async def _spawn(self, text: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            text,
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )

    async def run(self, command: Command, **replace: str) -> Result:
        """Runs a command to completion."""
        text = self.shell_command(command, **replace)
        proc = await self._spawn(text)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise AssertionError(f"still running after {COMMAND_TIMEOUT}s: {text}") from None
        assert proc.returncode is not None
        return Result(text, proc.returncode, out.decode(), err.decode())

    async def start(self, name: str, command: Command) -> Streaming:
        """Starts a streaming command in the background (stopped at teardown)."""
        text = self.shell_command(command)
        stream = Streaming(text, await self._spawn(text))
        self.streams[name] = stream
        return stream

    async def close(self) -> None:
        for stream in self.streams.values():
            await stream.stop()


# --------------------------------------------------------------------------- checks


def events(responses: list[Json]) -> list[Json]:
    """The AgentEvents of WatchAgentStates responses, in order."""
    return [event for response in responses for event in response.get("events", [])]


def matches_sample(actual: Any, sample: Any) -> bool:
    """JSON equality where a sample string "..." stands for any value."""
    if sample == "...":
        return True
    if isinstance(sample, dict):
        return (
            isinstance(actual, dict)
            and actual.keys() == sample.keys()
            and all(matches_sample(actual[k], v) for k, v in sample.items())
        )
    if isinstance(sample, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(sample)
            and all(matches_sample(a, s) for a, s in zip(actual, sample, strict=True))
        )
    return bool(actual == sample)


def assert_output_matches_sample(result: Result, sample: list[str]) -> None:
    """The command's output, line by line, is the README's sample output."""
    actual = [line.strip() for line in (result.stdout + result.stderr).splitlines()]
    actual = [line for line in actual if line]
    expected = [line.strip() for line in sample]
    assert len(actual) == len(expected), f"README shows:\n{chr(10).join(sample)}\ngot: {result}"
    for got, want in zip(actual, expected, strict=True):
        detail = re.fullmatch(r"(\d+\))\s+(\{.*\})", want)
        if detail:
            number, sample_json = detail.groups()
            assert got.startswith(number), f"README line {want!r}, got {got!r}"
            got_json = json.loads(got.removeprefix(number).strip())
            assert matches_sample(got_json, json.loads(sample_json)), (
                f"README line {want!r}, got {got!r}"
            )
        else:
            assert got == want, f"README line {want!r}, got {got!r}\n{result}"


def lifecycle_rpcs() -> list[str]:
    """The RPC names of LifecycleService in the contract."""
    proto = LIFECYCLE_PROTO.read_text()
    service = re.search(r"service LifecycleService \{(.*?)\n\}", proto, flags=re.S)
    assert service is not None
    return re.findall(r"rpc (\w+)\(", service.group(1))


def assignment_for(task_id: str, session_id: str) -> Callable[[list[Json]], bool]:
    def check(messages: list[Json]) -> bool:
        return any(m["task_id"] == task_id and m["session_id"] == session_id for m in messages)

    return check


def find_assignment(stream: Streaming, task_id: str, session_id: str) -> Json:
    return next(
        m for m in stream.messages if m["task_id"] == task_id and m["session_id"] == session_id
    )


# --------------------------------------------------------------------------- the steps

Step = Callable[[Walkthrough, Command], Awaitable[None]]


async def list_services(w: Walkthrough, c: Command) -> None:
    result = await w.run(c)
    assert result.returncode == 0, result
    listed = set(result.stdout.split())
    assert {name for name in listed if name.startswith("opspawn.")} == SERVICES, result
    assert "grpc.health.v1.Health" in listed, result


async def describe_lifecycle(w: Walkthrough, c: Command) -> None:
    result = await w.run(c)
    assert result.returncode == 0, result
    assert result.stdout.startswith("opspawn.opscore.v1.LifecycleService is a service:"), result
    described = re.findall(r"rpc (\w+) \(", result.stdout)
    assert sorted(described) == sorted(lifecycle_rpcs()), result


async def health_check(w: Walkthrough, c: Command) -> None:
    assert (await w.run(c)).json() == {"status": "SERVING"}


async def register_summarizer(w: Walkthrough, c: Command) -> None:
    agent = (await w.run(c)).json()
    assert agent["agent_id"] == "summarizer-1", agent
    assert (agent["name"], agent["version"]) == ("Summarizer", "1.2.0"), agent
    assert agent["capabilities"] == ["summarize", "translate"], agent
    assert agent["state"] == "AGENT_STATE_INITIALIZING", agent
    w.values["summarizer_revision"] = agent["revision"]
    # "registering the same agent again with the same fields is a no-op"
    again = (await w.run(c)).json()
    assert again == agent, f"re-registering changed the agent: {agent} -> {again}"


async def watch_history(w: Walkthrough, c: Command) -> None:
    stream = await w.start("watch_history", c)
    await stream.wait_for(
        lambda ms: any(
            e["type"] == "AGENT_EVENT_TYPE_REGISTERED"
            and e["agent"]["agent_id"] == "summarizer-1"
            and e["revision"] == w.values["summarizer_revision"]
            for e in events(ms)
        ),
        "REGISTERED event for summarizer-1",
    )


async def watch_initial_state(w: Walkthrough, c: Command) -> None:
    stream = await w.start("watch_initial", c)
    received = await stream.wait_for(
        lambda ms: any(e["type"] == "AGENT_EVENT_TYPE_SYNCED" for e in events(ms)),
        "SYNCED event",
    )
    initial = events(received)
    assert [e["type"] for e in initial] == [
        "AGENT_EVENT_TYPE_SNAPSHOT",
        "AGENT_EVENT_TYPE_SYNCED",
    ], stream.describe()
    assert initial[0]["agent"]["agent_id"] == "summarizer-1", stream.describe()
    assert "agent" not in initial[1], stream.describe()


async def update_state_busy(w: Walkthrough, c: Command) -> None:
    agent = (await w.run(c)).json()
    assert agent["state"] == "AGENT_STATE_BUSY", agent
    assert agent["state_details"] == {"task": "report-42"}, agent
    for name in ("watch_history", "watch_initial"):
        await w.streams[name].wait_for(
            lambda ms: any(
                e["type"] == "AGENT_EVENT_TYPE_STATE_CHANGED"
                and e["revision"] == agent["revision"]
                and e["agent"]["state"] == "AGENT_STATE_BUSY"
                for e in events(ms)
            ),
            f"STATE_CHANGED (BUSY) on {name}",
        )


async def heartbeat(w: Walkthrough, c: Command) -> None:
    response = (await w.run(c)).json()
    assert response["state"] == "AGENT_STATE_BUSY", response
    assert response["liveness_timeout_seconds"] == 30, response
    assert "server_time" in response, response


async def list_agents(w: Walkthrough, c: Command) -> None:
    response = (await w.run(c)).json()
    agents = response["agents"]
    assert [a["agent_id"] for a in agents] == ["summarizer-1"], response
    assert agents[0]["state"] == "AGENT_STATE_BUSY", response
    assert "next_page_token" not in response, response


async def update_state_offline_refused(w: Walkthrough, c: Command) -> None:
    assert c.sample_output, "the error example should show its output"
    result = await w.run(c)
    assert result.returncode != 0, result
    assert "Code: InvalidArgument" in result.stderr, result
    assert "type.googleapis.com/google.rpc.BadRequest" in result.stderr, result
    assert_output_matches_sample(result, c.sample_output)


async def create_definition(w: Walkthrough, c: Command) -> None:
    definition = (await w.run(c)).json()
    sample = json.loads(SAMPLE_WORKFLOW.read_text())
    assert definition["id"] == sample["id"] == "sample_workflow_id", definition
    assert definition["version"] == sample["version"], definition
    tasks = definition["tasks"]
    assert [t["task_id"] for t in tasks] == ["step_1", "step_2"], definition
    assert tasks[0]["next_task_id"] == "step_2", definition
    assert [t["parameters"] for t in tasks] == [t["parameters"] for t in sample["tasks"]]
    assert all(t["timeout"] == "60s" for t in tasks), definition


async def register_worker(w: Walkthrough, c: Command) -> None:
    agent = (await w.run(c)).json()
    assert agent["agent_id"] == "worker-1", agent
    assert agent["capabilities"] == ["test_capability", "another_capability"], agent
    assert agent["state"] == "AGENT_STATE_INITIALIZING", agent


async def stream_tasks(w: Walkthrough, c: Command) -> None:
    await w.start("tasks", c)
    # "opening the stream makes an INITIALIZING agent IDLE"
    await w.streams["watch_history"].wait_for(
        lambda ms: any(
            e["type"] == "AGENT_EVENT_TYPE_STATE_CHANGED"
            and e["agent"]["agent_id"] == "worker-1"
            and e["agent"]["state"] == "AGENT_STATE_IDLE"
            for e in events(ms)
        ),
        "worker-1 becoming IDLE when its task stream opens",
    )


async def start_workflow(w: Walkthrough, c: Command) -> None:
    session = (await w.run(c)).json()
    session_id = session["session_id"]
    assert session["workflow_definition_id"] == "sample_workflow_id", session
    assert session["input"] == {"doc": "q3-report"}, session
    assert session["status"] in {"SESSION_STATUS_PENDING", "SESSION_STATUS_RUNNING"}, session
    # "a retry with the same request_id returns the same session"
    again = (await w.run(c)).json()
    assert again["session_id"] == session_id, again
    w.values["session_id"] = session_id
    w.values["start_command"] = c.text

    tasks = w.streams["tasks"]
    await tasks.wait_for(assignment_for("step_1", session_id), "step_1 assignment")
    step_1 = find_assignment(tasks, "step_1", session_id)
    assert step_1["workflow_id"] == "sample_workflow_id", step_1
    assert step_1["attempt"] == 1, step_1
    assert step_1["payload"] == {
        "parameters": {"message": "This is the first step."},
        "input": {"doc": "q3-report"},
        "upstream": {},
    }, step_1
    w.values["token"] = step_1["task_token"]


async def complete_tasks(w: Walkthrough, c: Command) -> None:
    """Completes step_1 with the README command, then step_2 "the same way"."""
    session_id = w.values["session_id"]
    tasks = w.streams["tasks"]
    w.values["complete_command"] = c.text
    assert (await w.run(c)).json() == {}

    await tasks.wait_for(assignment_for("step_2", session_id), "step_2 assignment")
    step_2 = find_assignment(tasks, "step_2", session_id)
    assert step_2["payload"]["upstream"] == {"step_1": {"summary": "ok"}}, step_2
    assert step_2["payload"]["parameters"] == {"value": 123}, step_2
    w.values["token"] = step_2["task_token"]
    assert (await w.run(c)).json() == {}


async def watch_session(w: Walkthrough, c: Command) -> None:
    stream = await w.start("watch_session", c)
    assert await stream.finished() == 0, stream.describe()
    history = stream.messages
    assert [e["sequence"] for e in history] == [str(n) for n in range(1, len(history) + 1)]
    assert [(e["type"], e.get("task_id")) for e in history] == [
        ("SESSION_EVENT_TYPE_CREATED", None),
        ("SESSION_EVENT_TYPE_TASK_QUEUED", "step_1"),
        ("SESSION_EVENT_TYPE_TASK_DISPATCHED", "step_1"),
        ("SESSION_EVENT_TYPE_TASK_COMPLETED", "step_1"),
        ("SESSION_EVENT_TYPE_TASK_QUEUED", "step_2"),
        ("SESSION_EVENT_TYPE_TASK_DISPATCHED", "step_2"),
        ("SESSION_EVENT_TYPE_TASK_COMPLETED", "step_2"),
        ("SESSION_EVENT_TYPE_SESSION_COMPLETED", None),
    ], stream.describe()


async def get_session(w: Walkthrough, c: Command) -> None:
    session = (await w.run(c)).json()
    assert session["session_id"] == w.values["session_id"], session
    assert session["status"] == "SESSION_STATUS_COMPLETED", session
    assert session["output"] == {"step_2": {"summary": "ok"}}, session
    assert [(t["task_id"], t["status"], t["agent_id"]) for t in session["tasks"]] == [
        ("step_1", "TASK_STATUS_COMPLETED", "worker-1"),
        ("step_2", "TASK_STATUS_COMPLETED", "worker-1"),
    ], session
    assert "ended_at" in session, session


async def list_running_sessions(w: Walkthrough, c: Command) -> None:
    """The first run is over; a second one (request_id run-2) is RUNNING once its first
    task is dispatched. It is the one the CancelSession command then cancels."""
    start = w.values["start_command"]
    request_id = re.search(r'"request_id": "[^"]*"', start)
    assert request_id is not None, start
    second = (await w.run(Command(start), **{request_id[0]: '"request_id": "run-2"'})).json()
    second_id = second["session_id"]
    assert second_id != w.values["session_id"], second
    await w.streams["tasks"].wait_for(
        assignment_for("step_1", second_id), "step_1 assignment of the second run"
    )
    response = (await w.run(c)).json()
    sessions = response["sessions"]
    assert [(s["session_id"], s["status"]) for s in sessions] == [
        (second_id, "SESSION_STATUS_RUNNING")
    ], response
    w.values["session_id"] = second_id


async def cancel_session(w: Walkthrough, c: Command) -> None:
    session = (await w.run(c)).json()
    assert session["session_id"] == w.values["session_id"], session
    assert session["status"] == "SESSION_STATUS_CANCELLED", session
    assert session["error"] == "not needed", session
    assert [(t["task_id"], t["status"]) for t in session["tasks"]] == [
        ("step_1", "TASK_STATUS_CANCELLED"),
        ("step_2", "TASK_STATUS_CANCELLED"),
    ], session
    # "its late completion is refused": the README's CompleteTask, with step_1's token.
    w.values["token"] = find_assignment(w.streams["tasks"], "step_1", session["session_id"])[
        "task_token"
    ]
    late = await w.run(Command(w.values["complete_command"]))
    assert late.returncode != 0, late
    assert "Code: FailedPrecondition" in late.stderr, late
    assert '"reason":"ATTEMPT_ENDED"' in late.stderr, late


# The README's grpcurl commands, in order, and what each must do.
STEPS: list[tuple[str, Step]] = [
    ("list", list_services),
    ("describe", describe_lifecycle),
    ("Check", health_check),
    ("RegisterAgent", register_summarizer),
    ("WatchAgentStates", watch_history),
    ("WatchAgentStates", watch_initial_state),
    ("UpdateAgentState", update_state_busy),
    ("Heartbeat", heartbeat),
    ("ListAgents", list_agents),
    ("UpdateAgentState", update_state_offline_refused),
    ("CreateWorkflowDefinition", create_definition),
    ("RegisterAgent", register_worker),
    ("StreamTasks", stream_tasks),
    ("StartWorkflow", start_workflow),
    ("CompleteTask", complete_tasks),
    ("WatchSession", watch_session),
    ("GetSession", get_session),
    ("ListSessions", list_running_sessions),
    ("CancelSession", cancel_session),
]


def test_readme_commands_are_the_ones_this_test_runs() -> None:
    commands = readme_commands(README.read_text())
    assert [c.method for c in commands] == [method for method, _ in STEPS], (
        "README.md's grpcurl commands changed; update STEPS in this test to match:\n"
        + "\n".join(c.text for c in commands)
    )
    placeholders = {p for c in commands for p in re.findall(r"<[a-z_]+>", c.text)}
    assert placeholders == {"<token>", "<session_id>"}, placeholders


async def test_readme_walkthrough_runs_against_a_real_server(spawn_server: SpawnServer) -> None:
    grpcurl = grpcurl_path()
    if grpcurl is None:
        message = "grpcurl not found in the virtualenv or on PATH (pip install -e '.[dev]')"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    commands = readme_commands(README.read_text())
    assert [c.method for c in commands] == [method for method, _ in STEPS]
    server = await spawn_server()
    walkthrough = Walkthrough(grpcurl, server)
    try:
        for command, (_, step) in zip(commands, STEPS, strict=True):
            await step(walkthrough, command)
    finally:
        await walkthrough.close()
