"""Single-step workflows as a client sees them: start-and-await (StartWorkflow wait=true).

Setup (not measured): `agents` agents registered with capability `bench-wf`, and one stored
definition `bench_single_step` (one task needing `bench-wf`). Two spawned grpc.aio client
processes then run against the server:
  * the agents process opens one StreamTasks(max_in_flight=1) per agent (all on one channel;
    CompleteTask calls go over a second channel/connection) and answers every TaskAssignment
    at once with CompleteTask(output {"n": k});
  * the starter process calls StartWorkflow(workflow_definition_id=bench_single_step,
    input {"t": time.time()}, request_id, wait=true), which returns the final Session once
    the run ended, either closed-loop (`in_flight` calls open at once, the next sent as one
    returns) or open-loop paced (every 10 ms a burst of rate/100 starts).
Headline rate = runs whose awaited StartWorkflow returned COMPLETED with the agent's output
inside the window / window length, with the client's start-and-await latency; the agents
process's CompleteTask count is kept as a second column. Dispatch latency = agent receipt
time (time.time()) - the StartWorkflow send time carried in payload.input.t; after shutdown
it is also computed from the task's server-side TASK_QUEUED event time (read from the
database). After the window the starter stops, runs in flight return, and the sessions are
verified: none left PENDING/RUNNING (ListSessions), a sample is COMPLETED with the agent's
output (GetSession), and the database counts sessions by status.
"""

from __future__ import annotations

import asyncio
import multiprocessing.synchronize
import random
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
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
from bench.unary import measure_rate

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
                    sent = assignment.payload.fields["input"].struct_value.fields["t"].number_value
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
    completed_total: Any,
    go: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    ready: Any,
    out: Any,
) -> None:
    out.put(asyncio.run(_run_agents(address, ids, window, completed_total, go, stop, ready)))


# -- starter process --------------------------------------------------------------------


def _awaited_ok(session: session_pb2.Session) -> bool:
    """The final Session a client gets back: COMPLETED, with the agent's output."""
    task_output = session.output.fields.get(TASK_ID)
    return (
        session.status == session_pb2.SESSION_STATUS_COMPLETED
        and task_output is not None
        and "n" in task_output.struct_value.fields
    )


async def _run_starter(
    address: str,
    in_flight: int,
    rate: float,
    window: Any,
    go: multiprocessing.synchronize.Event,
    started_total: Any,
    ready: Any,
) -> dict[str, Any]:
    awaited = 0  # runs sent and returned COMPLETED with output inside the window
    bad: Counter[str] = Counter()  # returned, but not COMPLETED with the agent's output
    errors: Counter[str] = Counter()
    latencies: list[float] = []  # start-and-await, as the client sees it
    cpu: dict[str, float] = {}
    pending: set[asyncio.Task[None]] = set()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = workflow_pb2_grpc.WorkflowServiceStub(channel)
        await channel.channel_ready()
        ready.put(True)
        await asyncio.to_thread(go.wait)
        t0, start, end = window[0], window[1], window[2]
        await asyncio.sleep(max(0.0, t0 - time.time()))

        async def start_and_await() -> None:
            nonlocal awaited
            sent = time.time()
            req = workflow_pb2.StartWorkflowRequest(
                workflow_definition_id=DEFINITION_ID, request_id=str(uuid.uuid4()), wait=True
            )
            req.input.update({"t": sent})
            began = time.perf_counter()
            try:
                session = await stub.StartWorkflow(req, timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] += 1
                return
            took = time.perf_counter() - began
            with started_total.get_lock():
                started_total.value += 1
            if not _awaited_ok(session):
                bad[STATUS_NAMES.get(session.status, str(session.status))] += 1
            elif start <= time.time() < end:
                awaited += 1
                latencies.append(took)

        async def closed_loop_slot() -> None:
            while time.time() < end:
                await start_and_await()

        def launch() -> None:
            task = asyncio.create_task(start_and_await())
            pending.add(task)
            task.add_done_callback(pending.discard)

        async def sample_cpu() -> None:
            await asyncio.sleep(max(0.0, start - time.time()))
            cpu["start"] = time.process_time()
            await asyncio.sleep(max(0.0, end - time.time()))
            cpu["end"] = time.process_time()

        sampler = asyncio.create_task(sample_cpu())
        if in_flight > 0:  # closed loop: `in_flight` calls open at once
            await asyncio.gather(*(closed_loop_slot() for _ in range(in_flight)))
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
    return {
        "awaited": awaited,
        "not_completed": dict(bad),
        "errors": dict(errors),
        "await_latencies": latencies,
        "cpu_seconds": cpu.get("end", 0.0) - cpu.get("start", 0.0),
    }


