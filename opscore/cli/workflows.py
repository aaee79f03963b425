"""`opscore workflow ...`: workflow definitions and starting sessions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from opscore.cli import render
from opscore.cli.common import (
    DEFAULT_ADDRESS,
    Address,
    Json,
    Limit,
    Token,
    json_object,
    page_size,
    run,
    take,
)
from opscore.cli.sessions import follow
from opscore.protocol.enums import SessionStatus
from opscore.sdk import OpsCoreClient
from opscore.sdk.types import Session

app: typer.Typer = typer.Typer(
    help="Store workflow definitions and start sessions.", no_args_is_help=True
)

WorkflowId = Annotated[str, typer.Argument(metavar="WORKFLOW", help="Workflow definition id.")]
Version = Annotated[str, typer.Option(help="Definition version; the newest when omitted.")]


@app.command("create")
def create(
    file: Annotated[
        Path,
        typer.Option(
            "--file", "-f", exists=True, dir_okay=False, help="Definition file, JSON or YAML."
        ),
    ],
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Store a workflow definition from a file."""
    render.show(run(address, token, lambda c: c.create_workflow(file)), as_json, render.created)


@app.command("list")
def list_workflows(
    limit: Limit = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """List workflow definitions, ordered by id and version."""
    definitions = run(
        address, token, lambda c: take(c.list_workflow_definitions(page_size(limit)), limit)
    )
    render.show(definitions, as_json, render.definition_table)


@app.command("get")
def get(
    workflow_id: WorkflowId,
    version: Version = "",
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Show a workflow definition and its tasks."""
    definition = run(address, token, lambda c: c.get_workflow_definition(workflow_id, version))
    render.show(definition, as_json, render.definition_view)


@app.command("start")
def start(
    workflow_id: WorkflowId,
    version: Version = "",
    input: Annotated[
        dict[str, Any] | None,
        typer.Option(parser=json_object, metavar="JSON", help="Session input, a JSON object."),
    ] = None,
    agent: Annotated[str, typer.Option(help="Run every task on this agent.")] = "",
    request_id: Annotated[
        str | None, typer.Option(help="Idempotency key: a repeat returns the same session.")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Return when the session has ended: exit 0 if it COMPLETED, 1 if it "
            "FAILED or was CANCELLED. Shows its events as they happen, or with --json "
            "only the final session.",
        ),
    ] = False,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Start a session of a stored workflow."""

    async def go(client: OpsCoreClient) -> Session:
        # With --json nothing is shown before the end: one start-and-await call.
        session = await client.start_workflow(
            workflow_id,
            version=version,
            input=input,
            agent_id=agent,
            request_id=request_id,
            wait=wait and as_json,
        )
        if not wait or as_json:
            return session
        render.show(session, False, render.started)
        await follow(client, session, since=0, as_json=False)
        return await client.get_session(session.session_id)

    session = run(address, token, go)
    render.show(session, as_json, render.session_status if wait else render.started)
    if wait and session.status is not SessionStatus.COMPLETED:
        reason = f": {session.error}" if session.error else ""
        render.fail(f"session {session.session_id} ended {session.status.name}{reason}")
        raise typer.Exit(1)
