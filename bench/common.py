"""Shared helpers for the benchmarks (no measurement of its own): statistics, client
process spawning, agent setup, and a description of the machine."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from opspawn.opscore.v1 import lifecycle_pb2, lifecycle_pb2_grpc

from bench.server import REPO

RESULTS = Path(__file__).resolve().parent / "results"


def result_file(prefix: str, suffix: str = "json") -> Path:
    """A new timestamped file in bench/results/ (created on first use)."""
    RESULTS.mkdir(exist_ok=True)
    return RESULTS / time.strftime(f"{prefix}-%Y%m%d-%H%M%S.{suffix}")


SPAWN: multiprocessing.context.SpawnContext = multiprocessing.get_context("spawn")


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def latency_summary_ms(values: list[float]) -> dict[str, float]:
    """p50/p99/max (and count) of latencies given in seconds, reported in ms."""
    values.sort()
    return {
        "count": len(values),
        "p50_ms": percentile(values, 50) * 1e3,
        "p99_ms": percentile(values, 99) * 1e3,
        "max_ms": (values[-1] if values else float("nan")) * 1e3,
    }


def agent_ids(count: int) -> list[str]:
    return [f"bench-agent-{i:04d}" for i in range(count)]


def register_agents(address: str, ids: Sequence[str]) -> None:
    """Registers the agents the workload updates (setup, not measured)."""
    with grpc.insecure_channel(address) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        for agent_id in ids:
            stub.RegisterAgent(
                lifecycle_pb2.RegisterAgentRequest(
                    agent_id=agent_id, name=agent_id, version="1", capabilities=["bench"]
                ),
                timeout=10,
            )


def machine_busy_cpu_seconds() -> float:
    """CPU seconds spent non-idle by the whole machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_until(deadline: float) -> None:
    """Sleeps until the wall-clock time `deadline` (time.time())."""
    delay = deadline - time.time()
    if delay > 0:
        time.sleep(delay)


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "git_commit": commit,
    }
