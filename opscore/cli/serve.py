"""`opscore serve`: runs the gRPC server in the foreground."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from opscore.protocol.errors import OpsCoreError


def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on [env OPSCORE_HOST].")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port; 0 picks a free one [OPSCORE_PORT].")
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(help="SQLite file or store URL (sqlite:///path) [OPSCORE_DB]."),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = None,
    keys_file: Annotated[
        Path | None, typer.Option(help="Operator keys file (YAML/JSON) [OPSCORE_KEYS_FILE].")
    ] = None,
    insecure_no_auth: Annotated[
        bool | None,
        typer.Option(
            "--insecure-no-auth",
            help="Serve a non-loopback address without keys [OPSCORE_INSECURE_NO_AUTH].",
        ),
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="Require client certificates from this CA (mTLS).")
    ] = None,
) -> None:
    """Serve the gRPC API until SIGTERM or Ctrl-C."""
    # Imported here: the client commands need none of it and start faster without.
    from opscore.server import logs
    from opscore.server.app import serve as run_server
    from opscore.server.config import load_settings

    try:
        settings = load_settings(
            host=host,
            port=port,
            db=db,
            log_level=log_level,
            keys_file=keys_file,
            insecure_no_auth=insecure_no_auth,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
        )
        logs.configure(settings.log_level)
        asyncio.run(run_server(settings))
    except OpsCoreError as exc:
        typer.echo(f"opscore: {exc.message}", err=True)
        raise typer.Exit(2) from None
