"""Durability: graceful restart, kill -9 mid-burst, and SIGTERM with an open watch."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from opspawn.opscore.v1 import lifecycle_pb2 as pb
from opspawn.opscore.v1 import lifecycle_pb2_grpc

from opscore.domain.clock import FakeClock
from opscore.server.config import Settings

if TYPE_CHECKING:
    from conftest import Connect, Rpc, SpawnServer, StartServer, Stub


async def test_restart_keeps_agents_revisions_and_history(
    start_server: StartServer, connect: Connect, settings: Settings, clock: FakeClock, rpc: Rpc
) -> None:
    """After a graceful stop and a new server on the same db file, every agent, state and
    revision is as before, deregistered agents stay gone, revisions continue upward and
    a watch from revision 0 replays the history written before the restart."""
    first = await start_server(settings, clock)
    stub = await connect(first)
    acked: list[int] = []
    for agent_id in ("a", "b", "c"):
        request = pb.RegisterAgentRequest(agent_id=agent_id, name=agent_id)
        acked.append((await stub.RegisterAgent(request)).revision)
    reports = [("a", pb.AGENT_STATE_IDLE), ("b", pb.AGENT_STATE_BUSY), ("a", pb.AGENT_STATE_ERROR)]
    for n, (agent_id, state) in enumerate(reports):
        request = pb.UpdateAgentStateRequest(
            agent_id=agent_id, state=state, details=rpc.struct(n=n)
        )
        acked.append((await stub.UpdateAgentState(request)).revision)
    await stub.DeregisterAgent(pb.DeregisterAgentRequest(agent_id="c"))
    before = {
        agent_id: await stub.GetAgent(pb.GetAgentRequest(agent_id=agent_id))
        for agent_id in ("a", "b")
    }
    listed_before = await stub.ListAgents(pb.ListAgentsRequest())
    history_before = await rpc.replay(stub, 0, until=lambda evs: len(evs) == len(acked) + 1)
    await first.stop()

    second = await start_server(settings, clock)
    stub = await connect(second)
    for agent_id, agent in before.items():
        assert await stub.GetAgent(pb.GetAgentRequest(agent_id=agent_id)) == agent
    assert await stub.ListAgents(pb.ListAgentsRequest()) == listed_before
    await rpc.fails(stub.GetAgent(pb.GetAgentRequest(agent_id="c")), grpc.StatusCode.NOT_FOUND)

    history_after = await rpc.replay(stub, 0, history_before[-1].revision)
    assert history_after == history_before
    assert set(acked) <= {e.revision for e in history_after}

    later = await stub.UpdateAgentState(
        pb.UpdateAgentStateRequest(agent_id="b", state=pb.AGENT_STATE_IDLE)
    )
    assert later.revision > history_before[-1].revision


async def test_kill_9_loses_no_acknowledged_update(
    spawn_server: SpawnServer, tmp_path: Path, rpc: Rpc
) -> None:
    """Killing the server with SIGKILL in the middle of a burst of concurrent state reports
    loses none that were acknowledged: after a restart every agent shows at least its last
    acknowledged report and the event history holds every acknowledged revision."""
    db = tmp_path / "crash.db"
    process = await spawn_server(db)
    agents = [f"agent-{i:02d}" for i in range(32)]
    per_agent = 40
    kill_after = 500
    last_acked: dict[str, int] = {}
    acked: dict[int, tuple[str, int]] = {}
    failures: list[grpc.StatusCode] = []

    async with grpc.aio.insecure_channel(process.address) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        for agent_id in agents:
            await stub.RegisterAgent(pb.RegisterAgentRequest(agent_id=agent_id, name=agent_id))

        async def worker(agent_id: str) -> None:
            # One agent's reports are sequential, so "last acknowledged" is well defined;
            # the 32 agents run concurrently.
            for n in range(per_agent):
                try:
                    reply = await stub.UpdateAgentState(
                        pb.UpdateAgentStateRequest(
                            agent_id=agent_id,
                            state=pb.AGENT_STATE_BUSY,
                            details=rpc.struct(n=n),
                        ),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError as err:
                    failures.append(err.code())
                    return
                last_acked[agent_id] = n
                acked[reply.revision] = (agent_id, n)
                if len(acked) == kill_after:
                    process.kill()

        await asyncio.gather(*(worker(agent_id) for agent_id in agents))

    assert await process.wait_exit(5) is not None, "server survived SIGKILL"
    assert failures, "the burst finished before the kill; nothing was tested"
    assert len(acked) >= kill_after

    restarted = await spawn_server(db)
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        for agent_id, n in last_acked.items():
            agent = await stub.GetAgent(pb.GetAgentRequest(agent_id=agent_id))
            assert agent.state == pb.AGENT_STATE_BUSY
            assert agent.state_details["n"] >= n, agent_id

        events = await rpc.replay(stub, 0, max(acked))
        by_revision = {e.revision: e for e in events}
        missing = sorted(set(acked) - set(by_revision))
        assert not missing, f"acknowledged revisions missing after restart: {missing[:10]}"
        for revision, (agent_id, n) in acked.items():
            assert by_revision[revision].agent.agent_id == agent_id
            assert by_revision[revision].agent.state_details["n"] == n

        after = await stub.UpdateAgentState(
            pb.UpdateAgentStateRequest(agent_id=agents[0], state=pb.AGENT_STATE_IDLE)
        )
        assert after.revision > max(acked)


async def test_sigterm_ends_watch_and_exits_cleanly(spawn_server: SpawnServer, rpc: Rpc) -> None:
    """SIGTERM with an open watch stream makes the server exit with code 0 within a few
    seconds, and the client's stream ends (OK or UNAVAILABLE) instead of hanging."""
    process = await spawn_server(OPSCORE_SHUTDOWN_GRACE="1")
    async with grpc.aio.insecure_channel(process.address) as channel:
        stub: Stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        await stub.RegisterAgent(pb.RegisterAgentRequest(agent_id="watched", name="watched"))
        call = stub.WatchAgentStates(pb.WatchAgentStatesRequest(send_initial_state=True))
        await rpc.read_events(
            call, lambda evs: bool(evs) and evs[-1].type == pb.AGENT_EVENT_TYPE_SYNCED
        )

        process.terminate()

        async def drain() -> grpc.StatusCode:
            try:
                while await call.read() is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        code = await asyncio.wait_for(drain(), 5)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)

    exit_code = await process.wait_exit(6)
    assert exit_code == 0, f"exit code {exit_code}:\n{process.log_tail()}"
