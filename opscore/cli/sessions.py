"""`opscore session ...`: sessions, their history, live watch and cancellation."""

from __future__ import annotations

from typing import Annotated

import typer

from opscore.cli import render
from opscore.cli.common import (
    DEFAULT_ADDRESS,
    Address,
    Json,
    Limit,
    Token,
    metavar,
    names,
    one_of,
    page_size,
    run,
    take,
)
from opscore.protocol.enums import SessionStatus
from opscore.sdk import OpsCoreClient
from opscore.sdk.types import Session

app: typer.Typer = typer.Typer(
    help="Inspect, follow and cancel sessions (workflow runs).", no_args_is_help=True
)


STATUS_NAMES = names(s for s in SessionStatus if s)
STATUSES = one_of(STATUS_NAMES)


SessionId = Annotated[str, typer.Argument(metavar="SESSION", help="Session id.")]


async def follow(client: OpsCoreClient, session: Session, since: int, as_json: bool) -> None:
    """Shows a session's events until it ends (`session watch`, `workflow start --wait`)."""

    async def fetch() -> Session:
        return await client.get_session(session.session_id)

    events = client.watch_session(session.session_id, since)
    await render.follow_session(session, events, fetch, as_json)


@app.command("list")
def list_sessions(
    status: Annotated[
        list[str] | None,
        typer.Option(
            parser=STATUSES,
            metavar=metavar(STATUS_NAMES),
            help="Only sessions with this status (repeatable).",
        ),
    ] = None,
    workflow: Annotated[str, typer.Option(help="Only sessions of this workflow.")] = "",
    agent: Annotated[str, typer.Option(help="Only sessions pinned to this agent.")] = "",
    limit: Limit = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """List sessions, newest first."""
    sessions = run(
        address,
        token,
        lambda c: take(c.list_sessions(status or (), workflow, agent, page_size(limit)), limit),
    )
    render.show(sessions, as_json, render.session_table)


@app.command("get")
@app.command("show", hidden=True)  # the other name operators reach for
def get(
    session_id: SessionId,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Show a session and its tasks."""
    render.show(
        run(address, token, lambda c: c.get_session(session_id)), as_json, render.session_view
    )


@app.command("events")
def events(
    session_id: SessionId,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Show a session's whole history."""
    history = run(address, token, lambda c: take(c.list_session_events(session_id), None))
    render.show(history, as_json, render.event_table)


@app.command("watch")
def watch(
    session_id: SessionId,
    since: Annotated[
        int, typer.Option(min=0, metavar="SEQ", help="Only events after sequence SEQ.")
    ] = 0,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Follow a session's events until it ends (--json: one event per line)."""

    async def go(client: OpsCoreClient) -> None:
        # Fetching first fails fast when the server is down: the SDK's watch would retry.
        await follow(client, await client.get_session(session_id), since, as_json)

    run(address, token, go)


@app.command("cancel")
def cancel(
    session_id: SessionId,
    reason: Annotated[str, typer.Option(help="Why, kept in the history.")] = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Cancel a session that has not ended."""
    session = run(address, token, lambda c: c.cancel_session(session_id, reason))
    render.show(session, as_json, render.session_status)
