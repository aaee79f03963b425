"""The Store contract: what every caller of a `Store` relies on, checked through the
`store` fixture only (no SQL, no backend internals), against every backend (today:
SQLite, both commit paths).

A new backend joins every test here by adding one entry to BACKENDS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from opscore.domain.agents.model import Agent, AgentChange, AgentEvent, AgentFilter, AgentGrant
from opscore.domain.dispatch.matching import Claim, Offer
from opscore.domain.workflows.definitions import RetryPolicy, TaskDefinition, WorkflowDefinition
from opscore.domain.workflows.session import Session, SessionEvent, SessionFilter, TaskKey
from opscore.protocol.enums import (
    AgentEventType,
    AgentState,
    SessionEventType,
    SessionStatus,
    TaskStatus,
)
from opscore.protocol.errors import (
    AgentNotFoundError,
    InvalidStateError,
    SessionNotFoundError,
    StorageError,
    WorkflowDefinitionError,
)
from opscore.store.base import AgentDecision, Store
from opscore.store.sqlite.engine import SqliteConfig
from opscore.store.sqlite.store import SqliteStore

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
E = SessionEventType
R = TypeVar("R")

BACKENDS: dict[str, Callable[[Path], Store]] = {
    "sqlite": lambda tmp: SqliteStore(SqliteConfig(tmp / "store.db", max_batch=64)),
    # FULL commits run on the writer thread instead of the event loop.
    "sqlite-full": lambda tmp: SqliteStore(
        SqliteConfig(tmp / "store.db", synchronous="FULL", max_batch=64)
    ),
}


@pytest.fixture(params=sorted(BACKENDS))
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """A new, unopened store on the test's database (the same one every call)."""
    factory = BACKENDS[request.param]
    return lambda: factory(tmp_path)


@asynccontextmanager
async def opened(make_store: Callable[[], Store]) -> AsyncIterator[Store]:
    store = make_store()
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def store(make_store: Callable[[], Store]) -> AsyncIterator[Store]:
    async with opened(make_store) as s:
        yield s


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def listen(store: Store) -> list[Any]:
    """Every event the store announces from now on, in the order it announces them."""
    heard: list[Any] = []
    store.add_commit_listener(heard.extend)
    return heard


# --------------------------------------------------------------------------- agents


