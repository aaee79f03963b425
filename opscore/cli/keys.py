"""`opscore keys create`: a new operator key, made locally (no server involved)."""

from __future__ import annotations

from typing import Annotated

import typer

from opscore.cli import render
from opscore.cli.common import Json
from opscore.domain.access import Role, new_operator_key

app: typer.Typer = typer.Typer(help="Make operator keys for authentication.", no_args_is_help=True)


@app.command("create")
def create(
    name: Annotated[str, typer.Option(help="Who or what uses the key (unique).")],
    role: Annotated[Role, typer.Option(case_sensitive=False, help="admin, operator or viewer.")],
    as_json: Json = False,
) -> None:
    """Print a new key (shown once) and the hash-only entry to configure."""
    if role is Role.AGENT:
        raise typer.BadParameter("agents get tokens from `agent register`", param_hint="'--role'")
    key, entry = new_operator_key(name, role)
    created = {"name": entry.name, "role": entry.role.value, "sha256": entry.sha256, "key": key}
    render.show(created, as_json, render.new_key)
