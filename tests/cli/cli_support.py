"""Runs the real `opscore` console script in a child process, as a shell script would,
so the CLI tests cover the entry point, argument parsing, output and exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The console script installed next to this interpreter (pyproject: opscore.cli:main).
OPSCORE = Path(sys.executable).with_name("opscore")
CALL_TIMEOUT = 20.0
READ_TIMEOUT = 10.0
# Variables that would change how the CLI prints (colours, width, terminal detection).
_OUTPUT_ENV = {"COLUMNS", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(text: str) -> str:
    """Terminal output without its colour and cursor escape sequences."""
    return _ANSI.sub("", text)


@dataclass
class Result:
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"opscore {' '.join(self.args)} -> exit {self.code}\n{self.out}\n{self.err}"

    def json(self) -> Any:
        """The one JSON document printed (exit code 1 still prints it for `--wait`)."""
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        """The JSON object of every line (watch commands)."""
        return [json.loads(line) for line in self.out.splitlines()]


class Cli:
    """`opscore ...` against one server, its address given by OPSCORE_ADDRESS."""

    def __init__(self, address: str) -> None:
        self.address = address
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("OPSCORE_") and k not in _OUTPUT_ENV
        }
        self.env = {**base, "OPSCORE_ADDRESS": address}

    async def spawn(self, *args: str, **env: str) -> asyncio.subprocess.Process:
        """Starts the command without waiting (watch commands)."""
        return await asyncio.create_subprocess_exec(
            str(OPSCORE),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**self.env, **env},
        )

    async def __call__(self, *args: str, **env: str) -> Result:
        """Runs the command to its end; `env` adds environment variables."""
        proc = await self.spawn(*args, **env)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CALL_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(
                f"opscore {' '.join(args)} still running after {CALL_TIMEOUT}s"
            ) from None
        assert proc.returncode is not None
        return Result(args, proc.returncode, out.decode(), err.decode())

    async def ok(self, *args: str, **env: str) -> Result:
        result = await self(*args, **env)
        assert result.code == 0, str(result)
        assert result.err == "", str(result)
        return result

    async def json(self, *args: str) -> Any:
        """The command's --json document."""
        return (await self.ok(*args, "--json")).json()

    async def json_lines(self, *args: str) -> list[Any]:
        """The objects a watch command printed with --json until it ended."""
        return (await self.ok(*args, "--json")).json_lines()


async def read_json_lines(proc: asyncio.subprocess.Process, count: int) -> list[Any]:
    """Reads `count` JSON lines from a running command (each must arrive flushed)."""
    assert proc.stdout is not None
    lines = []
    for _ in range(count):
        raw = await asyncio.wait_for(proc.stdout.readline(), READ_TIMEOUT)
        assert raw, f"stdout closed after {len(lines)} lines"
        lines.append(json.loads(raw))
    return lines


async def read_until(proc: asyncio.subprocess.Process, text: str) -> str:
    """Reads a running command's output until `text` shows up; returns all read."""
    assert proc.stdout is not None
    seen = b""
    while text.encode() not in seen:
        chunk = await asyncio.wait_for(proc.stdout.read(4096), READ_TIMEOUT)
        assert chunk, f"stdout closed before {text!r} showed up:\n{seen.decode()}"
        seen += chunk
    return seen.decode()