def new_agent(agent_id: str, capabilities: tuple[str, ...] = ("x",), **fields: Any) -> Agent:
    agent = Agent(
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
    return agent.evolve(**fields)


def create(agent: Agent, token: str | None = None) -> AgentDecision:
    return lambda _current: AgentChange(agent, AgentEventType.REGISTERED, NOW, token)


def set_state(state: AgentState) -> AgentDecision:
    def decide(current: Agent | None) -> AgentChange:
        if current is None:
            raise AgentNotFoundError("?")
        return AgentChange(current.evolve(state=state), AgentEventType.STATE_CHANGED, NOW)

    return decide


def silently(token: str | None = None, **fields: Any) -> AgentDecision:
    """A change without an event: a heartbeat, a token rotation."""

    def decide(current: Agent | None) -> AgentChange:
        assert current is not None
        return AgentChange(current.evolve(**fields), None, NOW, token)

    return decide


def delete(current: Agent | None) -> AgentChange:
    return AgentChange(None, AgentEventType.DEREGISTERED, NOW)


async def register(store: Store, *agent_ids: str, capabilities: tuple[str, ...] = ("x",)) -> None:
    for agent_id in agent_ids:
        await store.change_agent(agent_id, create(new_agent(agent_id, capabilities)))


def ids(listed: Iterable[Agent]) -> list[str]:
    return [a.agent_id for a in listed]


def replay(events: list[AgentEvent], revision: int) -> list[Agent]:
    """The agents as the events up to `revision` left them, in id order."""
    agents: dict[str, Agent] = {}
    for event in events:
        if event.revision <= revision and event.agent is not None:
            if event.type is AgentEventType.DEREGISTERED:
                agents.pop(event.agent.agent_id, None)
            else:
                agents[event.agent.agent_id] = event.agent
    return [agents[agent_id] for agent_id in sorted(agents)]


async def test_empty_store(store: Store) -> None:
    assert await store.current_revision() == 0
    assert await store.get_agent("a") is None
    assert await store.list_agents(AgentFilter(), "", 10) == ([], 0)
    assert await store.snapshot_agents(AgentFilter()) == ([], 0)
    assert await store.agent_events_after(0, 10) == ([], 0)
    assert await store.agent_tokens() == {}
    assert await store.silent_agents(at(3600)) == []
    assert await store.compact_agent_events(keep=0) == 0
    assert await store.list_definitions(("", ""), 10) == []
    assert await store.list_sessions(SessionFilter(), 0, 10) == []
    assert await store.leased_tasks() == [] and await store.timed_out_tasks(at(3600)) == []
    assert await store.prune_sessions(at(3600)) == 0


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
    assert compacted == 0 and events[1].agent == agent and events[1].occurred_at == NOW
    assert await store.current_revision() == 2


async def test_agent_keeps_every_field(store: Store) -> None:
    """Nested JSON, capability order, microseconds and optional times come back as written."""
    agent = new_agent(
        "a",
        ("zeta", "alpha", "mid"),
        name="Agent \u00e9",
        contact_endpoint="dns:///agent:50051",
        metadata={"team": "ops", "": "empty key"},
        state_details={"load": 0.5, "queue": [1, 2, {"deep": None}], "ok": True},
        registered_at=at(0.123456),
        state_observed_at=at(1.5),
    )
    written, event = await store.change_agent("a", create(agent))
    assert written == agent.evolve(revision=1) and event is not None and event.agent == written
    assert await store.get_agent("a") == written
    assert (await store.agent_events_after(0, 1))[0] == [event]


async def test_silent_write_keeps_revision(store: Store) -> None:
    """A change without an event (a heartbeat) is stored but bumps nothing."""
    await store.change_agent("a", create(new_agent("a")))
    heard = listen(store)
    agent, event = await store.change_agent("a", silently(last_heartbeat_at=at(5)))
    assert event is None and agent.revision == 1 and heard == []
    assert await store.get_agent("a") == agent and agent.last_heartbeat_at == at(5)
    assert await store.current_revision() == 1
    assert len((await store.agent_events_after(0, 10))[0]) == 1


async def test_refused_change_changes_and_announces_nothing(store: Store) -> None:
    await store.change_agent("a", create(new_agent("a")))
    before = await store.get_agent("a")
    heard = listen(store)

    def broken(current: Agent | None) -> AgentChange:
        raise RuntimeError("decide bug")

    with pytest.raises(AgentNotFoundError):
        await store.change_agent("missing", set_state(AgentState.IDLE))
    with pytest.raises(RuntimeError, match="decide bug"):
        await store.change_agent("a", broken)
    assert heard == [] and await store.current_revision() == 1
    assert await store.get_agent("a") == before and await store.get_agent("missing") is None
    _, event = await store.change_agent("a", set_state(AgentState.IDLE))
    assert event is not None and event.revision == 2 and heard == [event]  # no gap


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


async def test_delete_keeps_last_snapshot_in_event(store: Store) -> None:
    await store.change_agent("a", create(new_agent("a")))
    agent, event = await store.change_agent("a", delete)
    assert event is not None and event.agent == agent and agent.agent_id == "a"
    assert event.revision == agent.revision == 2 and event.type is AgentEventType.DEREGISTERED
    assert await store.get_agent("a") is None
    assert await store.list_agents(AgentFilter(), "", 10) == ([], 2)


async def test_tokens_are_stored_with_the_change_and_deleted_with_the_agent(store: Store) -> None:
    old, new, other = "aa" * 32, "bb" * 32, "cc" * 32
    await store.change_agent("a", create(new_agent("a"), token=old))
    await store.change_agent("b", create(new_agent("b"), token=other))
    await store.change_agent("c", create(new_agent("c")))
    assert await store.agent_tokens() == {old: "a", other: "b"}
    await store.change_agent("a", silently(token=new))  # a rotation replaces the token
    assert await store.agent_tokens() == {new: "a", other: "b"}
    await store.change_agent("a", delete)
    assert await store.agent_tokens() == {other: "b"}


async def test_grant_is_stored_with_the_agent(store: Store) -> None:
    """An agent's grant comes back from every read, apart from the capabilities it is
    registered with now, and a change of the grant alone is silent."""
    grant = AgentGrant("a", "1", frozenset({"x", "y"}))
    written, event = await store.change_agent("a", create(new_agent("a", ("x",), grant=grant)))
    assert written.grant == grant and event is not None and event.agent == written
    assert await store.get_agent("a") == written
    assert (await store.list_agents(AgentFilter(), "", 10))[0] == [written]
    assert (await store.snapshot_agents(AgentFilter()))[0] == [written]
    assert (await store.agent_events_after(0, 10))[0] == [event]
    narrower = AgentGrant("a", "1", frozenset({"x"}))
    agent, silent = await store.change_agent("a", silently(grant=narrower))
    assert silent is None and await store.get_agent("a") == agent and agent.grant == narrower
    _, later = await store.change_agent("a", set_state(AgentState.IDLE))
    assert later is not None and later.agent is not None and later.agent.grant == narrower


async def test_list_agents_pages_by_id_with_filters(store: Store) -> None:
    for agent_id, caps in [("b", ("x",)), ("a10", ("y",)), ("a2", ("x", "y")), ("c", ("xy",))]:
        await store.change_agent(agent_id, create(new_agent(agent_id, caps)))
    await store.change_agent("a10", set_state(AgentState.IDLE))
    await store.change_agent("c", set_state(AgentState.IDLE))

    async def listed(flt: AgentFilter | None = None, after: str = "", limit: int = 10) -> Any:
        agents, revision = await store.list_agents(flt or AgentFilter(), after, limit)
        assert revision == 6  # the revision they are consistent with
        return ids(agents)

    assert await listed() == ["a10", "a2", "b", "c"]
    pages, after = [], ""
    while page := await listed(after=after, limit=3):
        pages.append(page)
        after = page[-1]
    assert pages == [["a10", "a2", "b"], ["c"]]
    assert await listed(AgentFilter(capability="x")) == ["a2", "b"]  # "xy" is not "x"
    assert await listed(AgentFilter(states=frozenset({AgentState.IDLE}))) == ["a10", "c"]
    assert await listed(AgentFilter(agent_ids=frozenset({"b", "c", "zz"}))) == ["b", "c"]
    idle_y = AgentFilter(states=frozenset({AgentState.IDLE}), capability="y")
    assert await listed(idle_y) == ["a10"]
    assert await listed(AgentFilter(capability="x"), after="a2", limit=1) == ["b"]
    assert await listed(AgentFilter(capability="x"), after="b") == []
    assert (await store.get_agent("a2")) == (await store.list_agents(AgentFilter(), "a10", 1))[0][0]


async def test_snapshot_agents_has_every_match(store: Store) -> None:
    await register(store, *(f"a{i:03}" for i in range(150)))
    await register(store, "other", capabilities=("y",))
    agents, revision = await store.snapshot_agents(AgentFilter(capability="x"))
    assert ids(agents) == [f"a{i:03}" for i in range(150)] and revision == 151
    assert agents == (await store.list_agents(AgentFilter(capability="x"), "", 1000))[0]
    assert ids((await store.snapshot_agents(AgentFilter(agent_ids=frozenset({"other"}))))[0]) == [
        "other"
    ]


async def read_while_writing(
    steps: Iterable[Callable[[], Awaitable[object]]], read: Callable[[], Awaitable[R]]
) -> list[R]:
    """Runs `read` over and over while the write `steps` run one after another; each
    step waits for two more reads, so reads both race with writes and see every step."""
    results: list[R] = []
    writing = True
    read_done = asyncio.Event()

    async def write() -> None:
        nonlocal writing
        for step in steps:
            await step()
            for _ in range(2):
                read_done.clear()
                await read_done.wait()
        writing = False

    async def reader() -> None:
        while writing:
            results.append(await read())
            read_done.set()

    await asyncio.gather(write(), reader())
    return results


async def test_listings_match_the_revision_they_report(store: Store) -> None:
    """Read while writes commit, a listing is exactly what the events up to its
    revision left (no more, no less), so a watch can resume from it."""
    names = [f"a{i:02}" for i in range(10)]
    await register(store, *names)

    def batch(decide: AgentDecision, agents: list[str]) -> Callable[[], Awaitable[object]]:
        """Concurrent writes: they commit together."""
        return lambda: asyncio.gather(*(store.change_agent(n, decide) for n in agents))

    states = [set_state(s) for s in (AgentState.IDLE, AgentState.BUSY) * 6]
    steps = [batch(decide, names[:5]) for decide in states] + [batch(delete, names[:3])]

    async def read() -> list[tuple[list[Agent], int]]:
        return [
            await store.list_agents(AgentFilter(), "", 100),
            await store.snapshot_agents(AgentFilter()),
        ]

    listings = [listing for pair in await read_while_writing(steps, read) for listing in pair]
    events, _ = await store.agent_events_after(0, 1000)
    assert {revision for _, revision in listings} >= {10 + 5 * i for i in range(1, 13)} | {73}
    for agents, revision in listings:
        assert agents == replay(events, revision)


async def test_silent_agents_are_those_heard_before_the_cutoff(store: Store) -> None:
    for agent_id, heard_at in [("a", 0), ("b", 10), ("c", 0), ("d", 5), ("e", 2)]:
        await store.change_agent(
            agent_id, create(new_agent(agent_id, last_heartbeat_at=at(heard_at)))
        )
    await store.change_agent("c", set_state(AgentState.OFFLINE))  # already known to be gone
    await store.change_agent("e", silently(last_heartbeat_at=at(20)))  # a heartbeat
    assert sorted(await store.silent_agents(at(5))) == ["a"]  # d heard exactly at the cutoff
    assert sorted(await store.silent_agents(at(11))) == ["a", "b", "d"]
    assert sorted(await store.silent_agents(at(21))) == ["a", "b", "d", "e"]


async def test_compaction_keeps_newest_events(store: Store) -> None:
    await store.change_agent("a", create(new_agent("a")))
    for i in range(20):
        await store.change_agent("a", set_state(AgentState.IDLE if i % 2 else AgentState.BUSY))
    assert await store.compact_agent_events(keep=5) == 16
    events, compacted = await store.agent_events_after(0, 100)
    assert compacted == 16 and [e.revision for e in events] == [17, 18, 19, 20, 21]
    events, compacted = await store.agent_events_after(17, 2)  # paged
    assert compacted == 16 and [e.revision for e in events] == [18, 19]
    assert await store.compact_agent_events(keep=5) == 16  # nothing more to drop
    assert await store.compact_agent_events(keep=100) == 16  # never goes back
    assert await store.current_revision() == 21
    _, event = await store.change_agent("a", set_state(AgentState.ERROR))
    assert event is not None and event.revision == 22
    assert await store.compact_agent_events(keep=0) == 22
    assert await store.agent_events_after(0, 100) == ([], 22)
    assert await store.current_revision() == 22
    assert (await store.get_agent("a")).state is AgentState.ERROR  # type: ignore[union-attr]


async def test_event_reads_are_consistent_with_compaction(store: Store) -> None:
    """Read while compaction runs, events start right after the compacted revision they
    come with: a reader never skips history without being told."""
    await register(store, "a")

    async def step(keep: int) -> None:
        for state in (AgentState.IDLE, AgentState.BUSY) * 3:
            await store.change_agent("a", set_state(state))
        await store.compact_agent_events(keep)

    steps = [lambda keep=4 + i % 3: step(keep) for i in range(15)]
    reads = await read_while_writing(steps, lambda: store.agent_events_after(0, 1000))
    assert len({compacted for _, compacted in reads}) >= 15
    for events, compacted in reads:
        expected = list(range(compacted + 1, compacted + 1 + len(events)))
        assert events and [e.revision for e in events] == expected


# --------------------------------------------------------------------------- listeners


async def test_listeners_hear_commits_in_order(store: Store) -> None:
    """Every committed event is announced once, in commit order, and the write
    returns only after its listeners heard it."""
    heard = listen(store)
    await asyncio.gather(
        *(store.change_agent(f"a{i}", create(new_agent(f"a{i}"))) for i in range(20))
    )
    assert [e.revision for e in heard] == list(range(1, 21))
    for state in (AgentState.IDLE, AgentState.BUSY):
        _, event = await store.change_agent("a3", set_state(state))
        assert heard[-1] == event
    session = await start(store, "s1")
    assert heard[-2:] == session.new_events
    assignment, _ = await store.change_session("s1", lambda s: s.dispatch("t", "a1", NOW))
    assert heard[-1].type is E.TASK_DISPATCHED and heard[-1].attempt == assignment.key.attempt
    assert [e for e in heard if isinstance(e, AgentEvent)] == (
        await store.agent_events_after(0, 100)
    )[0]
    assert [e for e in heard if isinstance(e, SessionEvent)] == (
        await store.list_session_events("s1", 0, 100)
    )


async def test_listeners_run_on_the_loop_after_commit(store: Store) -> None:
    """Listeners (the watch hub, the dispatcher) schedule work on the event loop; what
    they hear is already visible to reads."""
    loop = asyncio.get_running_loop()
    calls: list[bool] = []
    reads: list[tuple[int, asyncio.Task[Agent | None]]] = []

    def listener(events: list[Any]) -> None:
        try:
            calls.append(asyncio.get_running_loop() is loop)
        except RuntimeError:
            calls.append(False)
            return
        for e in events:
            reads.append((e.revision, loop.create_task(store.get_agent(e.agent.agent_id))))

    store.add_commit_listener(listener)
    await asyncio.gather(
        *(store.change_agent(f"a{i}", create(new_agent(f"a{i}"))) for i in range(10))
    )
    await store.change_agent("a0", set_state(AgentState.IDLE))
    assert calls and all(calls)
    for revision, read in reads:
        agent = await read
        assert agent is not None and agent.revision >= revision


async def test_failing_listener_neither_stops_writes_nor_other_listeners(store: Store) -> None:
    heard: list[int] = []

    def broken(_events: list[object]) -> None:
        raise RuntimeError("listener bug")

    store.add_commit_listener(broken)
    store.add_commit_listener(lambda events: heard.extend(e.revision for e in events))
    await store.change_agent("a", create(new_agent("a")))
    agent, _ = await store.change_agent("a", set_state(AgentState.IDLE))
    assert agent.revision == 2 and heard == [1, 2]


# --------------------------------------------------------------------------- definitions


def task(task_id: str = "t", capability: str = "x", **fields: Any) -> TaskDefinition:
    return TaskDefinition(task_id=task_id, name=task_id, agent_capability=capability, **fields)


def workflow(*tasks: TaskDefinition, id: str = "wf", version: str = "1") -> WorkflowDefinition:
    return WorkflowDefinition(
        id=id, name=f"{id} v{version}", description="", version=version, tasks=tasks or (task(),)
    )


def versions(definitions: Iterable[WorkflowDefinition]) -> list[tuple[str, str]]:
    return [(d.id, d.version) for d in definitions]


async def test_definition_is_stored_once_per_id_and_version(store: Store) -> None:
    first = WorkflowDefinition(
        id="wf",
        name="Build",
        description="two steps",
        version="9",
        tasks=(
            task("a", parameters={"n": 1, "deep": {"l": [1, "two"]}}, timeout=12.5),
            task(
                "b",
                "y",
                depends_on=("a",),
                retry_policy=RetryPolicy(4, 0.5, 3.0, 60.0),
                next_task_id="",
            ),
        ),
        created_at=at(0.25),
    )
    assert await store.create_definition(first) == first
    with pytest.raises(WorkflowDefinitionError):
        await store.create_definition(workflow(id="wf", version="9"))
    assert await store.get_definition("wf", "9") == first  # the duplicate changed nothing
    await store.create_definition(workflow(id="wf", version="10"))
    assert (await store.get_definition("wf", "")).version == "10"  # type: ignore[union-attr]
    assert await store.get_definition("wf", "9") == first
    assert await store.get_definition("wf", "11") is None
    assert await store.get_definition("nope", "") is None


async def test_newest_definition_is_the_latest_created(store: Store) -> None:
    for version in ("2", "10", "1"):
        await store.create_definition(workflow(version=version))
    assert (await store.get_definition("wf", "")).version == "1"  # type: ignore[union-attr]
    assert await store.delete_definition("wf", "1")
    assert (await store.get_definition("wf", "")).version == "10"  # type: ignore[union-attr]


async def test_list_definitions_by_id_and_version_after_a_cursor(store: Store) -> None:
    for id, version in [("b", "1"), ("a", "2"), ("c", "1"), ("a", "1"), ("b", "0")]:
        await store.create_definition(workflow(id=id, version=version))
    everything = [("a", "1"), ("a", "2"), ("b", "0"), ("b", "1"), ("c", "1")]
    assert versions(await store.list_definitions(("", ""), 100)) == everything
    assert versions(await store.list_definitions(("a", "2"), 2)) == everything[2:4]
    assert versions(await store.list_definitions(("a", "zzz"), 100)) == everything[2:]
    assert versions(await store.list_definitions(("c", "1"), 100)) == []
    stored = await store.list_definitions(("", ""), 1)
    assert stored == [await store.get_definition("a", "1")]


async def test_delete_definition_says_whether_it_existed(store: Store) -> None:
    await store.create_definition(workflow(version="1"))
    await store.create_definition(workflow(version="2"))
    assert await store.delete_definition("wf", "1") is True
    assert await store.delete_definition("wf", "1") is False
    assert await store.delete_definition("nope", "1") is False
    assert versions(await store.list_definitions(("", ""), 10)) == [("wf", "2")]
    await store.create_definition(workflow(version="1"))  # the pair is free again
    assert await store.get_definition("wf", "1") is not None


# --------------------------------------------------------------------------- sessions

# Fields of a Session that record what the current transaction changed (not stored).
TRANSIENT = {"new_events", "changed_tasks", "released", "became_ready"}


def persisted(session: Session | None) -> dict[str, Any]:
    """What a store keeps of a session (task order included)."""
    assert session is not None
    kept = {f.name: getattr(session, f.name) for f in dataclasses.fields(session)}
    return {k: v for k, v in kept.items() if k not in TRANSIENT} | {"order": list(session.tasks)}


async def start(
    store: Store,
    session_id: str,
    definition: WorkflowDefinition | None = None,
    when: datetime = NOW,
    agent_id: str = "",
    request_id: str = "",
) -> Session:
    """A new session; its first tasks are ready at `when`."""
    session = Session.start(
        session_id, definition or workflow(), {"in": session_id}, agent_id, request_id, when
    )
    stored, created = await store.create_session(session)
    assert created and stored is session
    return session


async def claim(store: Store, *offers: Offer, now: datetime = NOW) -> Claim:
    return await store.claim_tasks(list(offers), now, lambda s, t, a: s.dispatch(t, a, now))


def claimed(result: Claim) -> list[tuple[int, str, str]]:
    """(offer index, session id, task id) of each assignment."""
    return [(i, a.key.session_id, a.key.task_id) for i, a in result.assignments]


async def change(store: Store, session_id: str, fn: Callable[[Session], Any]) -> Session:
    return (await store.change_session(session_id, fn))[1]


async def end(store: Store, session_id: str, when: datetime) -> None:
    await change(store, session_id, lambda s: s.cancel("done", when))


async def history(store: Store, session_id: str) -> list[tuple[int, SessionEventType]]:
    return [(e.sequence, e.type) for e in await store.list_session_events(session_id, 0, 100)]


async def status(store: Store, session_id: str, task_id: str = "t") -> tuple[TaskStatus, str]:
    session = await store.get_session(session_id)
    assert session is not None
    return session.tasks[task_id].status, session.tasks[task_id].agent_id


async def test_create_session_stores_it_with_its_events(store: Store) -> None:
    heard = listen(store)
    session = await start(store, "s1", workflow(task("a"), task("b", depends_on=("a",))))
    stored = await store.get_session("s1")
    assert persisted(stored) == persisted(session) and stored.new_events == []  # type: ignore[union-attr]
    assert stored.tasks["a"].ready_at == NOW and stored.tasks["b"].ready_at is None  # type: ignore[union-attr]
    assert await store.list_session_events("s1", 0, 10) == session.new_events == heard
    assert await history(store, "s1") == [(1, E.CREATED), (2, E.TASK_QUEUED)]


async def test_create_session_is_idempotent_per_request_id(store: Store) -> None:
    await start(store, "s1", request_id="req")
    await change(store, "s1", lambda s: s.dispatch("t", "a", NOW))
    heard = listen(store)
    retry = Session.start("s2", workflow(), {"in": "again"}, "", "req", at(1))
    stored, created = await store.create_session(retry)
    assert created is False and stored.session_id == "s1"
    assert persisted(stored) == persisted(await store.get_session("s1"))  # as it is now
    assert stored.status is SessionStatus.RUNNING
    assert await store.get_session("s2") is None and heard == []
    racing = [Session.start(f"r{i}", workflow(), {}, "", "race", NOW) for i in range(3)]
    answers = await asyncio.gather(*(store.create_session(r) for r in racing))
    assert [created for _, created in answers] == [True, False, False]
    assert {stored.session_id for stored, _ in answers} == {"r0"}
    await start(store, "s3")  # sessions without a request id are never the same request
    await start(store, "s4")
    listed = await store.list_sessions(SessionFilter(), 0, 10)
    assert [s.session_id for _, s in listed] == ["s4", "s3", "r0", "s1"]


async def test_change_session_writes_back_what_the_change_did(store: Store) -> None:
    await start(store, "s1", workflow(task("a"), task("b", depends_on=("a",))))
    assignment, session = await store.change_session("s1", lambda s: s.dispatch("a", "ag", at(1)))
    assert assignment.key == TaskKey("s1", "a", 1) and assignment.agent_id == "ag"
    assert persisted(await store.get_session("s1")) == persisted(session)
    key = assignment.key
    result, session = await store.change_session("s1", lambda s: s.heartbeat(key, at(2)))
    assert result == (False, at(2) + timedelta(seconds=task().timeout))
    session = await change(store, "s1", lambda s: s.complete(key, {"out": [1, 2]}, at(3)))
    stored = await store.get_session("s1")
    assert persisted(stored) == persisted(session)
    assert stored.tasks["a"].status is TaskStatus.COMPLETED and stored.tasks["a"].output == {
        "out": [1, 2]
    }  # type: ignore[union-attr]
    assert stored.tasks["b"].ready_at == at(3) and stored.status is SessionStatus.RUNNING  # type: ignore[union-attr]
    assert [t for _, t in await history(store, "s1")] == [
        E.CREATED,
        E.TASK_QUEUED,
        E.TASK_DISPATCHED,
        E.TASK_HEARTBEAT,
        E.TASK_COMPLETED,
        E.TASK_QUEUED,
    ]


async def test_concurrent_changes_to_one_session_apply_in_turn(store: Store) -> None:
    """Changes committed together each see the one before: no update is lost."""
    await start(store, "s1")
    assignment, _ = await store.change_session("s1", lambda s: s.dispatch("t", "a", NOW))
    key = assignment.key
    results = await asyncio.gather(
        *(store.change_session("s1", lambda s, i=i: s.heartbeat(key, at(i))) for i in range(1, 11))
    )
    assert [deadline for (_, deadline), _ in results] == [
        at(i) + timedelta(seconds=task().timeout) for i in range(1, 11)
    ]
    beats = [(seq, kind) for seq, kind in await history(store, "s1") if kind is E.TASK_HEARTBEAT]
    assert [seq for seq, _ in beats] == list(range(4, 14))
    stored = await store.get_session("s1")
    assert stored is not None and stored.tasks["t"].lease_expires_at == results[-1][0][1]


async def test_unknown_session(store: Store) -> None:
    assert await store.get_session("nope") is None
    with pytest.raises(SessionNotFoundError):
        await store.change_session("nope", lambda s: None)
    assert await store.list_session_events("nope", 0, 10) == []


async def test_failed_session_change_changes_and_announces_nothing(store: Store) -> None:
    await start(store, "s1")
    before = persisted(await store.get_session("s1"))
    heard = listen(store)

    def dispatch_then_refuse(session: Session) -> None:
        session.dispatch("t", "a", NOW)
        raise InvalidStateError("refused after changing the session")

    with pytest.raises(InvalidStateError):
        await store.change_session("s1", dispatch_then_refuse)
    assert persisted(await store.get_session("s1")) == before and heard == []
    assert await store.leased_tasks() == [] and len(await history(store, "s1")) == 2
    await change(store, "s1", lambda s: s.dispatch("t", "a", NOW))
    assert await history(store, "s1") == [
        (1, E.CREATED),
        (2, E.TASK_QUEUED),
        (3, E.TASK_DISPATCHED),
    ]


async def test_claim_matches_capability_pinned_agent_and_free_slots(store: Store) -> None:
    await start(store, "s1", when=at(0))
    await start(store, "s2", workflow(task(capability="y")), at(1))
    await start(store, "s3", when=at(2), agent_id="b")  # pinned to b
    await start(store, "s4", workflow(task(capability="z")), at(3))  # nobody offers z
    await start(store, "s5", when=at(4))  # every x slot is taken by then
    heard = listen(store)
    result = await claim(store, Offer("a", ("x",), 1), Offer("b", ("x", "y"), 2), now=at(10))
    assert claimed(result) == [(0, "s1", "t"), (1, "s2", "t"), (1, "s3", "t")]
    assert [a.agent_id for _, a in result.assignments] == ["a", "b", "b"]
    assert sorted(s.session_id for s in result.sessions) == ["s1", "s2", "s3"]
    assert sorted((e.session_id, e.type) for e in heard) == [
        (s, E.TASK_DISPATCHED) for s in ("s1", "s2", "s3")
    ]
    for session in result.sessions:
        assert persisted(await store.get_session(session.session_id)) == persisted(session)
    assert await status(store, "s3") == (TaskStatus.DISPATCHED, "b")
    assert await status(store, "s4") == await status(store, "s5") == (TaskStatus.PENDING, "")
    result = await claim(store, Offer("c", ("x", "z"), 5), now=at(10))
    assert claimed(result) == [(0, "s4", "t"), (0, "s5", "t")]  # left behind, not lost


async def test_claim_takes_the_oldest_ready_tasks_first(store: Store) -> None:
    await start(store, "late", when=at(2))
    await start(store, "early", when=at(0))
    await start(store, "mid", when=at(1))
    await start(store, "future", when=at(100))  # not ready yet
    offer = Offer("a", ("x",), 2)
    assert claimed(await claim(store, offer, now=at(5))) == [(0, "early", "t"), (0, "mid", "t")]
    assert claimed(await claim(store, offer, now=at(5))) == [(0, "late", "t")]
    assert claimed(await claim(store, offer, now=at(5))) == []
    # A retry is claimable once due, and only then.
    key = TaskKey("early", "t", 1)
    await change(store, "early", lambda s: s.fail(key, "flaky", True, at(6)))
    assert await status(store, "early") == (TaskStatus.RETRY_WAIT, "a")
    assert claimed(await claim(store, offer, now=at(6))) == []
    result = await claim(store, offer, now=at(8))
    assert [a.key for _, a in result.assignments] == [TaskKey("early", "t", 2)]


async def test_claim_dispatches_several_tasks_of_one_session(store: Store) -> None:
    await start(store, "s1", workflow(task("p"), task("q"), task("r", depends_on=("p", "q"))))
    result = await claim(store, Offer("a", ("x",), 3))
    assert claimed(result) == [(0, "s1", "p"), (0, "s1", "q")] and len(result.sessions) == 1
    assert persisted(await store.get_session("s1")) == persisted(result.sessions[0])
    assert [t for _, t in await history(store, "s1")][-2:] == [E.TASK_DISPATCHED] * 2


async def test_claim_looks_past_a_backlog_no_free_offer_may_take(store: Store) -> None:
    """Ready tasks pinned to a busy agent, or whose capable agents are full, do not hide
    the work behind them, however many there are."""
    for i in range(60):
        await start(store, f"b{i:02}", when=at(i), agent_id="b")
    for i in range(60):
        await start(store, f"y{i:02}", workflow(task(capability="y")), at(100 + i))
    await start(store, "free", when=at(200))
    result = await claim(store, Offer("b", ("x",), 1), Offer("a", ("x", "y"), 2), now=at(300))
    assert claimed(result) == [(0, "b00", "t"), (1, "y00", "t"), (1, "y01", "t")]
    result = await claim(store, Offer("b", ("x",), 0), Offer("a", ("x",), 1), now=at(300))
    assert claimed(result) == [(1, "free", "t")]


async def test_claim_reports_exhausted_capabilities(store: Store) -> None:
    """Exhausted: offered capabilities with nothing left to claim (a freed slot of an
    agent with only those needs no new pass)."""
    await start(store, "s1")
    result = await claim(store, Offer("a", ("x", "y"), 3))
    assert claimed(result) == [(0, "s1", "t")] and result.exhausted == {"x", "y"}
    await start(store, "s2")
    await start(store, "s3")
    result = await claim(store, Offer("a", ("x",), 1))  # full: s3 still waits
    assert claimed(result) == [(0, "s2", "t")] and "x" not in result.exhausted
    await start(store, "s4", agent_id="b")
    result = await claim(store, Offer("c", ("x",), 2), now=at(1))
    assert claimed(result) == [(0, "s3", "t")] and "x" not in result.exhausted  # s4 waits for b


async def test_claim_without_free_slots_changes_nothing(store: Store) -> None:
    await start(store, "s1")
    heard = listen(store)
    result = await claim(store, Offer("a", ("x",), 0))
    assert result.assignments == [] and result.sessions == [] and heard == []
    assert await status(store, "s1") == (TaskStatus.PENDING, "")


async def test_failed_claim_changes_and_announces_nothing(store: Store) -> None:
    """A claim is one transaction: a dispatch that fails undoes the ones before it."""
    await start(store, "s1")
    await start(store, "s2", when=at(1))
    heard = listen(store)
    dispatched: list[str] = []

    def dispatch(session: Session, task_id: str, agent_id: str) -> Any:
        dispatched.append(session.session_id)
        if len(dispatched) == 2:
            raise InvalidStateError("refused")
        return session.dispatch(task_id, agent_id, at(2))

    with pytest.raises(InvalidStateError):
        await store.claim_tasks([Offer("a", ("x",), 2)], at(2), dispatch)
    assert dispatched == ["s1", "s2"] and heard == [] and await store.leased_tasks() == []
    assert await status(store, "s1") == await status(store, "s2") == (TaskStatus.PENDING, "")
    assert claimed(await claim(store, Offer("a", ("x",), 2), now=at(2))) == [
        (0, "s1", "t"),
        (0, "s2", "t"),
    ]


async def test_leased_and_expired_tasks(store: Store) -> None:
    await start(store, "s1", workflow(task(timeout=10)))
    await start(store, "s2", workflow(task(timeout=20)))
    await start(store, "s3")  # never dispatched
    await change(store, "s1", lambda s: s.dispatch("t", "a", NOW))
    await change(store, "s2", lambda s: s.dispatch("t", "b", NOW))
    k1, k2 = TaskKey("s1", "t", 1), TaskKey("s2", "t", 1)
    assert sorted(await store.leased_tasks()) == [k1, k2]
    assert await store.leased_tasks("a") == [k1] and await store.leased_tasks("c") == []
    assert await store.timed_out_tasks(at(9.999)) == []
    assert await store.timed_out_tasks(at(10)) == [k1]  # due at its deadline
    assert sorted(await store.timed_out_tasks(at(30))) == [k1, k2]
    await change(store, "s1", lambda s: s.time_out("t", at(10)))  # retried later
    await change(store, "s2", lambda s: s.complete(k2, {}, at(11)))
    assert await store.leased_tasks() == [] and await store.timed_out_tasks(at(30)) == []
    # A ready task waits at most its schedule_to_start limit for an agent.
    await start(store, "s5", workflow(task(schedule_to_start=5)))
    assert await store.timed_out_tasks(at(4.9)) == []
    assert await store.timed_out_tasks(at(5)) == [TaskKey("s5", "t", 0)]
    await change(store, "s5", lambda s: s.dispatch("t", "b", NOW))
    assert await store.timed_out_tasks(at(5)) == []
    # A session created with its first task already dispatched (eager dispatch) holds it.
    eager = Session.start("s4", workflow(), {}, "", "", NOW)
    eager.dispatch("t", "a", NOW)
    await store.create_session(eager)
    assert await store.leased_tasks("a") == [TaskKey("s4", "t", 1)]


async def test_list_sessions_newest_first_with_filters_and_cursor(store: Store) -> None:
    a, b = workflow(id="wf-a"), workflow(id="wf-b")
    for i, (session_id, definition, agent_id) in enumerate(
        [("s1", a, ""), ("s2", b, "p"), ("s3", a, "p"), ("s4", a, ""), ("s5", b, "")]
    ):
        await start(store, session_id, definition, at(i), agent_id)
    await end(store, "s1", at(10))
    await end(store, "s3", at(10))
    await change(store, "s4", lambda s: s.dispatch("t", "x", at(10)))

    async def listed(before: int = 0, limit: int = 10, **flt: Any) -> list[tuple[int, str]]:
        found = await store.list_sessions(SessionFilter(**flt), before, limit)
        for _, session in found:
            assert persisted(session) == persisted(await store.get_session(session.session_id))
        return [(seq, session.session_id) for seq, session in found]

    everything = await listed()
    assert [s for _, s in everything] == ["s5", "s4", "s3", "s2", "s1"]
    assert [seq for seq, _ in everything] == sorted({seq for seq, _ in everything}, reverse=True)
    cancelled = frozenset({SessionStatus.CANCELLED})
    assert [s for _, s in await listed(statuses=cancelled)] == ["s3", "s1"]
    open_ = frozenset({SessionStatus.PENDING, SessionStatus.RUNNING})
    assert [s for _, s in await listed(statuses=open_)] == ["s5", "s4", "s2"]
    assert [s for _, s in await listed(workflow_definition_id="wf-a")] == ["s4", "s3", "s1"]
    assert [s for _, s in await listed(agent_id="p")] == ["s3", "s2"]
    both = await listed(statuses=cancelled, workflow_definition_id="wf-a", agent_id="p")
    assert [s for _, s in both] == ["s3"]
    # Paging by creation sequence: sessions created meanwhile never shift later pages.
    first = await listed(limit=2)
    await start(store, "s6")
    second = await listed(first[-1][0], 2)
    third = await listed(second[-1][0], 2)
    assert [first, second, third] == [everything[:2], everything[2:4], everything[4:]]
    assert await listed(third[-1][0], 2) == []
    assert [s for _, s in await listed(everything[1][0], 1, workflow_definition_id="wf-a")] == [
        "s3"
    ]


async def test_prune_deletes_only_sessions_that_ended_before_the_cutoff(store: Store) -> None:
    for session_id in ("done", "failed", "cancelled", "at-cutoff", "recent", "running", "new"):
        await start(store, session_id)
    key = TaskKey("done", "t", 1)
    await change(store, "done", lambda s: (s.dispatch("t", "a", at(1)), s.complete(key, {}, at(2))))
    key = TaskKey("failed", "t", 1)
    await change(
        store, "failed", lambda s: (s.dispatch("t", "a", at(1)), s.fail(key, "x", False, at(3)))
    )
    await end(store, "cancelled", at(4))
    await end(store, "at-cutoff", at(5))
    await end(store, "recent", at(9))
    await change(store, "running", lambda s: s.dispatch("t", "a", at(1)))
    kept = {sid: await history(store, sid) for sid in ("at-cutoff", "recent", "running", "new")}

    assert await store.prune_sessions(at(5)) == 3
    for session_id in ("done", "failed", "cancelled"):
        assert await store.get_session(session_id) is None
        assert await store.list_session_events(session_id, 0, 10) == []
    assert {sid: await history(store, sid) for sid in kept} == kept
    listed = await store.list_sessions(SessionFilter(), 0, 10)
    assert [s.session_id for _, s in listed] == ["new", "running", "recent", "at-cutoff"]
    assert await store.leased_tasks() == [TaskKey("running", "t", 1)]
    assert await store.prune_sessions(at(5)) == 0


async def test_list_session_events_pages_by_sequence(store: Store) -> None:
    heard = listen(store)
    await start(store, "s1")
    await start(store, "other")
    key = TaskKey("s1", "t", 1)
    await change(store, "s1", lambda s: s.dispatch("t", "a", at(1)))
    await change(store, "other", lambda s: s.cancel("stop", at(1)))
    await change(store, "s1", lambda s: s.heartbeat(key, at(2)))
    await change(store, "s1", lambda s: s.complete(key, {"ok": True}, at(3)))
    events = [e for e in heard if e.session_id == "s1"]
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5, 6]
    pages = [await store.list_session_events("s1", after, 2) for after in (0, 2, 4, 6)]
    assert pages == [events[0:2], events[2:4], events[4:6], []]  # every field kept
    assert await store.list_session_events("s1", 3, 100) == events[3:]
    assert [e.type for e in await store.list_session_events("other", 0, 100)] == [
        E.CREATED,
        E.TASK_QUEUED,
        E.TASK_CANCELLED,
        E.SESSION_CANCELLED,
    ]


