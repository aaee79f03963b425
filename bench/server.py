"""Starts a fresh Ops-Core server (new temp dir and database) in its own process.

Not a benchmark itself: every benchmark uses `ServerProcess` so that it measures a
server with an empty database, and stops it with SIGTERM afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def import_roots(src: Path) -> list[str]:
    """Where a checkout's packages import from: the server tree, the SDK tree and the
    generated code (`sdk/`, `sdk/generated`; before the SDK became its own
    distribution, only `generated`), so benchmarks can serve older commits too."""
    roots = [src, src / "sdk", src / "sdk" / "generated", src / "generated"]
    return [str(root) for root in roots if root.is_dir()]


def use_server_src(src: Path) -> Path:
    """Serves `src` (resolved) instead of this checkout: this process and the client
    processes it spawns import the generated stubs of the server they talk to."""
    src = src.resolve()
    if src != REPO:
        stubs = import_roots(src)[-1]
        sys.path.insert(0, stubs)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (stubs, os.environ.get("PYTHONPATH", "")) if p
        )
    return src


class ServerProcess:
    """`with ServerProcess() as srv:` -> a serving Ops-Core on srv.address.

    `src` is the source tree to serve (default: this checkout)."""

    def __init__(
        self,
        src: Path = REPO,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.src = src
        self._env = dict(env or {})
        self._startup_timeout = startup_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="opscore-bench-")
        self.db = Path(self._tmp.name) / "bench.db"
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.log_tail: deque[str] = deque(maxlen=50)
        self.problems: list[str] = []  # WARNING/ERROR log lines (first few)
        self.exit_code: int | None = None
        self._serving = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log_tail.append(line.rstrip())
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "serving" and isinstance(entry.get("port"), int):
                self.port = entry["port"]
                self._serving.set()
            elif entry.get("level") in ("WARNING", "ERROR", "CRITICAL") and len(self.problems) < 20:
                self.problems.append(line.strip()[:500])

    def start(self) -> ServerProcess:
        # Default settings unless the benchmark sets some (`--server-env`).
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPSCORE_")}
        env.update(self._env)
        if self.src != REPO:  # serve another checkout (e.g. a `git archive` of a commit)
            env["PYTHONPATH"] = os.pathsep.join(import_roots(self.src))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "opscore",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--db",
                str(self.db),
            ],
            cwd=self.src,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self._startup_timeout
        while not self._serving.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(self.log_tail)
                raise RuntimeError(f"server did not start serving:\n{tail}")
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait for the graceful shutdown; returns the exit code."""
        if self.proc is None:
            return self.exit_code
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.problems.append(f"server ignored SIGTERM for {timeout}s; killed")
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(2)
        self.exit_code = self.proc.returncode
        self.proc = None
        return self.exit_code

    def cleanup(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.cleanup()