def _starter_main(
    address: str,
    in_flight: int,
    rate: float,
    window: Any,
    go: multiprocessing.synchronize.Event,
    started_total: Any,
    ready: Any,
    out: Any,
) -> None:
    out.put(asyncio.run(_run_starter(address, in_flight, rate, window, go, started_total, ready)))


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
    """Closed loop with `in_flight` awaited runs open, or open loop at `rate` starts/s
    (in_flight=0); every start awaits its run's end (StartWorkflow wait=true)."""
    closed = in_flight > 0
    go = SPAWN.Event()
    stop = SPAWN.Event()
    ready = SPAWN.Queue()
    agents_out = SPAWN.Queue()
    starter_out = SPAWN.Queue()
    completed_total = SPAWN.Value("q", 0)
    started_total = SPAWN.Value("q", 0)
    window = SPAWN.Array("d", 3)  # t0, window start, window end (time.time()), set at `go`
    agents = SPAWN.Process(
        target=_agents_main,
        args=(server.address, ids, window, completed_total, go, stop, ready, agents_out),
        daemon=True,
    )
    starter = SPAWN.Process(
        target=_starter_main,
        args=(server.address, in_flight, rate, window, go, started_total, ready, starter_out),
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
    starter_result = starter_out.get(timeout=90)  # after every awaited run returned
    starter.join(10)
    # Every awaited run returned, so the agents have answered all of them.
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
        "awaited": starter_result["awaited"],
        "rate": starter_result["awaited"] / seconds,
        "await_latency": latency_summary_ms(starter_result["await_latencies"]),
        "agent_completed": agents_result["counted"],
        "agent_rate": agents_result["counted"] / seconds,
        "started_total": started_total.value,
        "completed_total": completed_total.value,
        "drained": drained,
        "start_errors": starter_result["errors"],
        "not_completed": starter_result["not_completed"],
        "complete_errors": agents_result["errors"],
        "stream_ends": agents_result["stream_ends"],
        "dispatch_latency": latency_summary_ms(dispatch),
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


def run_on_fresh_server(
    src: Path,
    env: Mapping[str, str],
    agents: int,
    warmup: float,
    seconds: float,
    in_flight: int = 0,
    rate: float = 0.0,
) -> dict[str, Any]:
    """One measurement on its own server. A closed-loop run first measures the empty RPC
    (Health/Check) at the same in-flight count on that same server, its denominator."""
    with ServerProcess(src, env) as server:
        ids = wf_agent_ids(agents)
        setup(server.address, ids)
        baseline = (
            measure_rate(server, "health", in_flight, 1, warmup, seconds) if in_flight else None
        )
        result = measure_workflow(server, ids, warmup, seconds, in_flight=in_flight, rate=rate)
        server.stop()
        result["server"] = {"exit_code": server.exit_code, "warnings": server.problems[:5]}
        finish_with_db(result, server)
    if baseline is not None:
        result["baseline"] = baseline
        result["ratio_to_empty_rpc"] = result["rate"] / baseline["rate"]
    return result


def check_problems(r: dict[str, Any]) -> list[str]:
    """What a finished measurement's checks found wrong (empty: every check passed)."""
    v = r["verification"]
    keys = ("start_errors", "not_completed", "complete_errors", "stream_ends")
    problems = [f"{k} {r[k]}" for k in keys if r[k]]
    if not r["drained"]:
        problems.append("not drained")
    if v.get("open_after_drain"):
        problems.append(f"{v['open_after_drain']} sessions still open")
    db = v.get("db_sessions_by_status", {})
    if db != {"SESSION_STATUS_COMPLETED": r["completed_total"]}:
        problems.append(f"db {db}")
    if v.get("sample_with_agent_output") != v.get("sample"):
        problems.append(f"sample {v.get('sample_statuses')}")
    if r["server"]["exit_code"] != 0:
        problems.append(f"server exit {r['server']['exit_code']}")
    return problems
