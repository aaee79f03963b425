"""`opscore serve`: runs the gRPC server in the foreground."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from opscore import logs
from opscore.config import load_settings
from opscore.errors import OpsCoreError


def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on [env OPSCORE_HOST].")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port; 0 picks a free one [OPSCORE_PORT].")
    ] = None,
    db: Annotated[Path | None, typer.Option(help="SQLite database file [OPSCORE_DB].")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = None,
) -> None:
    """Serve the gRPC API until SIGTERM or Ctrl-C."""
    from opscore.server import serve as run_server

    try:
        settings = load_settings(host=host, port=port, db=db, log_level=log_level)
        logs.configure(settings.log_level)
        asyncio.run(run_server(settings))
    except OpsCoreError as exc:
        typer.echo(f"opscore: {exc.message}", err=True)
        raise typer.Exit(2) from None
