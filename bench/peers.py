"""Start-and-await side by side with the peers, interleaved in one run (`make bench-peers`).

Each round runs, one after the other on the same machine: Ops-Core's single-step
start-and-await (closed loop at 16 in flight with its same-server Health/Check baseline,
then paced at half that rate; bench.workflow), then each peer harness in
../shared/peers/<peer>/run.sh (Celery + Redis, Restate), which prints JSON lines
(kind=meta, kind=bench with scenario single_step_c16 and dispatch_open_loop). Ratios
(ours / peer) are taken within a round, so background load hits both alike; the table
shows the median over rounds. A peer that cannot be installed or run within its time
bound gets one line saying why, and the others are still compared. Writes
bench/results/peers-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from bench.common import machine_info, result_file
from bench.server import REPO, use_server_src
from bench.workflow import check_problems, run_on_fresh_server

PEERS = ("celery", "restate")
OURS = "opscore"
# Issue 14's targets at 16 in flight, start-and-await as a client sees it.
TARGET_VS_RPC = 0.3
TARGET_VS_PEER = {"celery": 2.0, "restate": 1.5}


def run_peer(
    peer: str, peers_dir: Path, env: dict[str, str], timeout: float
) -> tuple[list[dict[str, Any]], str | None]:
    """Runs one peer harness (its own process group, stopped on timeout); returns its JSON
    lines and, when it did not finish cleanly, why. Progress goes to our stderr."""
    script = peers_dir / peer / "run.sh"
    if not script.is_file():
        return [], f"no harness at {script}"
    proc = subprocess.Popen(
        ["bash", str(script)],
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, so a timeout stops everything it started
    )
    tail: collections.deque[str] = collections.deque(maxlen=5)

    def echo() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip())

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
        problem = None if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # run.sh traps it and stops its servers
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        problem = f"did not finish within {timeout:.0f} s (stopped)"
    reader.join(5)
    lines = []
    for raw in out.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    if problem is not None:
        problem += ": " + " | ".join(tail)
    elif not any(line.get("kind") == "bench" for line in lines):
        problem = "printed no kind=bench line"
    return lines, problem


def ours_round(
    src: Path, agents: int, in_flight: int, warmup: float, seconds: float
) -> dict[str, Any]:
    """Our two phases in the peers' shape: closed loop, then paced at half its rate."""
    closed = run_on_fresh_server(src, {}, agents, warmup, seconds, in_flight=in_flight)
    paced = run_on_fresh_server(src, {}, agents, warmup, seconds, rate=closed["rate"] / 2)
    return {
        "impl": OURS,
        "rps": closed["rate"],
        "p50_ms": closed["await_latency"]["p50_ms"],
        "p99_ms": closed["await_latency"]["p99_ms"],
        "vs_empty_rpc": closed["ratio_to_empty_rpc"],
        "empty_rpc_rps": closed["baseline"]["rate"],
        "agent_side_rps": closed["agent_rate"],
        "open_rps": paced["rate"],
        "dispatch_p99_ms": paced["dispatch_latency"]["p99_ms"],
        "e2e_p99_ms": paced["await_latency"]["p99_ms"],
        "errors": sum(closed["start_errors"].values()) + sum(paced["start_errors"].values()),
        "check_problems": check_problems(closed) + check_problems(paced),
        "closed": closed,
        "paced": paced,
    }


