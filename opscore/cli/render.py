"""Everything the CLI prints: rich tables and live views for people, JSON for scripts,
and one-line errors, so the commands themselves stay a few lines each."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from opscore.protocol.enums import AgentEventType, WaitingReason
from opscore.protocol.errors import InvalidArgumentError, OpsCoreError, UnauthenticatedError
from opscore.sdk import DeadlineExceededError, UnavailableError
from opscore.sdk.types import (
    Agent,
    AgentEvent,
    Session,
    SessionEvent,
    SessionTask,
    WorkflowDefinition,
)

T = TypeVar("T")

# Width for output that is not a terminal (pipes, files): whole lines for grep
# instead of rich's 80-column default.
PIPE_WIDTH = 250
RECENT_EVENTS = 8

# Colours by enum member name, shared by agent states, session and task statuses.
STYLES = {
    "INITIALIZING": "blue",
    "IDLE": "green",
    "BUSY": "yellow",
    "ERROR": "bold red",
    "DRAINING": "magenta",
    "OFFLINE": "dim",
    "PENDING": "blue",
    "DISPATCHED": "cyan",
    "RUNNING": "yellow",
    "RETRY_WAIT": "magenta",
    "COMPLETED": "green",
    "FAILED": "bold red",
    "CANCELLED": "dim",
    "REGISTERED": "green",
    "DEREGISTERED": "dim",
    "SESSION_COMPLETED": "bold green",
    "SESSION_FAILED": "bold red",
    "SESSION_CANCELLED": "bold",
    "TASK_COMPLETED": "green",
    "TASK_FAILED": "red",
    "TASK_LEASE_EXPIRED": "magenta",
    "TASK_TIMED_OUT": "magenta",
    "TASK_ANSWER_REFUSED": "yellow",
    "TASK_RETRY_SCHEDULED": "magenta",
}


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


out = _console()


# --------------------------------------------------------------------------- output


def jsonable(value: Any) -> Any:
    """SDK values as JSON: dataclasses as objects, enums by name, times in ISO 8601."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def show(value: T, as_json: bool, view: Callable[[T], RenderableType]) -> None:
    """Prints one result: a JSON document, or `view(value)` for people."""
    if as_json:
        sys.stdout.write(json.dumps(jsonable(value), indent=2, ensure_ascii=False) + "\n")
    else:
        out.print(view(value))
    # Now rather than at exit, so a closed pipe is reported while Typer handles it.
    sys.stdout.flush()


