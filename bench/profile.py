"""Where a start-and-await run's server time goes: py-spy under the closed-loop load.

Starts a fresh server, runs bench.workflow's closed-loop start-and-await (16 in flight by
default) and, once the load is on, records the server with py-spy
(`py-spy record -p <pid> -d <seconds> -f raw --nonblocking`; idle stacks are not sampled).
Then aggregates the folded stacks: per frame the share of samples where it is the leaf
(self time) and where it is anywhere on the stack (inclusive), and per owner (our code
under opscore/, grpc's, asyncio's, sqlite3, protobuf, other). The raw file is kept in
bench/results/ for a flame graph.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import threading
from pathlib import Path

from bench.common import result_file
from bench.server import REPO, ServerProcess, use_server_src
from bench.workflow import measure_workflow, setup, wf_agent_ids

PY_SPY = Path(sys.executable).parent / "py-spy"
START_AFTER = 4.0  # s from launching the load to recording: clients spawned, warm-up done
DISPATCH = ("Handle._run ", "_WorkItem.run ", "Thread.run ", "BaseEventLoop._run_once ")
# Where a sample's work comes from: the first of these on its stack (root first).
SOURCES = (
    "WorkflowServicer.StartWorkflow",
    "WorkflowServicer.CompleteTask",
    "WorkflowServicer.StreamTasks",
    "SqliteEngine._write_loop",
    "SqliteEngine.read",
    "Dispatcher",
    "SessionHistory",
)
# A leaf at Handle._run is C code the loop calls directly: grpc's cygrpc callbacks (reads,
# writes, completion-queue events) and the C asyncio task step, not told apart by py-spy.
LOOP_C = "C from loop callbacks (cygrpc, C task step)"
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def owner(path: str) -> str:
    """Who a frame's code belongs to, from its full file path."""
    if "/opscore/" in path:
        return "opscore"
    for name, label in OWNERS:
        if f"/{name}/" in path or path.endswith(f"/{name}.py"):
            return label
    return "other"


OWNERS = (
    ("grpc", "grpc"),
    ("asyncio", "asyncio"),
    ("selectors", "asyncio"),
    ("sqlite3", "sqlite3"),
    ("protobuf", "protobuf"),
    ("concurrent", "threads"),
    ("threading", "threads"),
)


def short(frame: str) -> tuple[str, str]:
    """(frame label without the line number, owner)."""
    m = FRAME.match(frame)
    if m is None:
        return frame, "other"
    path = m["file"]
    for marker in ("/site-packages/", "/lib/python3.11/", "/opscore/"):
        if marker in path:
            path = ("opscore/" if marker == "/opscore/" else "") + path.split(marker, 1)[1]
    return f"{m['func']} ({path})", owner(m["file"])


def thread_name(first: str) -> str:
    """`thread (123): ThreadPoolExecutor-0_3` -> `ThreadPoolExecutor-0`."""
    name = first.partition(": ")[2] or first
    return re.sub(r"(_\d+)$", "", name)


def _shares(counter: collections.Counter[str], total: int, top: int) -> list[str]:
    return [f"  {c / total:6.1%}  {f}" for f, c in counter.most_common(top)]


def aggregate(raw: Path, top: int) -> str:
    """Shares of the sampled stacks: per thread, per owner (self and anywhere on the
    stack), and the top frames as leaf (self) and inclusive, as text."""
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_owner: collections.Counter[str] = collections.Counter()
    by_owner_incl: collections.Counter[str] = collections.Counter()
    by_thread: collections.Counter[str] = collections.Counter()
    by_source: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        parts = stack.split(";")
        thread = thread_name(parts.pop(0)) if parts[0].startswith("thread (") else "?"
        frames = [short(f) for f in parts if FRAME.match(f)]
        if not frames:
            continue
        total += n
        by_thread[thread] += n
        names = [f for f, _ in frames]
        source = next((src for f in names for src in SOURCES if f.startswith(src)), None)
        label, who = frames[-1]
        if label.startswith(DISPATCH[0]):  # C run straight from a loop callback
            who = LOOP_C
        leaf[label] += n
        by_owner[who] += n
        by_source[source or (LOOP_C if who == LOOP_C else "rest (loop, threads, other)")] += n
        # Inclusive counts start below the last dispatch point (a loop callback, an
        # executor work item), so entry frames shared by every stack do not crowd the top.
        cut = max((i for i, (f, _) in enumerate(frames) if f.startswith(DISPATCH)), default=-1)
        for seen in {f for f, _ in frames[cut + 1 :]}:
            inclusive[seen] += n
        for seen in {w for _, w in frames[cut + 1 :]}:
            by_owner_incl[seen] += n
    if not total:
        return "no samples"
    out = [f"{total} samples (all threads; idle stacks not sampled)"]
    out.append("by thread: " + ", ".join(f"{t} {c / total:.0%}" for t, c in by_thread.items()))
    out.append(
        "self by owner: " + ", ".join(f"{w} {c / total:.0%}" for w, c in by_owner.most_common())
    )
    out.append(
        "on the stack below the dispatch point by owner: "
        + ", ".join(f"{w} {c / total:.0%}" for w, c in by_owner_incl.most_common())
    )
    out.append("by source (first handler or store loop on the stack):")
    out += _shares(by_source, total, len(SOURCES) + 2)
    out.append(f"top {top} leaf frames (self):")
    out += _shares(leaf, total, top)
    out.append(f"top {top} inclusive frames (below the loop callback / work item):")
    out += _shares(inclusive, total, top)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="py-spy duration")
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--gil",
        action="store_true",
        help="only stacks holding the GIL (py-spy --gil): what the one interpreter runs",
    )
    parser.add_argument("--raw", type=Path, help="aggregate this raw file only (no run)")
    parser.add_argument("--server-src", type=Path, default=REPO, help="source tree to serve")
    args = parser.parse_args(argv)
    if args.raw is not None:
        print(aggregate(args.raw, args.top))
        return 0
    src = use_server_src(args.server_src)
    raw = result_file("profile", "txt")
    with ServerProcess(src) as server:
        ids = wf_agent_ids(args.agents)
        setup(server.address, ids)
        cmd = [str(PY_SPY), "record", "-p", str(server.pid), "-d", f"{args.seconds:g}"]
        cmd += ["-f", "raw", "-o", str(raw), "--full-filenames", "--threads"]
        cmd += ["--nonblocking"] + (["--gil"] if args.gil else [])
        recorder: list[subprocess.CompletedProcess[str]] = []
        timer = threading.Timer(
            START_AFTER,
            lambda: recorder.append(
                subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 60)
            ),
        )
        timer.start()
        # Load until well after the recording ends (it starts START_AFTER s in).
        result = measure_workflow(
            server,
            ids,
            warmup=1.0,
            seconds=args.seconds + START_AFTER + 1,
            in_flight=args.in_flight,
        )
        timer.join()
    if not recorder or recorder[0].returncode != 0:
        print(f"py-spy failed: {recorder[0].stderr if recorder else 'did not run'}")
        return 1
    lat = result["await_latency"]
    print(
        f"load: {result['rate']:,.0f} runs/s start-and-await @{args.in_flight}, "
        f"p50/p99 {lat['p50_ms']:.1f}/{lat['p99_ms']:.1f} ms, server CPU "
        f"{result['server_cpu_pct']:.0f}%; raw stacks in {raw}"
    )
    print(aggregate(raw, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
