"""Single-step workflow throughput and dispatch latency (StartWorkflow -> dispatch -> CompleteTask).

Setup (not measured): `agents` agents registered with capability `bench-wf`, and one stored
definition `bench_single_step` (one task needing `bench-wf`). Two spawned grpc.aio client
processes then run against the server:
  * the agents process opens one StreamTasks(max_in_flight=1) per agent (all on one channel;
    CompleteTask calls go over a second channel/connection) and answers every TaskAssignment
    at once with CompleteTask(output {"n": k});
  * the starter process calls StartWorkflow(workflow_definition_id=bench_single_step,
    input {"t": time.time()}), either closed-loop (`in_flight` sessions open at once: a new
    run starts when the agents process reports a completion over a pipe) or open-loop paced
    (every 10 ms a burst of rate/100 starts).
Throughput = CompleteTask calls acknowledged inside the window / window length (counted by
the agents process). Dispatch latency = agent receipt time (time.time()) - the StartWorkflow
send time carried in payload.input.t (an upper bound of ready -> received: it includes the
StartWorkflow call's own server work); after shutdown the same latency is also computed from
the task's server-side TASK_QUEUED event time (the ready time, read from the database).
After the window the starter stops, in-flight runs drain, and the sessions are verified:
no session left PENDING/RUNNING (ListSessions), a sample is COMPLETED with the agent's
output (GetSession), and the database counts sessions by status.
"""

from __future__ import annotations

import asyncio
import multiprocessing.connection
import multiprocessing.synchronize
import random
import sqlite3
import time
from collections import Counter
from typing import Any

import grpc
from opspawn.opscore.v1 import (
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    session_pb2,
    session_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)

from bench.common import SPAWN, latency_summary_ms, machine_busy_cpu_seconds
from bench.server import ServerProcess

CAPABILITY = "bench-wf"
DEFINITION_ID = "bench_single_step"
TASK_ID = "work"
MAX_IN_FLIGHT_PER_AGENT = 1
TICK = 0.01  # open-loop pacing interval (s)
EVENT_TASK_QUEUED = 2  # session_events.type (SessionEventType.TASK_QUEUED)
STATUS_NAMES = {v: k for k, v in session_pb2.SessionStatus.items()}


def wf_agent_ids(count: int) -> list[str]:
    return [f"bench-wf-agent-{i:03d}" for i in range(count)]


def setup(address: str, ids: list[str]) -> None:
    """Registers the agents and stores the single-step definition (not measured)."""
    with grpc.insecure_channel(address) as channel:
        lifecycle = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        for agent_id in ids:
            lifecycle.RegisterAgent(
                lifecycle_pb2.RegisterAgentRequest(
                    agent_id=agent_id, name=agent_id, version="1", capabilities=[CAPABILITY]
                ),
                timeout=10,
            )
        workflow_pb2_grpc.WorkflowServiceStub(channel).CreateWorkflowDefinition(
            workflow_pb2.CreateWorkflowDefinitionRequest(
                definition=workflow_pb2.WorkflowDefinition(
                    id=DEFINITION_ID,
                    name="bench single step",
                    version="1",
                    tasks=[
                        workflow_pb2.TaskDefinition(
                            task_id=TASK_ID, name="work", agent_capability=CAPABILITY
                        )
                    ],
                )
            ),
            timeout=10,
        )


