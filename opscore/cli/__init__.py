"""The `opscore` command line: `serve` runs the server; `agent`, `workflow` and
`session` operate one through the SDK client; `keys` makes operator keys."""

from __future__ import annotations

import typer

from opscore.cli import agents, keys, sessions, workflows
from opscore.cli.serve import serve

app = typer.Typer(
    help="Ops-Core: a gRPC control plane for fleets of AI agents.", no_args_is_help=True
)


@app.callback()
def _root() -> None:
    """Ops-Core command line."""


app.command()(serve)
app.add_typer(agents.app, name="agent")
app.add_typer(workflows.app, name="workflow")
app.add_typer(sessions.app, name="session")
app.add_typer(keys.app, name="keys")


def main() -> None:
    app()
