"""The Store contract, run against every backend (today: SQLite, both commit paths)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from opscore.protocol.enums import AgentEventType, AgentState
from opscore.protocol.errors import AgentNotFoundError, StorageError

from opscore.domain.agents.model import Agent, AgentChange, AgentEvent, AgentFilter
from opscore.store.base import Store
from opscore.store.sqlite.engine import SqliteConfig
from opscore.store.sqlite.store import SqliteStore

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

BACKENDS: dict[str, Callable[[Path], Store]] = {
    "sqlite": lambda tmp: SqliteStore(SqliteConfig(tmp / "store.db", max_batch=64)),
    # FULL commits run on the writer thread instead of the event loop.
    "sqlite-full": lambda tmp: SqliteStore(
        SqliteConfig(tmp / "store.db", synchronous="FULL", max_batch=64)
    ),
}


@pytest.fixture(params=sorted(BACKENDS))
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    factory = BACKENDS[request.param]
    return lambda: factory(tmp_path)


@pytest.fixture
async def store(make_store: Callable[[], Store]) -> AsyncIterator[Store]:
    s = make_store()
    await s.open()
    yield s
    await s.close()


def new_agent(agent_id: str, capabilities: tuple[str, ...] = ("x",)) -> Agent:
    return Agent(
        agent_id=agent_id,
        name=agent_id,
        version="1",
        capabilities=capabilities,
        contact_endpoint="",
        metadata={"k": "v"},
        state=AgentState.INITIALIZING,
        state_details={},
        registered_at=NOW,
        state_updated_at=NOW,
        last_heartbeat_at=NOW,
        state_observed_at=None,
        revision=0,
    )


def create(agent: Agent) -> Callable[[Agent | None], AgentChange]:
    return lambda _current: AgentChange(agent, AgentEventType.REGISTERED, NOW)


def set_state(state: AgentState) -> Callable[[Agent | None], AgentChange]:
    def decide(current: Agent | None) -> AgentChange:
        if current is None:
            raise AgentNotFoundError("?")
        return AgentChange(current.evolve(state=state), AgentEventType.STATE_CHANGED, NOW)

    return decide


async def test_changes_get_increasing_revisions_and_events(store: Store) -> None:
    """Each change commits with its event; the row carries the event's revision."""
    agent, event = await store.change_agent("a", create(new_agent("a")))
    assert event is not None and event.revision == agent.revision == 1
    agent, event = await store.change_agent("a", set_state(AgentState.IDLE))
    assert event is not None and event.revision == 2
    stored = await store.get_agent("a")
    assert stored == agent and stored.state is AgentState.IDLE and stored.metadata == {"k": "v"}
    events, compacted = await store.agent_events_after(0, 10)
    assert [(e.revision, e.type) for e in events] == [
        (1, AgentEventType.REGISTERED),
        (2, AgentEventType.STATE_CHANGED),
    ]
    assert compacted == 0 and events[1].agent == agent
    assert await store.current_revision() == 2


async def test_silent_write_keeps_revision(store: Store) -> None:
    """A change without an event (a heartbeat) is stored but bumps nothing."""
    await store.change_agent("a", create(new_agent("a")))
    later = NOW + timedelta(seconds=5)
    agent, event = await store.change_agent(
        "a",
        lambda cur: AgentChange(cur.evolve(last_heartbeat_at=later), None, later),  # type: ignore[union-attr]
    )
    assert event is None and agent.revision == 1
    assert (await store.get_agent("a")).last_heartbeat_at == later  # type: ignore[union-attr]
    assert await store.current_revision() == 1


