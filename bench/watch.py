"""Watch delivery latency: live WatchAgentStates streams under a paced update load.

`watchers` streams (spread over `watcher_procs` grpc.aio client processes, each stream
`WatchAgentStatesRequest()` = live events only) watch every agent while a separate
driver process sends UpdateAgentState at a fixed pace (every 10 ms a burst of
rate/100 calls). Latency of one delivered event = time.time() in the watcher process
when the response carrying it arrives minus the event's server-side `occurred_at`
(same machine, same clock). Counts delivered events against watchers x acknowledged
updates, and records streams the server ended (e.g. RESOURCE_EXHAUSTED: too slow).
"""

from __future__ import annotations

import asyncio
import multiprocessing.synchronize
import time
from array import array
from collections import Counter
from typing import Any

import grpc
from opspawn.opscore.v1 import lifecycle_pb2, lifecycle_pb2_grpc

from bench.common import SPAWN, latency_summary_ms, machine_busy_cpu_seconds
from bench.server import ServerProcess, cpu_seconds

STATES = (lifecycle_pb2.AGENT_STATE_IDLE, lifecycle_pb2.AGENT_STATE_BUSY)


async def _watch(
    address: str,
    streams: int,
    index: int,
    opened: Any,
    first_seen: Any,
    progress: Any,
    stop: multiprocessing.synchronize.Event,
) -> dict[str, Any]:
    revisions = array("q")
    latencies = array("d")
    ended: Counter[str] = Counter()
    first_detail: dict[str, str] = {}
    total = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        calls = [
            stub.WatchAgentStates(lifecycle_pb2.WatchAgentStatesRequest()) for _ in range(streams)
        ]

        async def read(call: Any) -> None:
            nonlocal total
            seen_any = False
            try:
                async for response in call:
                    now = time.time()
                    for event in response.events:
                        at = event.occurred_at
                        revisions.append(event.revision)
                        latencies.append(now - (at.seconds + at.nanos * 1e-9))
                    total += len(response.events)
                    if not seen_any:
                        seen_any = True
                        with first_seen.get_lock():
                            first_seen.value += 1
                ended["OK (server closed stream)"] += 1
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.CANCELLED:
                    ended[exc.code().name] += 1
                    first_detail.setdefault(exc.code().name, exc.details() or "")
            except asyncio.CancelledError:
                pass

        async def report() -> None:
            while True:
                progress[index] = total
                await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(read(c)) for c in calls]
        reporter = asyncio.create_task(report())
        opened.put(streams)
        await asyncio.to_thread(stop.wait)
        reporter.cancel()
        for call in calls:
            call.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "revisions": revisions,
        "latencies": latencies,
        "ended": dict(ended),
        "details": first_detail,
    }


def _watcher_main(
    address: str,
    streams: int,
    index: int,
    opened: Any,
    first_seen: Any,
    progress: Any,
    stop: multiprocessing.synchronize.Event,
    out: Any,
) -> None:
    out.put(asyncio.run(_watch(address, streams, index, opened, first_seen, progress, stop)))