# --------------------------------------------------------------------------- secrets, restarts


async def test_secret_is_created_once_per_name(store: Store) -> None:
    first = await asyncio.gather(*(store.secret("signing") for _ in range(5)))
    assert len(set(first)) == 1 and isinstance(first[0], bytes) and len(first[0]) >= 16
    assert await store.secret("signing") == first[0]
    assert await store.secret("other") not in (first[0], b"")


async def observe(store: Store) -> dict[str, Any]:
    """Everything the store answers about its contents."""
    sessions = await store.list_sessions(SessionFilter(), 0, 100)
    return {
        "revision": await store.current_revision(),
        "agents": await store.list_agents(AgentFilter(), "", 100),
        "snapshot": await store.snapshot_agents(AgentFilter()),
        "events": await store.agent_events_after(0, 100),
        "tokens": await store.agent_tokens(),
        "silent": sorted(await store.silent_agents(at(3600))),
        "definitions": await store.list_definitions(("", ""), 100),
        "newest": await store.get_definition("wf", ""),
        "sessions": [(seq, persisted(s)) for seq, s in sessions],
        "history": [await store.list_session_events(s.session_id, 0, 100) for _, s in sessions],
        "leased": sorted(await store.leased_tasks()),
        "expired": sorted(await store.timed_out_tasks(at(3600))),
        "secret": await store.secret("signing"),
    }


