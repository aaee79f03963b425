"""Runs every Ops-Core benchmark once and reports each figure against the baseline.

Baseline: the empty unary RPC rate (grpc.health.v1.Health/Check, no storage work)
through the same server build, measured in the same run with the same client setup.
Workloads: durable UpdateAgentState throughput (bench.unary) and watch delivery
latency (bench.watch). Each measurement gets a fresh server on a fresh temp database.
Prints a table and writes bench/results/bench-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import agent_ids, machine_info, register_agents
from bench.server import REPO, ServerProcess
from bench.unary import measure_rate
from bench.watch import measure_watch

RESULTS = Path(__file__).resolve().parent / "results"
IN_FLIGHT = (16, 64)
AGENTS = 64
UPDATE_TARGET = 0.5  # UpdateAgentState rate >= 50% of the empty-RPC rate
WATCH_P99_TARGET_MS = 20.0
SERVER_SRC = REPO  # replaced by --server-src


def _max_revision(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT MAX(revision) FROM agent_events").fetchone()
    return int(row[0] or 0)


def _server_notes(server: ServerProcess) -> dict[str, Any]:
    return {"exit_code": server.exit_code, "warnings": server.problems[:5]}


def run_baseline(in_flight: int, procs: int, warmup: float, seconds: float) -> dict[str, Any]:
    with ServerProcess(SERVER_SRC) as server:
        result = measure_rate(server, "health", in_flight, procs, warmup, seconds)
        server.stop()
        result["server"] = _server_notes(server)
    return result


def run_updates(in_flight: int, procs: int, warmup: float, seconds: float) -> dict[str, Any]:
    with ServerProcess(SERVER_SRC) as server:
        ids = agent_ids(AGENTS)
        register_agents(server.address, ids)
        result = measure_rate(server, "update", in_flight, procs, warmup, seconds, ids)
        server.stop()
        result["server"] = _server_notes(server)
        # Every acknowledged update was a real change, so after a clean shutdown the
        # store must hold exactly registrations + acknowledged updates revisions.
        stored = _max_revision(server.db)
        expected = AGENTS + result["acked_total"]
        result["durability_check"] = {
            "stored_max_revision": stored,
            "registrations_plus_acked": expected,
            "ok": stored == expected and not result["errors"],
        }
    return result


def run_watch(watchers: int, procs: int, rate: int, seconds: float) -> dict[str, Any]:
    with ServerProcess(SERVER_SRC) as server:
        ids = agent_ids(AGENTS)
        register_agents(server.address, ids)
        result = measure_watch(server, ids, watchers, procs, rate, seconds)
        server.stop()
        result["server"] = _server_notes(server)
    return result


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate, annotated with every repetition's rate."""
    ordered = sorted(runs, key=lambda r: r["rate"])
    median = dict(ordered[len(ordered) // 2])
    median["repeat_rates"] = [round(r["rate"], 1) for r in runs]
    return median


def _fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    base = report["baseline"]
    print()
    print(f"client processes for baseline and updates: {report['client_procs']}")
    print("calls/s: median of the repetitions (all in the JSON as repeat_rates)")
    header = f"{'benchmark':<34}{'in flight':>10}{'calls/s':>10}{'vs empty':>10}"
    header += f"{'p50 ms':>9}{'p99 ms':>9}{'srv CPU%':>10}{'cli CPU%':>10}"
    print(header)
    print("-" * len(header))
    for name, rows in (("Health/Check (baseline)", base), ("UpdateAgentState", report["updates"])):
        for key, r in rows.items():
            ratio = r["rate"] / base[key]["rate"]
            clients = "+".join(f"{c:.0f}" for c in r["client_cpu_pct"])
            print(
                f"{name:<34}{key:>10}{_fmt(r['rate']):>10}{ratio:>9.0%} "
                f"{r['latency']['p50_ms']:>8.1f} {r['latency']['p99_ms']:>8.1f}"
                f"{r['server_cpu_pct']:>10.0f}{clients:>10}"
            )
    print()
    header = f"{'watch (streams x updates/s)':<30}{'achieved/s':>11}{'delivered':>18}"
    header += f"{'p50 ms':>9}{'p99 ms':>10}{'max ms':>10}{'srv CPU%':>10}"
    print(header)
    print("-" * len(header))
    for w in report["watch"]:
        label = f"{w['watchers']} x {w['target_rate']}"
        delivered = f"{w['events_delivered']:,}/{w['events_expected']:,}"
        lat = w["latency"]
        print(
            f"{label:<30}{_fmt(w['achieved_update_rate']):>11}{delivered:>18}"
            f"{lat['p50_ms']:>9.1f}{lat['p99_ms']:>10.1f}{lat['max_ms']:>10.1f}"
            f"{w['server_cpu_pct']:>10.0f}"
        )
        extra = []
        if w["update_errors"]:
            extra.append(f"update errors {w['update_errors']}")
        if w["streams_ended_early"]:
            extra.append(f"streams ended early {w['streams_ended_early']}")
        if extra:
            print("    " + "; ".join(extra))
    print()
    for line in report["verdicts"]:
        print(line)


def verdicts(report: dict[str, Any]) -> list[str]:
    lines = []
    for key, r in report["updates"].items():
        ratio = r["rate"] / report["baseline"][key]["rate"]
        ok = "MET" if ratio >= UPDATE_TARGET else "MISSED"
        lines.append(
            f"UpdateAgentState @{key} in flight: {ratio:.0%} of empty-RPC rate "
            f"(target >= {UPDATE_TARGET:.0%}): {ok}"
        )
    main = report["watch"][0]
    p99 = main["latency"]["p99_ms"]
    ok = "MET" if p99 < WATCH_P99_TARGET_MS and main["delivered_fraction"] == 1.0 else "MISSED"
    lines.append(
        f"Watch p99 @{main['watchers']} streams x {main['target_rate']}/s: {p99:.1f} ms, "
        f"{main['delivered_fraction']:.1%} delivered (target p99 < {WATCH_P99_TARGET_MS:g} ms): "
        f"{ok}"
    )
    return lines


def add_ratios(report: dict[str, Any]) -> None:
    base = report["baseline"]
    for key, r in report["updates"].items():
        r["ratio_to_empty_rpc"] = r["rate"] / base[key]["rate"]
    ref = base["16"]
    for w in report["watch"]:
        w["ratios_vs_empty_rpc_at_16"] = {
            "achieved_update_rate": w["achieved_update_rate"] / ref["rate"],
            "delivered_events_per_s": w["achieved_update_rate"] * w["watchers"] / ref["rate"],
            "p50_latency_vs_rpc_p50": w["latency"]["p50_ms"] / ref["latency"]["p50_ms"],
            "p99_latency_vs_rpc_p99": w["latency"]["p99_ms"] / ref["latency"]["p99_ms"],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~1 s each)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run")
    parser.add_argument(
        "--repeat", type=int, default=3, help="interleaved repetitions of baseline/update"
    )
    parser.add_argument("--client-procs", type=int, default=1, help="unary client processes")
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--watcher-procs", type=int, default=2)
    parser.add_argument(
        "--watch-rates",
        default="1000,100",
        help="paced update rates for the watch benchmark; the first is the target case",
    )
    parser.add_argument(
        "--server-src",
        type=Path,
        default=REPO,
        help="source tree to serve, e.g. `git archive HEAD | tar -x -C DIR` (default: here)",
    )
    args = parser.parse_args(argv)
    global SERVER_SRC
    SERVER_SRC = args.server_src.resolve()
    if SERVER_SRC != REPO:
        # Client processes use the same generated stubs as the server they talk to.
        stubs = str(SERVER_SRC / "generated")
        sys.path.insert(0, stubs)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (stubs, os.environ.get("PYTHONPATH", "")) if p
        )
    seconds, warmup = (1.0, 0.3) if args.quick else (args.seconds, args.warmup)
    rates = [int(r) for r in args.watch_rates.split(",") if r]
    if args.quick:
        rates = rates[:1]

    report: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"seconds": seconds, "warmup": warmup, "quick": args.quick},
        "server_src": str(SERVER_SRC),
        "client_procs": args.client_procs,
        "baseline": {},
        "updates": {},
        "watch": [],
    }
    with open("/proc/loadavg") as f:
        report["machine"]["loadavg_at_start"] = f.read().split()[:3]
    started = time.time()
    repeat = 1 if args.quick else args.repeat
    for n in IN_FLIGHT:
        baselines, updates = [], []
        for i in range(repeat):  # interleaved, so background load hits both alike
            print(f"[{i + 1}/{repeat}] Health/Check, {n} in flight ...", flush=True)
            baselines.append(run_baseline(n, args.client_procs, warmup, seconds))
            print(f"[{i + 1}/{repeat}] UpdateAgentState, {n} in flight ...", flush=True)
            updates.append(run_updates(n, args.client_procs, warmup, seconds))
        report["baseline"][str(n)] = _median_run(baselines)
        report["updates"][str(n)] = _median_run(updates)
    for rate in rates:
        print(f"watch: {args.watchers} streams, {rate} updates/s ...", flush=True)
        report["watch"].append(run_watch(args.watchers, args.watcher_procs, rate, seconds))
    report["wall_seconds"] = time.time() - started
    add_ratios(report)
    report["verdicts"] = verdicts(report)

    print_table(report)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / time.strftime("bench-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