def peer_rows(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per peer configuration (impl) from its two kind=bench lines."""
    rows: dict[str, dict[str, Any]] = {}
    for line in lines:
        if line.get("kind") != "bench":
            continue
        row = rows.setdefault(line["impl"], {"impl": line["impl"]})
        if line.get("scenario") == "single_step_c16":
            row.update({k: line.get(k) for k in ("rps", "p50_ms", "p99_ms")})
            row["errors"] = row.get("errors", 0) + int(line.get("errors") or 0)
        elif line.get("scenario") == "dispatch_open_loop":
            row.update(open_rps=line.get("rps"), dispatch_p99_ms=line.get("dispatch_p99_ms"))
            row["e2e_p99_ms"] = line.get("e2e_p99_ms")
            row["errors"] = row.get("errors", 0) + int(line.get("errors") or 0)
    return list(rows.values())


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _cell(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_report(rounds: list[dict[str, Any]], failures: dict[str, str]) -> list[str]:
    """The side-by-side table (medians over rounds) and the verdict lines."""
    by_impl: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rounds:
        for row in r["rows"]:
            by_impl[row["impl"]].append(row)
    ours = by_impl.pop(OURS)
    fields = ("rps", "p50_ms", "p99_ms", "open_rps", "dispatch_p99_ms", "e2e_p99_ms")
    print()
    print(
        f"start-and-await, single-step, 16 in flight; medians of {len(rounds)} interleaved "
        "round(s); ratios taken within each round"
    )
    header = f"{'impl':<24}{'runs/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'ours/it':>9}"
    header += f"{'p99 ours/it':>12}{'open/s':>8}{'disp p99':>10}{'e2e p99':>9}{'errors':>8}"
    print(header)
    print("-" * len(header))
    verdicts = []

    def line(impl: str, rows: list[dict[str, Any]], ratio: str, p99_ratio: str) -> None:
        med = {f: _median([float(r[f]) for r in rows if r.get(f) is not None]) for f in fields}
        errors = sum(int(r.get("errors") or 0) for r in rows)
        print(
            f"{impl:<24}{_cell(med['rps'], 0):>9}{_cell(med['p50_ms']):>8}"
            f"{_cell(med['p99_ms']):>8}{ratio:>9}{p99_ratio:>12}{_cell(med['open_rps'], 0):>8}"
            f"{_cell(med['dispatch_p99_ms']):>10}{_cell(med['e2e_p99_ms']):>9}{errors:>8}"
        )

    problems = [p for r in ours for p in r["check_problems"]]
    verdicts.append("our checks: " + ("ok" if not problems else "; ".join(problems)))
    vs_rpc = _median([r["vs_empty_rpc"] for r in ours])
    line(OURS, ours, f"{vs_rpc:.0%} RPC", "")
    ok = "MET" if vs_rpc >= TARGET_VS_RPC else "MISSED"
    verdicts.append(
        f"ours @16: {vs_rpc:.0%} of the same server's empty-RPC rate "
        f"(median {_median([r['empty_rpc_rps'] for r in ours]):,.0f}/s; target >= "
        f"{TARGET_VS_RPC:.0%}): {ok}"
    )
    for impl, rows in sorted(by_impl.items()):
        per_round = {r["round"]: r for r in rounds}
        ratios, p99s = [], []
        for row in rows:
            mine = per_round[row["round"]]["ours"]
            if row.get("rps"):
                ratios.append(mine["rps"] / row["rps"])
            if row.get("p99_ms"):
                p99s.append(mine["p99_ms"] / row["p99_ms"])
        ratio, p99_ratio = _median(ratios), _median(p99s)
        line(impl, rows, f"{ratio:.2f}x", f"{p99_ratio:.2f}x")
        peer = next((p for p in TARGET_VS_PEER if impl.startswith(p)), None)
        if peer is not None:
            target = TARGET_VS_PEER[peer]
            ok = "MET" if ratio >= target else "MISSED"
            ok_p99 = "MET" if p99_ratio < 1 else "MISSED"
            verdicts.append(
                f"ours / {impl}: {ratio:.2f}x the rate (target >= {target:g}x): {ok}; p99 "
                f"{p99_ratio:.2f}x theirs (target < 1x): {ok_p99}"
            )
    for peer, why in failures.items():
        print(f"{peer:<24}did not run: {why}")
        verdicts.append(f"ours / {peer}: not compared ({peer} did not run)")
    print()
    for v in verdicts:
        print(v)
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per phase")
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers")
    parser.add_argument(
        "--peers-dir", type=Path, default=REPO.parent / "shared" / "peers", help="harnesses"
    )
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=600.0,
        help="seconds one peer run may take, its first install included; then it is stopped",
    )
    parser.add_argument(
        "--celery-variants", default="prefork:aof", help="the Celery harness's VARIANTS"
    )
    parser.add_argument("--server-src", type=Path, default=REPO, help="source tree to serve")
    args = parser.parse_args(argv)
    src = use_server_src(args.server_src)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    env = {
        "REPEAT": "1",
        "WARMUP_S": f"{args.warmup:g}",
        "WINDOW_S": f"{args.seconds:g}",
        "IN_FLIGHT": str(args.in_flight),
        "VARIANTS": args.celery_variants,
    }
    report: dict[str, Any] = {"machine": machine_info(), "server_src": str(src), "rounds": []}
    with open("/proc/loadavg") as f:
        report["machine"]["loadavg_at_start"] = f.read().split()[:3]
    failures: dict[str, str] = {}
    meta: dict[str, list[dict[str, Any]]] = {}
    for i in range(1, args.repeat + 1):
        print(
            f"[{i}/{args.repeat}] ours: start-and-await @{args.in_flight}, then paced", flush=True
        )
        mine = ours_round(src, args.agents, args.in_flight, args.warmup, args.seconds)
        mine["round"] = i
        rows = [{k: v for k, v in mine.items() if k not in ("closed", "paced")}]
        for peer in peers:
            if peer in failures:
                continue
            print(f"[{i}/{args.repeat}] {peer}: {args.peers_dir / peer / 'run.sh'}", flush=True)
            lines, problem = run_peer(peer, args.peers_dir, env, args.peer_timeout)
            meta.setdefault(peer, []).extend(x for x in lines if x.get("kind") == "meta")
            if problem is not None:
                failures[peer] = problem
                print(f"{peer}: did not run: {problem}", flush=True)
            for row in peer_rows(lines):
                row["round"] = i
                rows.append(row)
        report["rounds"].append({"round": i, "ours": mine, "rows": rows})
    report["peer_meta"] = meta
    report["failures"] = failures
    report["verdicts"] = print_report(report["rounds"], failures)
    out = result_file("peers")
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
