"""`opscore agent ...`: the agent registry, state reports and the live agent watch."""

from __future__ import annotations

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
    key_values,
    metavar,
    names,
    one_of,
    page_size,
    run,
    take,
)
from opscore.protocol.enums import REPORTABLE_STATES, AgentState
from opscore.sdk import OpsCoreClient

app: typer.Typer = typer.Typer(help="Register, inspect and watch agents.", no_args_is_help=True)


# Every state, and the ones an agent may report (OFFLINE is decided by the server).
STATE_NAMES = names(s for s in AgentState if s)
REPORTED_NAMES = names(sorted(REPORTABLE_STATES))
STATES, REPORTED_STATES = one_of(STATE_NAMES), one_of(REPORTED_NAMES)


AgentId = Annotated[str, typer.Argument(metavar="AGENT", help="Agent id.")]


@app.command("list")
def list_agents(
    state: Annotated[
        list[str] | None,
        typer.Option(
            parser=STATES,
            metavar=metavar(STATE_NAMES),
            help="Only agents in this state (repeatable).",
        ),
    ] = None,
    capability: Annotated[str, typer.Option(help="Only agents with this capability.")] = "",
    limit: Limit = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """List agents, ordered by id."""
    agents = run(
        address,
        token,
        lambda c: take(c.list_agents(state or (), capability, page_size(limit)), limit),
    )
    render.show(agents, as_json, render.agent_table)


@app.command("get")
def get_agent(
    agent_id: AgentId,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Show one agent."""
    render.show(run(address, token, lambda c: c.get_agent(agent_id)), as_json, render.agent_view)


@app.command("register")
def register(
    name: Annotated[str, typer.Option(help="Display name.")],
    agent_id: Annotated[
        str, typer.Option("--id", help="Agent id; generated when omitted (then not retried).")
    ] = "",
    capability: Annotated[
        list[str] | None, typer.Option(help="A task capability (repeatable).")
    ] = None,
    version: Annotated[str, typer.Option(help="Agent version.")] = "",
    endpoint: Annotated[str, typer.Option(help="Where the agent can be contacted.")] = "",
    meta: Annotated[list[str] | None, typer.Option(help="Metadata key=value (repeatable).")] = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Register an agent (again with the same fields: no change)."""
    metadata = key_values(meta or [])
    agent = run(
        address,
        token,
        lambda c: c.register_agent(
            name, capability or (), agent_id, version, endpoint, metadata=metadata
        ),
    )
    render.show(agent, as_json, render.registered)


@app.command("update-state")
def update_state(
    agent_id: AgentId,
    state: Annotated[
        str,
        typer.Argument(
            parser=REPORTED_STATES,
            metavar="STATE",
            help=f"The state to report: {', '.join(REPORTED_NAMES)}.",
        ),
    ],
    details: Annotated[
        dict[str, Any] | None,
        typer.Option(parser=json_object, metavar="JSON", help="State details, a JSON object."),
    ] = None,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Report an agent's state on its behalf."""
    agent = run(address, token, lambda c: c.update_agent_state(agent_id, state, details))
    render.show(agent, as_json, render.state_updated)


@app.command("watch")
def watch(
    agent: Annotated[
        list[str] | None, typer.Option("--agent", help="Only this agent (repeatable).")
    ] = None,
    capability: Annotated[str, typer.Option(help="Only agents with this capability.")] = "",
    since: Annotated[
        int | None, typer.Option(min=0, metavar="REV", help="Replay events after revision REV.")
    ] = None,
    initial: Annotated[
        bool, typer.Option("--initial", help="Start with every matching agent's current state.")
    ] = False,
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Follow agent changes live until Ctrl-C (--json: one event per line)."""

    async def follow(client: OpsCoreClient) -> None:
        # The SDK's watch retries an unreachable server forever; a listing fails fast.
        await take(client.list_agents(page_size=1), 1)
        events = client.watch_agents(agent or (), capability, since, initial)
        await render.watch_agents(events, as_json)

    run(address, token, follow)
