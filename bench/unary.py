"""Closed-loop unary throughput: N calls kept in flight by grpc.aio client processes.

Measures two RPCs the same way so their rates can be compared:
  * `health`: grpc.health.v1.Health/Check, an empty RPC with no storage work (the
    baseline every other figure is divided by);
  * `update`: LifecycleService/UpdateAgentState, each call a real, durable state change
    (IDLE/BUSY alternating, details {"seq": n}), acknowledged only after its SQLite
    commit (group commit).
Each in-flight slot is an asyncio task that issues its next call as soon as the previous
one returns; calls completing inside the measurement window (after the warm-up) count.
"""

from __future__ import annotations

import asyncio
import multiprocessing.synchronize
import time
from collections import Counter
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opspawn.opscore.v1 import lifecycle_pb2, lifecycle_pb2_grpc

from bench.common import SPAWN, latency_summary_ms, machine_busy_cpu_seconds
from bench.server import ServerProcess

STATES = (lifecycle_pb2.AGENT_STATE_IDLE, lifecycle_pb2.AGENT_STATE_BUSY)


async def _run_worker(
    address: str,
    kind: str,
    slots: list[int],
    total_slots: int,
    ids: list[str],
    go: multiprocessing.synchronize.Event,
    t0: Any,
    warmup: float,
    seconds: float,
    ready: Any,
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected
        ready.put(True)
        await asyncio.to_thread(go.wait)
        start = t0.value + warmup
        end = start + seconds
        counted = 0
        acked = 0
        mismatched = 0
        errors: Counter[str] = Counter()
        latencies: list[float] = []
        cpu: dict[str, float] = {}

        async def sample_cpu() -> None:
            await asyncio.sleep(max(0.0, start - time.time()))
            cpu["start"] = time.process_time()
            await asyncio.sleep(max(0.0, end - time.time()))
            cpu["end"] = time.process_time()

        async def slot_loop(slot: int) -> None:
            nonlocal counted, acked, mismatched
            mine = [ids[j] for j in range(slot, len(ids), total_slots)]
            toggles = dict.fromkeys(mine, 0)
            seq = 0
            while True:
                began = time.perf_counter()
                try:
                    if kind == "health":
                        await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    else:
                        agent_id = mine[seq % len(mine)]
                        state = STATES[toggles[agent_id] % 2]
                        toggles[agent_id] += 1
                        req = lifecycle_pb2.UpdateAgentStateRequest(agent_id=agent_id, state=state)
                        req.details.update({"seq": seq})
                        seq += 1
                        reply = await lifecycle.UpdateAgentState(req, timeout=10)
                        acked += 1
                        if reply.state != state or reply.state_details["seq"] != seq - 1:
                            mismatched += 1
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    if sum(errors.values()) > 1000:
                        return
                    await asyncio.sleep(0.01)
                    continue
                now = time.time()
                if now >= end:
                    return
                if now >= start:
                    counted += 1
                    latencies.append(time.perf_counter() - began)

        await asyncio.gather(sample_cpu(), *(slot_loop(s) for s in slots))
        return {
            "counted": counted,
            "acked_total": acked,
            "mismatched": mismatched,
            "errors": dict(errors),
            "latencies": latencies,
            "cpu_seconds": cpu.get("end", 0.0) - cpu.get("start", 0.0),
        }


def _worker_main(
    address: str,
    kind: str,
    slots: list[int],
    total_slots: int,
    ids: list[str],
    go: multiprocessing.synchronize.Event,
    t0: Any,
    warmup: float,
    seconds: float,
    ready: Any,
    out: Any,
) -> None:
    result = asyncio.run(
        _run_worker(address, kind, slots, total_slots, ids, go, t0, warmup, seconds, ready)
    )
    out.put(result)


def measure_rate(
    server: ServerProcess,
    kind: str,
    in_flight: int,
    client_procs: int,
    warmup: float,
    seconds: float,
    ids: list[str] | None = None,
) -> dict[str, Any]:
    """Runs `in_flight` concurrent call loops spread over `client_procs` processes."""
    ids = ids or []
    if kind == "update" and len(ids) < in_flight:
        raise ValueError("need at least one agent per in-flight call")
    go = SPAWN.Event()
    t0 = SPAWN.Value("d", 0.0)
    ready = SPAWN.Queue()
    out = SPAWN.Queue()
    procs = []
    for p in range(client_procs):
        slots = list(range(p, in_flight, client_procs))
        proc = SPAWN.Process(
            target=_worker_main,
            args=(server.address, kind, slots, in_flight, ids, go, t0, warmup, seconds, ready, out),
            daemon=True,
        )
        proc.start()
        procs.append(proc)
    for _ in procs:
        ready.get(timeout=60)
    t0.value = time.time() + 0.05
    go.set()
    time.sleep(max(0.0, t0.value + warmup - time.time()))
    server_cpu_start = server.cpu_seconds()
    machine_start = machine_busy_cpu_seconds()
    time.sleep(max(0.0, t0.value + warmup + seconds - time.time()))
    server_cpu = server.cpu_seconds() - server_cpu_start
    machine_cpu = machine_busy_cpu_seconds() - machine_start
    results = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(10)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    for r in results:
        latencies.extend(r["latencies"])
        errors.update(r["errors"])
    counted = sum(r["counted"] for r in results)
    return {
        "kind": kind,
        "in_flight": in_flight,
        "client_procs": client_procs,
        "seconds": seconds,
        "calls": counted,
        "rate": counted / seconds,
        "errors": dict(errors),
        "mismatched_replies": sum(r["mismatched"] for r in results),
        "acked_total": sum(r["acked_total"] for r in results),
        "latency": latency_summary_ms(latencies),
        "server_cpu_pct": 100 * server_cpu / seconds,
        "client_cpu_pct": [round(100 * r["cpu_seconds"] / seconds, 1) for r in results],
        "machine_cpu_pct": 100 * machine_cpu / seconds,
    }
