"""Runs every Ops-Core benchmark once and reports each figure against the baseline.

Baseline: the empty unary RPC rate (grpc.health.v1.Health/Check, no storage work)
through the same server build, measured in the same run with the same client setup.
Workloads: durable UpdateAgentState throughput (bench.unary), watch delivery
latency (bench.watch) and single-step workflows started and awaited as a client sees
them, with dispatch latency (bench.workflow). Each measurement gets a fresh server on a
fresh temp database.
Prints a table and writes bench/results/bench-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import agent_ids, machine_info, register_agents, result_file
from bench.server import REPO, ServerProcess, use_server_src
from bench.unary import measure_rate
from bench.watch import measure_watch
from bench.workflow import check_problems, run_on_fresh_server

IN_FLIGHT = (16, 64)
AGENTS = 64
UPDATE_TARGET = 0.7  # UpdateAgentState rate >= 70% of the empty-RPC rate (issue 14)
WATCH_P99_TARGET_MS = 20.0
WORKFLOW_TARGET = 0.3  # start-and-await runs/s @16 >= 30% of the empty-RPC rate (issue 14)
DISPATCH_P99_TARGET_MS = 5.0  # at half the measured start-and-await rate (issue 14)
PARTS = ("unary", "watch", "workflow")
SERVER_SRC = REPO  # replaced by --server-src
SERVER_ENV: dict[str, str] = {}  # --server-env


def _max_revision(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT MAX(revision) FROM agent_events").fetchone()
    return int(row[0] or 0)


def _server_notes(server: ServerProcess) -> dict[str, Any]:
    return {"exit_code": server.exit_code, "warnings": server.problems[:5]}


def run_baseline(in_flight: int, procs: int, warmup: float, seconds: float) -> dict[str, Any]:
    with ServerProcess(SERVER_SRC, SERVER_ENV) as server:
        result = measure_rate(server, "health", in_flight, procs, warmup, seconds)
        server.stop()
        result["server"] = _server_notes(server)
    return result


def run_updates(in_flight: int, procs: int, warmup: float, seconds: float) -> dict[str, Any]:
    with ServerProcess(SERVER_SRC, SERVER_ENV) as server:
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
    with ServerProcess(SERVER_SRC, SERVER_ENV) as server:
        ids = agent_ids(AGENTS)
        register_agents(server.address, ids)
        result = measure_watch(server, ids, watchers, procs, rate, seconds)
        server.stop()
        result["server"] = _server_notes(server)
    return result


def run_workflow(
    agents: int, warmup: float, seconds: float, in_flight: int = 0, rate: float = 0.0
) -> dict[str, Any]:
    return run_on_fresh_server(
        SERVER_SRC, SERVER_ENV, agents, warmup, seconds, in_flight=in_flight, rate=rate
    )


def _median_by(
    runs: list[dict[str, Any]], value: Callable[[dict[str, Any]], float], label: str
) -> dict[str, Any]:
    """The run with the median `value`, annotated (as `label`) with every run's value."""
    median = dict(sorted(runs, key=value)[len(runs) // 2])
    median[label] = [round(value(r), 2) for r in runs]
    return median


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return _median_by(runs, lambda r: float(r["rate"]), "repeat_rates")


def _median_p99_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The latency run with the median dispatch p99, annotated with every run's p99."""
    median = _median_by(runs, lambda r: float(r["dispatch_latency"]["p99_ms"]), "repeat_p99_ms")
    median["repeat_queued_p99_ms"] = [
        round(r["queued_to_receipt_latency"]["p99_ms"], 2) for r in runs
    ]
    return median


def run_workflow_part(
    agents: int, in_flights: list[int], repeat: int, warmup: float, seconds: float
) -> dict[str, Any]:
    """Closed-loop start-and-await at each in-flight count (each run with its own
    same-server Health/Check baseline; repetitions interleaved), then paced open-loop
    dispatch-latency runs at half the median rate of the first (headline) count."""
    closed: dict[int, list[dict[str, Any]]] = {n: [] for n in in_flights}
    for i in range(repeat):
        for n in in_flights:
            print(
                f"[{i + 1}/{repeat}] Health/Check + start-and-await, {n} in flight ...", flush=True
            )
            closed[n].append(run_workflow(agents, warmup, seconds, in_flight=n))
    medians = {str(n): _median_run(runs) for n, runs in closed.items()}
    for n, runs in closed.items():
        medians[str(n)]["repeat_ratios"] = [round(r["ratio_to_empty_rpc"], 3) for r in runs]
    half = medians[str(in_flights[0])]["rate"] / 2
    latency = []
    for i in range(repeat):
        print(f"[{i + 1}/{repeat}] start-and-await paced at {half:.0f}/s ...", flush=True)
        latency.append(run_workflow(agents, warmup, seconds, rate=half))
    return {
        "agents": agents,
        "in_flight": in_flights[0],
        "closed": medians,
        "latency": _median_p99_run(latency),
        "closed_runs": {str(n): runs for n, runs in closed.items()},
        "latency_runs": latency,
    }


def _fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    if report["baseline"]:
        print_unary_table(report)
    if report["watch"]:
        print_watch_table(report)
    if report.get("workflow"):
        print_workflow_table(report["workflow"])
    print()
    for line in report["verdicts"]:
        print(line)


def print_unary_table(report: dict[str, Any]) -> None:
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


def print_watch_table(report: dict[str, Any]) -> None:
    print()
    header = f"{'watch (streams x updates/s)':<30}{'achieved/s':>11}{'delivered':>18}"
    header += f"{'p50 ms':>9}{'p99 ms':>10}{'max ms':>10}{'srv CPU%':>10}"
    header += f"{'p99 / RPC p99':>15}"
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
            f"{w['ratios_vs_empty_rpc_at_16']['p99_latency_vs_rpc_p99']:>14.1f}x"
        )
        extra = []
        if w["update_errors"]:
            extra.append(f"update errors {w['update_errors']}")
        if w["streams_ended_early"]:
            extra.append(f"streams ended early {w['streams_ended_early']}")
        if len(w.get("repeat_p99_ms", [])) > 1:
            extra.append(f"p99 ms of the repetitions {w['repeat_p99_ms']} (median shown)")
        if extra:
            print("    " + "; ".join(extra))


def print_workflow_table(wf: dict[str, Any]) -> None:
    lat = wf["latency"]
    print()
    print(
        f"single-step workflows started and awaited (StartWorkflow wait=true), {wf['agents']} "
        f"agents (StreamTasks max_in_flight {lat['max_in_flight_per_agent']}); each closed-loop "
        "run's Health/Check measured on its own server first; medians by rate"
    )
    header = f"{'run':<24}{'RPC/s':>8}{'runs/s':>8}{'vs RPC':>8}{'await p50/p99 ms':>18}"
    header += f"{'agent-side/s':>13}{'dispatch p50/p99':>18}{'srv CPU%':>9}"
    print(header)
    print("-" * len(header))
    for key, r in wf["closed"].items():
        base = r["baseline"]["rate"]
        print(_workflow_row(f"closed, {key} in flight", r, _fmt(base), f"{r['rate'] / base:.0%}"))
        print(f"    ratios of the repetitions {r['repeat_ratios']}; check {_check_line(r)}")
    print(_workflow_row(f"paced at {lat['target_rate']:.0f}/s", lat, "", ""))
    q = lat["queued_to_receipt_latency"]
    print(
        f"    dispatch p99 ms of the repetitions {lat['repeat_p99_ms']}; from TASK_QUEUED "
        f"p50/p99 {q['p50_ms']:.1f}/{q['p99_ms']:.1f} ms; check {_check_line(lat)}"
    )


def _workflow_row(label: str, r: dict[str, Any], base: str, ratio: str) -> str:
    a, d = r["await_latency"], r["dispatch_latency"]
    return (
        f"{label:<24}{base:>8}{_fmt(r['rate']):>8}{ratio:>8}"
        f"{a['p50_ms']:>11.1f}/{a['p99_ms']:<6.1f}{_fmt(r['agent_rate']):>13}"
        f"{d['p50_ms']:>11.1f}/{d['p99_ms']:<6.1f}{r['server_cpu_pct']:>9.0f}"
    )


def _check_line(r: dict[str, Any]) -> str:
    problems = check_problems(r)
    return "ok" if not problems else "; ".join(problems)


def verdicts(report: dict[str, Any]) -> list[str]:
    lines = []
    if report.get("workflow"):
        lines += workflow_verdicts(report["workflow"])
    if not report["updates"]:
        return lines
    for key, r in report["updates"].items():
        ratio = r["rate"] / report["baseline"][key]["rate"]
        ok = "MET" if ratio >= UPDATE_TARGET else "MISSED"
        lines.append(
            f"UpdateAgentState @{key} in flight: {ratio:.0%} of empty-RPC rate "
            f"(target >= {UPDATE_TARGET:.0%}): {ok}"
        )
    if not report["watch"]:
        return lines
    main = report["watch"][0]
    p99 = main["latency"]["p99_ms"]
    ok = "MET" if p99 < WATCH_P99_TARGET_MS and main["delivered_fraction"] == 1.0 else "MISSED"
    lines.append(
        f"Watch p99 @{main['watchers']} streams x {main['target_rate']}/s: {p99:.1f} ms, "
        f"{main['delivered_fraction']:.1%} delivered (target p99 < {WATCH_P99_TARGET_MS:g} ms): "
        f"{ok}"
    )
    return lines


def workflow_verdicts(wf: dict[str, Any]) -> list[str]:
    thr, lat = wf["closed"][str(wf["in_flight"])], wf["latency"]
    ratio = thr["ratio_to_empty_rpc"]
    ok = "MET" if ratio >= WORKFLOW_TARGET else "MISSED"
    d, q = lat["dispatch_latency"], lat["queued_to_receipt_latency"]
    ok_lat = "MET" if d["p99_ms"] < DISPATCH_P99_TARGET_MS else "MISSED"
    return [
        f"Start-and-await @{wf['in_flight']} in flight: {thr['rate']:,.0f} runs/s = {ratio:.0%} "
        f"of the same server's empty-RPC rate (target >= {WORKFLOW_TARGET:.0%}): {ok}",
        f"Dispatch p99 @{lat['target_rate']:.0f}/s (half load): {d['p99_ms']:.1f} ms from "
        f"StartWorkflow send, {q['p99_ms']:.1f} ms from TASK_QUEUED "
        f"(target < {DISPATCH_P99_TARGET_MS:g} ms): {ok_lat}",
    ]


def add_ratios(report: dict[str, Any]) -> None:
    base = report["baseline"]
    for key, r in report["updates"].items():
        r["ratio_to_empty_rpc"] = r["rate"] / base[key]["rate"]
    if not report["watch"] or "16" not in base:
        return
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
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run (default all): {', '.join(PARTS)}",
    )
    parser.add_argument("--wf-agents", type=int, default=50, help="agents with a task stream")
    parser.add_argument(
        "--wf-in-flight",
        default="16,4,1",
        help="awaited runs open at once (closed loop), comma-separated; the first is the "
        "headline and sets the paced rate (half of it)",
    )
    parser.add_argument(
        "--server-src",
        type=Path,
        default=REPO,
        help="source tree to serve, e.g. `git archive HEAD | tar -x -C DIR` (default: here)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="OPSCORE_X=V",
        help="a server setting for every server of the run (repeatable)",
    )
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if not parts or parts - set(PARTS):
        parser.error(f"--only takes a comma-separated subset of {', '.join(PARTS)}")
    global SERVER_SRC
    SERVER_SRC = use_server_src(args.server_src)
    for item in args.server_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("OPSCORE_"):
            parser.error(f"--server-env takes OPSCORE_NAME=VALUE, not {item!r}")
        SERVER_ENV[name] = value
    seconds, warmup = (1.0, 0.3) if args.quick else (args.seconds, args.warmup)
    rates = [int(r) for r in args.watch_rates.split(",") if r]
    if args.quick:
        rates = rates[:1]

    report: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"seconds": seconds, "warmup": warmup, "quick": args.quick},
        "server_src": str(SERVER_SRC),
        "server_env": SERVER_ENV,
        "client_procs": args.client_procs,
        "baseline": {},
        "updates": {},
        "watch": [],
        "workflow": None,
        "parts": sorted(parts),
    }
    with open("/proc/loadavg") as f:
        report["machine"]["loadavg_at_start"] = f.read().split()[:3]
    started = time.time()
    repeat = 1 if args.quick else args.repeat
    for n in IN_FLIGHT if "unary" in parts else ():
        baselines, updates = [], []
        for i in range(repeat):  # interleaved, so background load hits both alike
            print(f"[{i + 1}/{repeat}] Health/Check, {n} in flight ...", flush=True)
            baselines.append(run_baseline(n, args.client_procs, warmup, seconds))
            print(f"[{i + 1}/{repeat}] UpdateAgentState, {n} in flight ...", flush=True)
            updates.append(run_updates(n, args.client_procs, warmup, seconds))
        report["baseline"][str(n)] = _median_run(baselines)
        report["updates"][str(n)] = _median_run(updates)
    if "watch" in parts and "16" not in report["baseline"]:
        # The watch ratios' denominator, in the same run when the unary part is not run.
        runs = []
        for i in range(repeat):
            print(f"[{i + 1}/{repeat}] Health/Check, 16 in flight ...", flush=True)
            runs.append(run_baseline(16, args.client_procs, warmup, seconds))
        report["baseline"]["16"] = _median_run(runs)
    for rate in rates if "watch" in parts else ():
        watches = []
        for i in range(repeat):
            print(f"[{i + 1}/{repeat}] watch: {args.watchers} streams, {rate} updates/s ...")
            watches.append(run_watch(args.watchers, args.watcher_procs, rate, seconds))
        p99 = _median_by(watches, lambda r: float(r["latency"]["p99_ms"]), "repeat_p99_ms")
        report["watch"].append(p99)
    if "workflow" in parts:
        in_flights = [int(n) for n in args.wf_in_flight.split(",") if n]
        report["workflow"] = run_workflow_part(args.wf_agents, in_flights, repeat, warmup, seconds)
    report["wall_seconds"] = time.time() - started
    add_ratios(report)
    report["verdicts"] = verdicts(report)

    print_table(report)
    out = result_file("bench")
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