def json_line(value: Any) -> None:
    """One compact JSON object per line, flushed at once so `| jq` sees it live."""
    sys.stdout.write(json.dumps(jsonable(value), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def error(exc: OpsCoreError, address: str) -> None:
    """`opscore: <what went wrong>` on stderr; field violations follow one per line."""
    if isinstance(exc, UnavailableError):
        lines = [f"cannot reach Ops-Core at {address} (UNAVAILABLE)"]
    elif isinstance(exc, DeadlineExceededError):
        lines = [f"Ops-Core at {address} did not answer in time (DEADLINE_EXCEEDED)"]
    elif isinstance(exc, UnauthenticatedError):
        lines = [f"{exc.message} (give --token or set OPSCORE_TOKEN)"]
    elif isinstance(exc, InvalidArgumentError) and exc.violations:
        lines = ["invalid request"] + [f"  {v.field}: {v.description}" for v in exc.violations]
    else:
        lines = [exc.message]
    fail(*lines)


def fail(first: str, *more: str) -> None:
    typer.echo(typer.style("opscore:", fg="red", bold=True) + " " + first, err=True)
    for line in more:
        typer.echo(line, err=True)


# --------------------------------------------------------------------------- pieces


def badge(value: enum.Enum) -> Text:
    return Text(value.name, style=STYLES.get(value.name, ""))


def when(moment: datetime | None, precise: bool = False) -> str:
    """Local time; milliseconds for events, which often share a second."""
    if moment is None:
        return "-"
    local = moment.astimezone()
    if precise:
        return local.strftime("%H:%M:%S.%f")[:-3]
    return local.strftime("%Y-%m-%d %H:%M:%S")


def compact(value: dict[str, Any] | None) -> str:
    return json.dumps(value, ensure_ascii=False) if value else ""


def _table(*columns: str) -> Table:
    return Table(*columns, header_style="bold")


def _fields(rows: Iterable[tuple[str, RenderableType]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in rows:
        grid.add_row(name, value)
    return grid


def _none(what: str) -> Text:
    return Text(f"No {what}.", style="dim")


# --------------------------------------------------------------------------- agents


def agent_table(agents: Sequence[Agent]) -> RenderableType:
    if not agents:
        return _none("agents")
    table = _table(
        "AGENT", "NAME", "STATE", "CONNECTED", "CAPABILITIES", "VERSION", "LAST CONTACT", "REV"
    )
    for a in agents:
        table.add_row(
            a.agent_id,
            a.name,
            badge(a.state),
            connection(a),
            ", ".join(a.capabilities),
            a.version,
            when(a.last_contact_at or a.last_heartbeat_at),
            str(a.revision),
        )
    return table


def connection(a: Agent) -> str:
    """Whether the agent has a task stream open on the server, and its free slots."""
    return f"yes, {a.free_slots} free" if a.connected else "no"


def agent_view(a: Agent) -> RenderableType:
    return _fields(
        [
            ("Agent", a.agent_id),
            ("Name", a.name),
            ("State", badge(a.state)),
            ("Details", compact(a.state_details)),
            ("Capabilities", ", ".join(a.capabilities)),
            ("Version", a.version),
            ("Endpoint", a.contact_endpoint),
            ("Metadata", ", ".join(f"{k}={v}" for k, v in a.metadata.items())),
            ("Registered", when(a.registered_at)),
            ("State updated", when(a.state_updated_at)),
            ("Connected", connection(a)),
            ("Last contact", when(a.last_contact_at or a.last_heartbeat_at)),
            ("Last heartbeat", when(a.last_heartbeat_at)),
            ("Revision", str(a.revision)),
        ]
    )


def registered(a: Agent) -> Text:
    line = Text.assemble(
        "Registered agent ", (a.agent_id, "bold"), " (", badge(a.state), f", revision {a.revision})"
    )
    if a.agent_token:  # issued once, on first registration with authentication on
        line.append(f"\nAgent token (shown once, give it to the agent): {a.agent_token}")
    return line


def state_updated(a: Agent) -> Text:
    return Text.assemble(
        "Agent ", (a.agent_id, "bold"), " is ", badge(a.state), f" (revision {a.revision})"
    )


def agent_event_line(e: AgentEvent) -> Text:
    if e.agent is None:
        return Text(f"{e.revision:>6}  {when(e.occurred_at, True)}  {e.type.name}", style="dim")
    return Text.assemble(
        f"{e.revision:>6}  {when(e.occurred_at, True)}  ",
        badge(e.type),
        f"  {e.agent.agent_id}  ",
        badge(e.agent.state),
    )


class AgentBoard:
    """The live agent view: every agent seen so far, and the latest changes."""

    def __init__(self) -> None:
        self.agents: dict[str, Agent] = {}
        self.recent: deque[AgentEvent] = deque(maxlen=RECENT_EVENTS)
        self.revision = 0

    def apply(self, event: AgentEvent) -> None:
        self.revision = max(self.revision, event.revision)
        if event.type is not AgentEventType.SNAPSHOT:
            self.recent.append(event)
        if event.agent is None:
            return
        if event.type is AgentEventType.DEREGISTERED:
            self.agents.pop(event.agent.agent_id, None)
        else:
            self.agents[event.agent.agent_id] = event.agent

    def __rich__(self) -> RenderableType:
        status = Text(
            f"revision {self.revision} · {len(self.agents)} agents · Ctrl-C to stop", style="dim"
        )
        agents = [self.agents[k] for k in sorted(self.agents)]
        return Group(agent_table(agents), status, *map(agent_event_line, self.recent))


async def watch_agents(events: AsyncIterator[AgentEvent], as_json: bool) -> None:
    """Follows agent events until interrupted: JSON lines, a live board on a terminal,
    or one line per event when piped."""
    if as_json:
        async for event in events:
            json_line(event)
    elif not out.is_interactive:
        async for event in events:
            out.print(agent_event_line(event))
    else:
        board = AgentBoard()
        with Live(board, console=out, auto_refresh=False) as live:
            live.refresh()
            async for event in events:
                board.apply(event)
                live.refresh()


# --------------------------------------------------------------------------- keys


def new_key(created: dict[str, str]) -> Text:
    name, role, sha256 = created["name"], created["role"], created["sha256"]
    return Text.assemble(
        ("Key (shown once, store it now): ", "bold"),
        created["key"],
        "\nFor the keys file (OPSCORE_KEYS_FILE):\n",
        f"  - {{name: {name}, role: {role}, sha256: {sha256}}}",
        "\nOr in OPSCORE_API_KEYS:\n",
        f"  {name}:{role}:{sha256}",
    )


# --------------------------------------------------------------------------- workflows


def definition_table(definitions: Sequence[WorkflowDefinition]) -> RenderableType:
    if not definitions:
        return _none("workflow definitions")
    table = _table("WORKFLOW", "VERSION", "NAME", "TASKS", "CREATED")
    for d in definitions:
        table.add_row(d.id, d.version, d.name, str(len(d.tasks)), when(d.created_at))
    return table


def definition_view(d: WorkflowDefinition) -> RenderableType:
    tasks = _table("TASK", "NAME", "CAPABILITY", "DEPENDS ON", "NEXT", "TIMEOUT", "PARAMETERS")
    for t in d.tasks:
        tasks.add_row(
            t.task_id,
            t.name,
            t.agent_capability,
            ", ".join(t.depends_on),
            t.next_task_id,
            f"{t.timeout:g}s" if t.timeout else "",
            compact(t.parameters),
        )
    header = _fields(
        [
            ("Workflow", d.id),
            ("Version", d.version),
            ("Name", d.name),
            ("Description", d.description),
            ("Created", when(d.created_at)),
        ]
    )
    return Group(header, tasks)


def created(d: WorkflowDefinition) -> Text:
    return Text.assemble(
        "Created workflow ", (d.id, "bold"), f" version {d.version} ({len(d.tasks)} tasks)"
    )


# --------------------------------------------------------------------------- sessions


def session_table(sessions: Sequence[Session]) -> RenderableType:
    if not sessions:
        return _none("sessions")
    table = _table("SESSION", "WORKFLOW", "VERSION", "STATUS", "AGENT", "CREATED", "ENDED")
    for s in sessions:
        table.add_row(
            s.session_id,
            s.workflow_definition_id,
            s.workflow_definition_version,
            badge(s.status),
            s.agent_id,
            when(s.created_at),
            when(s.ended_at),
        )
    return table


def session_tasks(s: Session) -> Table:
    table = _table("TASK", "CAPABILITY", "STATUS", "ATTEMPT", "AGENT", "UPDATED", "RESULT")
    for t in s.tasks:
        table.add_row(
            t.task_id,
            t.agent_capability,
            badge(t.status),
            f"{t.attempt}/{t.max_attempts}" if t.max_attempts else str(t.attempt),
            t.agent_id,
            when(t.updated_at),
            _task_result(t),
        )
    return table


def _task_result(t: SessionTask) -> RenderableType:
    """What came of the task, or why it still waits."""
    if t.waiting_reason is not WaitingReason.UNSPECIFIED:
        return Text(f"waiting: {t.waiting_message}", style="magenta")
    return Text(t.error, style="red") if t.error else compact(t.output)


def session_view(s: Session) -> RenderableType:
    header = _fields(
        [
            ("Session", s.session_id),
            ("Workflow", f"{s.workflow_definition_id} version {s.workflow_definition_version}"),
            ("Status", badge(s.status)),
            ("Agent", s.agent_id),
            ("Input", compact(s.input)),
            ("Output", compact(s.output)),
            ("Error", Text(s.error, style="red")),
            ("Created", when(s.created_at)),
            ("Ended", when(s.ended_at)),
        ]
    )
    return Group(header, session_tasks(s))


def started(s: Session) -> Text:
    return Text.assemble(
        "Started session ",
        (s.session_id, "bold"),
        f" of {s.workflow_definition_id} version {s.workflow_definition_version} (",
        badge(s.status),
        ")",
    )


def session_status(s: Session) -> Text:
    return Text.assemble("Session ", (s.session_id, "bold"), " is ", badge(s.status))


def event_table(events: Sequence[SessionEvent]) -> RenderableType:
    if not events:
        return _none("events")
    table = _table("SEQ", "TIME", "EVENT", "TASK", "ATTEMPT", "AGENT", "DETAIL")
    for e in events:
        table.add_row(
            str(e.sequence),
            when(e.occurred_at, True),
            badge(e.type),
            e.task_id,
            str(e.attempt or ""),
            e.agent_id,
            compact(e.detail),
        )
    return table


def session_event_line(e: SessionEvent) -> Text:
    attempt = f" attempt {e.attempt}" if e.attempt else ""
    task = f"  {e.task_id}{attempt}" if e.task_id else ""
    agent = f"  agent {e.agent_id}" if e.agent_id else ""
    detail = f"  {compact(e.detail)}" if e.detail else ""
    return Text.assemble(
        f"{e.sequence:>4}  {when(e.occurred_at, True)}  ", badge(e.type), task + agent + detail
    )


class SessionBoard:
    """The live session view: the session and its tasks as now, and the latest events."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.recent: deque[SessionEvent] = deque(maxlen=RECENT_EVENTS)

    def __rich__(self) -> RenderableType:
        return Group(
            session_status(self.session),
            session_tasks(self.session),
            *map(session_event_line, self.recent),
        )


async def follow_session(
    session: Session,
    events: AsyncIterator[SessionEvent],
    fetch: Callable[[], Awaitable[Session]],
    as_json: bool,
) -> None:
    """Follows a session until its terminal event: JSON lines, a live view on a terminal
    (the session is fetched again after each event), or one line per event when piped."""
    if as_json:
        async for event in events:
            json_line(event)
    elif not out.is_interactive:
        async for event in events:
            out.print(session_event_line(event))
    else:
        board = SessionBoard(session)
        with Live(board, console=out, auto_refresh=False) as live:
            live.refresh()
            async for event in events:
                board.recent.append(event)
                board.session = await fetch()
                live.refresh()