async def _drive(
    address: str, ids: list[str], rate: int, seconds: float, go: multiprocessing.synchronize.Event
) -> dict[str, Any]:
    per_tick = max(1, rate // 100)
    ticks = int(seconds * 100)
    acked: list[int] = []
    errors: Counter[str] = Counter()
    error_details: dict[str, str] = {}
    error_after: list[float] = []
    max_lag = 0.0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        await channel.channel_ready()
        await asyncio.to_thread(go.wait)
        seq = 0

        async def update(n: int) -> None:
            agent_id = ids[n % len(ids)]
            req = lifecycle_pb2.UpdateAgentStateRequest(
                agent_id=agent_id, state=STATES[(n // len(ids)) % 2]
            )
            req.details.update({"seq": n})
            began = time.time()
            try:
                reply = await stub.UpdateAgentState(req, timeout=10)
                acked.append(reply.revision)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                error_details.setdefault(exc.code().name, exc.details() or "")
                error_after.append(time.time() - began)

        pending: set[asyncio.Task[None]] = set()
        started = time.time()
        for tick in range(ticks):
            due = started + tick * 0.01
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                max_lag = max(max_lag, -delay)
            for _ in range(per_tick):
                task = asyncio.create_task(update(seq))
                pending.add(task)
                task.add_done_callback(pending.discard)
                seq += 1
        sent_for = time.time() - started
        await asyncio.gather(*pending)
        finished = time.time() - started
    return {
        "sent": seq,
        "acked": len(acked),
        "min_revision": min(acked, default=0),
        "max_revision": max(acked, default=0),
        "errors": dict(errors),
        "error_details": error_details,
        "error_after_s": [min(error_after, default=0), max(error_after, default=0)],
        "send_seconds": sent_for,
        "finish_seconds": finished,
        "max_pacing_lag_ms": max_lag * 1e3,
    }


def _driver_main(
    address: str,
    ids: list[str],
    rate: int,
    seconds: float,
    go: multiprocessing.synchronize.Event,
    out: Any,
) -> None:
    out.put(asyncio.run(_drive(address, ids, rate, seconds, go)))


def _probe_until_all_streams_live(
    address: str, agent_id: str, first_seen: Any, watchers: int, timeout: float = 60.0
) -> int:
    """Sends state changes until every stream has received an event; returns the
    revision of the last probe (events up to it are excluded from the results)."""
    deadline = time.monotonic() + timeout
    n = 0
    with grpc.insecure_channel(address) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        while True:
            req = lifecycle_pb2.UpdateAgentStateRequest(agent_id=agent_id, state=STATES[n % 2])
            req.details.update({"probe": n})
            revision = int(stub.UpdateAgentState(req, timeout=10).revision)
            n += 1
            time.sleep(0.1)
            if first_seen.value >= watchers:
                return revision
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {first_seen.value}/{watchers} watch streams got events")


def measure_watch(
    server: ServerProcess,
    ids: list[str],
    watchers: int = 100,
    watcher_procs: int = 2,
    rate: int = 1000,
    seconds: float = 5.0,
) -> dict[str, Any]:
    opened = SPAWN.Queue()
    results = SPAWN.Queue()
    driver_out = SPAWN.Queue()
    first_seen = SPAWN.Value("i", 0)
    progress = SPAWN.Array("q", watcher_procs)
    stop = SPAWN.Event()
    go = SPAWN.Event()
    procs = []
    for i in range(watcher_procs):
        streams = watchers // watcher_procs + (1 if i < watchers % watcher_procs else 0)
        proc = SPAWN.Process(
            target=_watcher_main,
            args=(server.address, streams, i, opened, first_seen, progress, stop, results),
            daemon=True,
        )
        proc.start()
        procs.append(proc)
    driver = SPAWN.Process(
        target=_driver_main, args=(server.address, ids, rate, seconds, go, driver_out), daemon=True
    )
    driver.start()
    for _ in procs:
        opened.get(timeout=60)
    start_revision = _probe_until_all_streams_live(server.address, ids[0], first_seen, watchers)
    time.sleep(0.5)  # let probe deliveries settle
    pids = [p.pid for p in procs if p.pid is not None]
    cpu_before = {
        "server": server.cpu_seconds(),
        "watchers": sum(cpu_seconds(pid) for pid in pids),
        "driver": cpu_seconds(driver.pid or 0),
        "machine": machine_busy_cpu_seconds(),
    }
    began = time.time()
    go.set()
    drive = driver_out.get(timeout=seconds + 60)
    elapsed = time.time() - began
    cpu_after = {
        "server": server.cpu_seconds(),
        "watchers": sum(cpu_seconds(pid) for pid in pids),
        "driver": cpu_seconds(driver.pid or 0),
        "machine": machine_busy_cpu_seconds(),
    }
    driver.join(10)
    # Wait for deliveries to stop growing (or everything expected to arrive).
    expected = watchers * drive["acked"]
    last_total, still_since = -1, time.monotonic()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        total = sum(progress[:])
        if total != last_total:
            last_total, still_since = total, time.monotonic()
        elif time.monotonic() - still_since > 1.0:
            break
        time.sleep(0.05)
    stop.set()
    gathered = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(10)

    end_revision = drive["max_revision"]
    latencies: list[float] = []
    ended: Counter[str] = Counter()
    details: dict[str, str] = {}
    for g in gathered:
        for revision, latency in zip(g["revisions"], g["latencies"], strict=True):
            if start_revision < revision <= end_revision:
                latencies.append(latency)
        ended.update(g["ended"])
        details.update(g["details"])
    delivered = len(latencies)
    return {
        "watchers": watchers,
        "watcher_procs": watcher_procs,
        "target_rate": rate,
        "seconds": seconds,
        "updates_sent": drive["sent"],
        "updates_acked": drive["acked"],
        "update_errors": drive["errors"],
        "update_error_details": drive["error_details"],
        "update_error_after_s": drive["error_after_s"],
        "achieved_update_rate": drive["acked"] / drive["finish_seconds"],
        "max_pacing_lag_ms": drive["max_pacing_lag_ms"],
        "events_expected": expected,
        "events_delivered": delivered,
        "delivered_fraction": delivered / expected if expected else float("nan"),
        "streams_ended_early": dict(ended),
        "stream_end_details": details,
        "latency": latency_summary_ms(latencies),
        "server_cpu_pct": 100 * (cpu_after["server"] - cpu_before["server"]) / elapsed,
        "watchers_cpu_pct": 100 * (cpu_after["watchers"] - cpu_before["watchers"]) / elapsed,
        "driver_cpu_pct": 100 * (cpu_after["driver"] - cpu_before["driver"]) / elapsed,
        "machine_cpu_pct": 100 * (cpu_after["machine"] - cpu_before["machine"]) / elapsed,
    }
