"""Safe defaults: without operator keys the server serves loopback only, says loudly
that authentication is off, and refuses a public address unless told otherwise."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from opspawn.opscore.v1 import lifecycle_pb2, lifecycle_pb2_grpc
from security_support import Keys

from opscore.domain.clock import FakeClock
from opscore.protocol.errors import ConfigurationError
from opscore.server.app import OpsCoreServer
from opscore.server.config import Settings

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
AUTH_OFF = "AUTHENTICATION IS OFF"


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OPSCORE_")}
    return {**base, **extra}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "192.0.2.10", "ops.example.com"])
def test_public_host_without_keys_is_refused(settings: Settings, db_file: Path, host: str) -> None:
    """No keys on a non-loopback address: construction fails naming --insecure-no-auth."""
    with pytest.raises(ConfigurationError) as info:
        OpsCoreServer(settings.model_copy(update={"host": host}), FakeClock())
    assert "--insecure-no-auth" in info.value.message
    assert not db_file.exists(), "nothing is created before refusing"


def test_public_host_with_keys_is_accepted(settings: Settings) -> None:
    """With operator keys configured a public address needs no override."""
    cfg = settings.model_copy(update={"host": "0.0.0.0", "api_keys": Keys.fresh().api_keys})
    assert OpsCoreServer(cfg, FakeClock()).authenticator.enabled


async def test_insecure_no_auth_starts_on_public_host(
    start_server: Any, settings: Settings, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """insecure_no_auth=True serves 0.0.0.0 without keys, warning that auth is off."""
    caplog.set_level(logging.WARNING, logger="opscore")
    cfg = settings.model_copy(update={"host": "0.0.0.0", "insecure_no_auth": True})
    server = await start_server(cfg, clock)
    assert not server.authenticator.enabled
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await lifecycle_pb2_grpc.LifecycleServiceStub(channel).ListAgents(
            lifecycle_pb2.ListAgentsRequest()
        )
    assert any(AUTH_OFF in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_loopback_without_keys_warns(
    start_server: Any,
    settings: Settings,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    host: str,
) -> None:
    """On loopback without keys the server starts and logs a WARNING that auth is off."""
    caplog.set_level(logging.WARNING, logger="opscore")
    server = await start_server(settings.model_copy(update={"host": host}), clock)
    assert not server.authenticator.enabled
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(AUTH_OFF in r.getMessage() for r in warnings), [r.getMessage() for r in warnings]


def test_ipv6_loopback_counts_as_loopback(settings: Settings) -> None:
    """::1 (bare or bracketed) is loopback: no keys needed."""
    for host in ("::1", "[::1]"):
        OpsCoreServer(settings.model_copy(update={"host": host}), FakeClock())


async def test_keys_configured_no_warning(
    start_server: Any, settings: Settings, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """With keys the auth-off warning is not logged."""
    caplog.set_level(logging.WARNING, logger="opscore")
    await start_server(settings.model_copy(update={"api_keys": Keys.fresh().api_keys}), clock)
    assert not any(AUTH_OFF in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "bad",
    ["ops:admin:nothex", "ops:root:" + "0" * 64, "just-a-name", "a:admin:{0},a:viewer:{0}"],
)
def test_bad_api_keys_refuse_to_start(settings: Settings, bad: str) -> None:
    """Malformed OPSCORE_API_KEYS (bad hash, unknown role, shape, duplicate) fails fast."""
    with pytest.raises(ConfigurationError):
        OpsCoreServer(settings.model_copy(update={"api_keys": bad.format("ab" * 32)}), FakeClock())


def test_agent_role_cannot_be_an_operator_key(settings: Settings) -> None:
    """An operator key may not claim the agent role."""
    with pytest.raises(ConfigurationError):
        OpsCoreServer(settings.model_copy(update={"api_keys": "k:agent:" + "ab" * 32}), FakeClock())


def test_cli_refuses_public_host_with_one_line_error(tmp_path: Path) -> None:
    """`opscore serve --host 0.0.0.0` without keys exits non-zero with one line, no traceback."""
    db = tmp_path / "public.db"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "opscore",
            "serve",
            *("--host", "0.0.0.0", "--port", "0"),
            "--db",
            str(db),
        ],
        cwd=REPO_ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "--insecure-no-auth" in lines[0]
    assert not db.exists()


def test_cli_broken_keys_file_one_line_error(tmp_path: Path) -> None:
    """A broken keys file makes `opscore serve` exit non-zero with one line, no traceback."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys: [{name: a, role: admin, sha256: nope}]\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "opscore", "serve", "--port", "0", "--db", str(tmp_path / "k.db")],
        cwd=REPO_ROOT,
        env=_env(OPSCORE_KEYS_FILE=str(keys)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def _serves(args: list[str], env: dict[str, str], log: Path) -> tuple[bool, str]:
    """Runs `opscore serve ARGS` until it logs "serving" (True) or exits (False)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "opscore", "serve", *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if '"msg": "serving"' in log.read_text(errors="replace"):
                    return True, log.read_text(errors="replace")
                if proc.poll() is not None:
                    return False, log.read_text(errors="replace")
                time.sleep(0.02)
            return False, "timeout"
        finally:
            proc.kill()
            proc.wait(timeout=5)


def test_cli_env_insecure_no_auth_serves_public_host(tmp_path: Path) -> None:
    """OPSCORE_INSECURE_NO_AUTH=1 lets `opscore serve` bind 0.0.0.0, with the warning."""
    ok, log = _serves(
        ["--host", "0.0.0.0", "--port", "0", "--db", str(tmp_path / "env.db")],
        _env(OPSCORE_INSECURE_NO_AUTH="1"),
        tmp_path / "env.log",
    )
    assert ok, log
    assert AUTH_OFF in log


def test_cli_flag_named_in_the_error_exists(tmp_path: Path) -> None:
    """The --insecure-no-auth flag the refusal message names is accepted by `opscore serve`."""
    ok, log = _serves(
        [
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--db",
            str(tmp_path / "flag.db"),
            "--insecure-no-auth",
        ],
        _env(),
        tmp_path / "flag.log",
    )
    assert ok, log


async def test_subprocess_loopback_logs_auth_off(spawn_server: Any, tmp_path: Path) -> None:
    """`opscore serve` on loopback without keys logs a WARNING that auth is off."""
    proc = await spawn_server(tmp_path / "loop.db")
    warnings = [line for line in proc.log_lines() if line.get("level") == "WARNING"]
    assert any(AUTH_OFF in str(line.get("msg")) for line in warnings), proc.log_tail()