async def test_refused_change_rolls_back_alone_in_a_batch(store: Store) -> None:
    """Concurrent writes share transactions; one refusal does not undo the others."""
    await asyncio.gather(
        *(store.change_agent(f"a{i}", create(new_agent(f"a{i}"))) for i in range(50))
    )
    results = await asyncio.gather(
        *(store.change_agent(f"a{i}", set_state(AgentState.BUSY)) for i in range(50)),
        store.change_agent("missing", set_state(AgentState.BUSY)),
        return_exceptions=True,
    )
    assert isinstance(results[-1], AgentNotFoundError)
    assert all(isinstance(r, tuple) for r in results[:-1])
    agents, revision = await store.list_agents(AgentFilter(), "", 100)
    assert revision == 100
    assert len(agents) == 50 and all(a.state is AgentState.BUSY for a in agents)
    events, _ = await store.agent_events_after(0, 1000)
    assert [e.revision for e in events] == list(range(1, 101))  # no gap from the refusal


async def test_failing_listener_neither_stops_writes_nor_other_listeners(store: Store) -> None:
    heard: list[int] = []

    def broken(_events: list[object]) -> None:
        raise RuntimeError("listener bug")

    store.add_commit_listener(broken)
    store.add_commit_listener(lambda events: heard.extend(e.revision for e in events))
    await store.change_agent("a", create(new_agent("a")))
    agent, _ = await store.change_agent("a", set_state(AgentState.IDLE))
    assert agent.revision == 2 and heard == [1, 2]


async def test_delete_keeps_last_snapshot_in_event(store: Store) -> None:
    await store.change_agent("a", create(new_agent("a")))
    agent, event = await store.change_agent(
        "a", lambda _cur: AgentChange(None, AgentEventType.DEREGISTERED, NOW)
    )
    assert event is not None and event.agent == agent and agent.agent_id == "a"
    assert await store.get_agent("a") is None


async def test_list_filters_and_cursor(store: Store) -> None:
    for i, caps in enumerate([("x",), ("y",), ("x", "y")]):
        await store.change_agent(f"a{i}", create(new_agent(f"a{i}", caps)))
    await store.change_agent("a1", set_state(AgentState.IDLE))

    def ids(listed: tuple[list[Agent], int] | list[Agent]) -> list[str]:
        agents = listed[0] if isinstance(listed, tuple) else listed
        return [a.agent_id for a in agents]

    assert ids(await store.list_agents(AgentFilter(capability="x"), "", 10)) == ["a0", "a2"]
    assert ids(
        await store.list_agents(AgentFilter(states=frozenset({AgentState.IDLE})), "", 10)
    ) == ["a1"]
    assert ids(await store.list_agents(AgentFilter(), "a0", 1)) == ["a1"]
    snapshot, revision = await store.snapshot_agents(AgentFilter(agent_ids=frozenset({"a2"})))
    assert ids(snapshot) == ["a2"] and revision == 4


async def test_compaction_keeps_newest_events(store: Store) -> None:
    await store.change_agent("a", create(new_agent("a")))
    for i in range(20):
        await store.change_agent("a", set_state(AgentState.IDLE if i % 2 else AgentState.BUSY))
    assert await store.compact_agent_events(keep=5) == 16
    events, compacted = await store.agent_events_after(0, 100)
    assert compacted == 16 and [e.revision for e in events] == [17, 18, 19, 20, 21]


async def test_reopen_keeps_everything(make_store: Callable[[], Store]) -> None:
    """Closing and reopening (a restart) keeps rows, events and the revision counter."""
    first = make_store()
    await first.open()
    await first.change_agent("a", create(new_agent("a")))
    await first.change_agent("a", set_state(AgentState.IDLE))
    await first.compact_agent_events(keep=1)
    await first.close()
    second = make_store()
    await second.open()
    try:
        assert await second.current_revision() == 2
        _, event = await second.change_agent("a", set_state(AgentState.BUSY))
        assert event is not None and event.revision == 3
    finally:
        await second.close()


async def test_listeners_hear_commits_in_order(store: Store) -> None:
    heard: list[AgentEvent] = []
    store.add_commit_listener(heard.extend)
    await asyncio.gather(
        *(store.change_agent(f"a{i}", create(new_agent(f"a{i}"))) for i in range(20))
    )
    assert [e.revision for e in heard] == list(range(1, 21))


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database written by a newer Ops-Core is not silently used."""
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=999")
    store = SqliteStore(SqliteConfig(path))
    with pytest.raises(StorageError, match="newer"):
        await store.open()