async def test_reopen_keeps_everything(make_store: Callable[[], Store]) -> None:
    """Closing and reopening (a restart) keeps every row, event, counter and secret."""
    async with opened(make_store) as first:
        await first.change_agent("a", create(new_agent("a"), token="aa" * 32))
        await register(first, "b", "c")
        await first.change_agent("a", set_state(AgentState.IDLE))
        await first.change_agent("c", delete)
        await first.compact_agent_events(keep=2)
        await first.change_agent("b", silently(last_heartbeat_at=at(7)))
        for version in ("2", "1"):
            await first.create_definition(workflow(version=version))
        await start(first, "s1", request_id="req")
        await start(first, "s2")
        await change(first, "s1", lambda s: s.dispatch("t", "a", NOW))
        await end(first, "s2", at(1))
        before = await observe(first)
    assert before["revision"] == 5 and before["events"][1] == 3 and before["leased"]

    async with opened(make_store) as second:
        assert await observe(second) == before
        _, event = await second.change_agent("b", set_state(AgentState.BUSY))
        assert event is not None and event.revision == 6  # the counter carries on
        session = await change(second, "s1", lambda s: s.complete(TaskKey("s1", "t", 1), {}, at(2)))
        assert [e.sequence for e in session.new_events] == [4, 5]
        with pytest.raises(WorkflowDefinitionError):
            await second.create_definition(workflow(version="1"))
        retry = Session.start("s3", workflow(), {}, "", "req", at(3))
        assert (await second.create_session(retry))[1] is False


