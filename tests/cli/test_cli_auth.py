"""`opscore keys create`, and the client commands against a server with authentication:
the key from OPSCORE_TOKEN or --token, agent tokens shown once, refusals as one line."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from cli_support import Cli

from opscore.domain.access import digest

if TYPE_CHECKING:
    from conftest import SpawnServer


async def test_keys_and_tokens(spawn_server: SpawnServer, offline_cli: Cli) -> None:
    create = ("keys", "create", "--name")
    admin, viewer, shown, agent = await asyncio.gather(
        offline_cli.json(*create, "ops", "--role", "admin"),
        offline_cli.json(*create, "look", "--role", "VIEWER"),
        offline_cli.ok(*create, "x", "--role", "operator"),
        offline_cli(*create, "a", "--role", "agent"),
    )
    assert admin["key"].startswith("opk_") and admin["sha256"] == digest(admin["key"])
    assert (viewer["name"], viewer["role"]) == ("look", "viewer")
    assert "x:operator:" in shown.out and "{name: x, role: operator, sha256: " in shown.out
    assert agent.code == 2

    keys = ",".join(f"{k['name']}:{k['role']}:{k['sha256']}" for k in (admin, viewer))
    cli = Cli((await spawn_server(OPSCORE_API_KEYS=keys)).address)
    register = ("agent", "register", "--name", "A", "--capability", "x", "--id")
    anonymous, registered, human = await asyncio.gather(
        cli("agent", "list"),
        cli.ok(*register, "a-1", "--json", OPSCORE_TOKEN=admin["key"]),
        cli.ok(*register, "a-2", "--token", admin["key"]),
    )
    assert anonymous.code == 1 and anonymous.out == ""
    assert anonymous.err.startswith("opscore: ")
    assert anonymous.err.endswith(" (give --token or set OPSCORE_TOKEN)\n")
    assert len(anonymous.err.splitlines()) == 1
    assert registered.json()["agent_token"].startswith("oat_")
    assert "Agent token (shown once, give it to the agent): oat_" in human.out

    listed, refused = await asyncio.gather(
        cli.json("agent", "list", "--token", viewer["key"]),
        cli("agent", "register", "--name", "C", "--token", viewer["key"]),
    )
    assert [a["agent_id"] for a in listed] == ["a-1", "a-2"]
    assert refused.code == 1 and len(refused.err.splitlines()) == 1, str(refused)