def wait_agents_idle(address: str, ids: list[str], timeout: float = 30.0) -> None:
    """Waits until every agent is IDLE, i.e. its task stream was accepted."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        pending = list(ids)
        while pending:
            pending = [
                a
                for a in pending
                if stub.GetAgent(lifecycle_pb2.GetAgentRequest(agent_id=a), timeout=10).state
                != lifecycle_pb2.AGENT_STATE_IDLE
            ]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} agents never became IDLE")
            if pending:
                time.sleep(0.05)


# -- agents process ---------------------------------------------------------------------


async def _run_agents(
    address: str,
    ids: list[str],
    window: Any,
    notify: multiprocessing.connection.Connection | None,
    completed_total: Any,
    go: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    ready: Any,
) -> dict[str, Any]:
    start = end = float("inf")  # set from `window` at `go`
    counted = 0
    assignments = 0
    errors: Counter[str] = Counter()
    stream_ends: Counter[str] = Counter()
    complete_latencies: list[float] = []
    # every received assignment: session id, send time (input.t), receipt time
    received: list[tuple[str, float, float]] = []
    cpu: dict[str, float] = {}
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
    async with (
        grpc.aio.insecure_channel(address) as stream_channel,
        grpc.aio.insecure_channel(address, options=options) as call_channel,
    ):
        streams = workflow_pb2_grpc.WorkflowServiceStub(stream_channel)
        calls = workflow_pb2_grpc.WorkflowServiceStub(call_channel)
        n = 0

        async def serve(agent_id: str) -> None:
            nonlocal counted, assignments, n
            call = streams.StreamTasks(
                workflow_pb2.StreamTasksRequest(
                    agent_id=agent_id, max_in_flight=MAX_IN_FLIGHT_PER_AGENT
                )
            )
            try:
                async for assignment in call:
                    now = time.time()
                    assignments += 1
                    sent = assignment.payload["input"]["t"]
                    received.append((assignment.session_id, sent, now))
                    n += 1
                    req = workflow_pb2.CompleteTaskRequest(task_token=assignment.task_token)
                    req.output.update({"n": n})
                    began = time.perf_counter()
                    try:
                        await calls.CompleteTask(req, timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        errors[exc.code().name] += 1
                        continue
                    done = time.time()
                    with completed_total.get_lock():
                        completed_total.value += 1
                    if notify is not None:
                        notify.send_bytes(b"")
                    if start <= done < end:
                        counted += 1
                        complete_latencies.append(time.perf_counter() - began)
                stream_ends["OK (server closed stream)"] += 1
            except grpc.aio.AioRpcError as exc:
                if not stop.is_set():
                    stream_ends[exc.code().name] += 1
            except asyncio.CancelledError:
                pass

        tasks = [asyncio.create_task(serve(a)) for a in ids]
        ready.put(True)
        await asyncio.to_thread(go.wait)
        start, end = window[1], window[2]
        await asyncio.sleep(max(0.0, start - time.time()))
        cpu["start"] = time.process_time()
        await asyncio.sleep(max(0.0, end - time.time()))
        cpu["end"] = time.process_time()
        await asyncio.to_thread(stop.wait)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "counted": counted,
        "assignments": assignments,
        "errors": dict(errors),
        "stream_ends": dict(stream_ends),
        "complete_latencies": complete_latencies,
        "received": received,
        "cpu_seconds": cpu.get("end", 0.0) - cpu.get("start", 0.0),
    }


def _agents_main(
    address: str,
    ids: list[str],
    window: Any,
    notify: multiprocessing.connection.Connection | None,
    completed_total: Any,
    go: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    ready: Any,
    out: Any,
) -> None:
    out.put(
        asyncio.run(_run_agents(address, ids, window, notify, completed_total, go, stop, ready))
    )


# -- starter process --------------------------------------------------------------------


async def _run_starter(
    address: str,
    in_flight: int,
    rate: float,
    window: Any,
    go: multiprocessing.synchronize.Event,
    completions: multiprocessing.connection.Connection | None,
    started_total: Any,
    ready: Any,
) -> dict[str, Any]:
    started = 0  # acknowledged StartWorkflow calls sent inside the window
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    cpu: dict[str, float] = {}
    pending: set[asyncio.Task[None]] = set()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = workflow_pb2_grpc.WorkflowServiceStub(channel)
        await channel.channel_ready()
        ready.put(True)
        await asyncio.to_thread(go.wait)
        t0, start, end = window[0], window[1], window[2]
        await asyncio.sleep(max(0.0, t0 - time.time()))
        slots = asyncio.Semaphore(in_flight)
        loop = asyncio.get_running_loop()
        if completions is not None:

            def on_completion() -> None:
                assert completions is not None
                while completions.poll():
                    completions.recv_bytes()
                    slots.release()

            loop.add_reader(completions.fileno(), on_completion)

        async def start_one() -> None:
            nonlocal started
            sent = time.time()
            req = workflow_pb2.StartWorkflowRequest(workflow_definition_id=DEFINITION_ID)
            req.input.update({"t": sent})
            began = time.perf_counter()
            try:
                await stub.StartWorkflow(req, timeout=10)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                if completions is not None:
                    slots.release()  # this run will never complete
                return
            with started_total.get_lock():
                started_total.value += 1
            if start <= sent < end:
                started += 1
                latencies.append(time.perf_counter() - began)

        def launch() -> None:
            task = asyncio.create_task(start_one())
            pending.add(task)
            task.add_done_callback(pending.discard)

        async def sample_cpu() -> None:
            await asyncio.sleep(max(0.0, start - time.time()))
            cpu["start"] = time.process_time()
            await asyncio.sleep(max(0.0, end - time.time()))
            cpu["end"] = time.process_time()

        sampler = asyncio.create_task(sample_cpu())
        if completions is not None:  # closed loop: `in_flight` runs open at once
            while True:
                await slots.acquire()
                if time.time() >= end:
                    break
                launch()
        else:  # open loop: every TICK a burst, so the mean rate is `rate`
            tick = 0
            issued = 0
            while time.time() < end:
                tick += 1
                due = int(rate * TICK * tick)
                for _ in range(due - issued):
                    launch()
                issued = due
                await asyncio.sleep(max(0.0, t0 + tick * TICK - time.time()))
        await sampler
        if pending:
            await asyncio.gather(*list(pending), return_exceptions=True)
        if completions is not None:
            loop.remove_reader(completions.fileno())
    return {
        "started": started,
        "errors": dict(errors),
        "start_latencies": latencies,
        "cpu_seconds": cpu.get("end", 0.0) - cpu.get("start", 0.0),
    }


def _starter_main(
    address: str,
    in_flight: int,
    rate: float,
    window: Any,
    go: multiprocessing.synchronize.Event,
    completions: multiprocessing.connection.Connection | None,
    started_total: Any,
    ready: Any,
    out: Any,
) -> None:
    out.put(
        asyncio.run(
            _run_starter(address, in_flight, rate, window, go, completions, started_total, ready)
        )
    )


# -- verification -----------------------------------------------------------------------


def verify_sessions(address: str, completed_ids: list[str], sample: int = 20) -> dict[str, Any]:
    """After the drain: nothing left open, and a sample of runs is COMPLETED with output."""
    open_statuses = [session_pb2.SESSION_STATUS_PENDING, session_pb2.SESSION_STATUS_RUNNING]
    with grpc.insecure_channel(address) as channel:
        sessions = session_pb2_grpc.SessionServiceStub(channel)
        still_open = 0
        token = ""
        while True:
            page = sessions.ListSessions(
                session_pb2.ListSessionsRequest(
                    statuses=open_statuses, page_size=1000, page_token=token
                ),
                timeout=30,
            )
            still_open += len(page.sessions)
            token = page.next_page_token
            if not token:
                break
        picked = random.Random(1).sample(completed_ids, min(sample, len(completed_ids)))
        statuses: Counter[str] = Counter()
        with_output = 0
        for session_id in picked:
            s = sessions.GetSession(session_pb2.GetSessionRequest(session_id=session_id))
            statuses[STATUS_NAMES[s.status]] += 1
            task = s.tasks[0] if s.tasks else None
            if (
                task is not None
                and task.status == session_pb2.TASK_STATUS_COMPLETED
                and "n" in task.output
                and TASK_ID in s.output
            ):
                with_output += 1
    return {
        "open_after_drain": still_open,
        "sample": len(picked),
        "sample_statuses": dict(statuses),
        "sample_with_agent_output": with_output,
    }


def db_summary(db: Any, received: list[tuple[str, float, float]]) -> dict[str, Any]:
    """Sessions by status, and ready (TASK_QUEUED occurred_at) -> receipt latencies."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        by_status = {
            STATUS_NAMES.get(status, str(status)): count
            for status, count in conn.execute(
                "SELECT status, COUNT(*) FROM sessions GROUP BY status"
            )
        }
        queued = dict(
            conn.execute(
                "SELECT session_id, MIN(occurred_at) FROM session_events WHERE type = ? "
                "GROUP BY session_id",
                (EVENT_TASK_QUEUED,),
            )
        )
    lat = [now - queued[sid] / 1e6 for sid, _, now in received if sid in queued]
    return {"sessions_by_status": by_status, "queued_to_receipt": lat}