async def test_reopen_after_compacting_everything_keeps_the_revision(
    make_store: Callable[[], Store],
) -> None:
    async with opened(make_store) as first:
        await register(first, "a", "b")
        await first.compact_agent_events(keep=0)
    async with opened(make_store) as second:
        assert await second.current_revision() == 2
        assert await second.agent_events_after(0, 10) == ([], 2)
        _, event = await second.change_agent("a", set_state(AgentState.IDLE))
        assert event is not None and event.revision == 3


async def test_close_finishes_queued_writes(make_store: Callable[[], Store]) -> None:
    store = make_store()
    await store.open()
    writes = [
        asyncio.ensure_future(store.change_agent(f"a{i}", create(new_agent(f"a{i}"))))
        for i in range(30)
    ]
    await asyncio.sleep(0)  # every write is queued
    await store.close()
    assert sorted(w.result()[0].revision for w in writes) == list(range(1, 31))
    async with opened(make_store) as reopened:
        assert len((await reopened.snapshot_agents(AgentFilter()))[0]) == 30


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A database written by a newer Ops-Core is not silently used (SQLite only)."""
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=999")
    store = SqliteStore(SqliteConfig(path))
    with pytest.raises(StorageError, match="newer"):
        await store.open()


async def test_write_during_close_ends(make_store: Callable[[], Store]) -> None:
    """A write that races with close either commits or fails; it never hangs."""
    store = make_store()
    await store.open()
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)  # close has begun
    write = asyncio.ensure_future(store.change_agent("a", create(new_agent("a"))))
    done, _ = await asyncio.wait([write], timeout=0.5)
    write.cancel()
    await closing
    assert done == {write}