# -- one measurement --------------------------------------------------------------------


def measure_workflow(
    server: ServerProcess,
    ids: list[str],
    warmup: float,
    seconds: float,
    in_flight: int = 0,
    rate: float = 0.0,
) -> dict[str, Any]:
    """Closed loop with `in_flight` open runs, or open loop at `rate` starts/s (in_flight=0)."""
    closed = in_flight > 0
    go = SPAWN.Event()
    stop = SPAWN.Event()
    ready = SPAWN.Queue()
    agents_out = SPAWN.Queue()
    starter_out = SPAWN.Queue()
    completed_total = SPAWN.Value("q", 0)
    started_total = SPAWN.Value("q", 0)
    window = SPAWN.Array("d", 3)  # t0, window start, window end (time.time()), set at `go`
    recv_end, send_end = SPAWN.Pipe(duplex=False) if closed else (None, None)
    agents = SPAWN.Process(
        target=_agents_main,
        args=(server.address, ids, window, send_end, completed_total, go, stop, ready, agents_out),
        daemon=True,
    )
    starter = SPAWN.Process(
        target=_starter_main,
        args=(
            server.address,
            in_flight or 1,
            rate,
            window,
            go,
            recv_end,
            started_total,
            ready,
            starter_out,
        ),
        daemon=True,
    )
    agents.start()
    starter.start()
    ready.get(timeout=60)
    ready.get(timeout=60)
    wait_agents_idle(server.address, ids)  # every task stream is open
    t0 = time.time() + 0.05
    start, end = t0 + warmup, t0 + warmup + seconds
    window[:] = [t0, start, end]
    go.set()
    time.sleep(max(0.0, start - time.time()))
    server_cpu_start = server.cpu_seconds()
    machine_start = machine_busy_cpu_seconds()
    time.sleep(max(0.0, end - time.time()))
    server_cpu = server.cpu_seconds() - server_cpu_start
    machine_cpu = machine_busy_cpu_seconds() - machine_start
    starter_result = starter_out.get(timeout=60)
    starter.join(10)
    # Drain: every started run should complete (agents answer at once).
    drain_deadline = time.monotonic() + 15
    while completed_total.value < started_total.value and time.monotonic() < drain_deadline:
        time.sleep(0.02)
    drained = completed_total.value >= started_total.value
    stop.set()
    agents_result = agents_out.get(timeout=60)
    agents.join(10)
    received = agents_result.pop("received")
    completed_ids = [sid for sid, _, _ in received]
    verification = verify_sessions(server.address, completed_ids) if completed_ids else {}
    in_window = [(sid, sent, now) for sid, sent, now in received if start <= sent < end]
    dispatch = [now - sent for _, sent, now in in_window]
    return {
        "mode": "closed" if closed else "open",
        "in_flight": in_flight if closed else None,
        "target_rate": rate if not closed else None,
        "agents": len(ids),
        "max_in_flight_per_agent": MAX_IN_FLIGHT_PER_AGENT,
        "seconds": seconds,
        "completed": agents_result["counted"],
        "rate": agents_result["counted"] / seconds,
        "started_in_window": starter_result["started"],
        "start_rate": starter_result["started"] / seconds,
        "started_total": started_total.value,
        "completed_total": completed_total.value,
        "drained": drained,
        "start_errors": starter_result["errors"],
        "complete_errors": agents_result["errors"],
        "stream_ends": agents_result["stream_ends"],
        "dispatch_latency": latency_summary_ms(dispatch),
        "start_latency": latency_summary_ms(starter_result["start_latencies"]),
        "complete_latency": latency_summary_ms(agents_result["complete_latencies"]),
        "verification": verification,
        "server_cpu_pct": 100 * server_cpu / seconds,
        "client_cpu_pct": {
            "starter": round(100 * starter_result["cpu_seconds"] / seconds, 1),
            "agents": round(100 * agents_result["cpu_seconds"] / seconds, 1),
        },
        "machine_cpu_pct": 100 * machine_cpu / seconds,
        "_received_in_window": in_window,  # for db_summary after shutdown; dropped then
    }


def finish_with_db(result: dict[str, Any], server: ServerProcess) -> None:
    """After the server stopped: DB session counts and ready -> receipt latency."""
    in_window = result.pop("_received_in_window")
    summary = db_summary(server.db, in_window)
    result["verification"]["db_sessions_by_status"] = summary["sessions_by_status"]
    result["queued_to_receipt_latency"] = latency_summary_ms(summary["queued_to_receipt"])
