"""Agent registry: register, re-register, deregister, get, list (paging, filters), validation."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from opspawn.opscore.v1 import lifecycle_pb2 as pb

if TYPE_CHECKING:
    from conftest import Rpc, Stub

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def register_request(**overrides: Any) -> pb.RegisterAgentRequest:
    fields: dict[str, Any] = {
        "name": "summarizer",
        "version": "1.2.3",
        "capabilities": ["summarize", "translate"],
        "contact_endpoint": "http://10.0.0.7:8080",
        "metadata": {"team": "search", "region": "eu"},
    }
    fields.update(overrides)
    return pb.RegisterAgentRequest(**fields)


async def test_register_generates_id_and_starts_initializing(lifecycle: Stub) -> None:
    """An agent registered without an id gets a fresh one, starts INITIALIZING, and
    everything it registered is stored and readable back."""
    agent = await lifecycle.RegisterAgent(register_request())
    assert agent.agent_id
    assert agent.state == pb.AGENT_STATE_INITIALIZING
    assert agent.revision > 0
    assert agent.HasField("registered_at")
    assert agent.HasField("last_heartbeat_at")
    assert agent.name == "summarizer"
    assert agent.version == "1.2.3"
    assert list(agent.capabilities) == ["summarize", "translate"]
    assert agent.contact_endpoint == "http://10.0.0.7:8080"
    assert dict(agent.metadata) == {"team": "search", "region": "eu"}

    fetched = await lifecycle.GetAgent(pb.GetAgentRequest(agent_id=agent.agent_id))
    assert fetched == agent

    other = await lifecycle.RegisterAgent(register_request())
    assert other.agent_id != agent.agent_id
    assert other.revision > agent.revision


async def test_register_with_explicit_id(lifecycle: Stub) -> None:
    """A caller-chosen id (all allowed characters, 128 long at most) is kept as given."""
    agent_id = "Agent-1.worker_b:eu" + "x" * (128 - 19)
    agent = await lifecycle.RegisterAgent(register_request(agent_id=agent_id, name="n" * 256))
    assert agent.agent_id == agent_id
    assert agent.name == "n" * 256


async def test_reregister_identical_is_idempotent(lifecycle: Stub, rpc: Rpc) -> None:
    """Registering the same agent twice with identical fields returns the same agent and
    revision and announces nothing."""
    first = await lifecycle.RegisterAgent(register_request(agent_id="idem"))
    second = await lifecycle.RegisterAgent(register_request(agent_id="idem"))
    assert second == first

    marker = await lifecycle.RegisterAgent(register_request(agent_id="marker"))
    events = await rpc.replay(lifecycle, first.revision, marker.revision)
    assert [(e.type, e.agent.agent_id) for e in events] == [
        (pb.AGENT_EVENT_TYPE_REGISTERED, "marker")
    ]


async def test_reregister_with_changes_updates_and_announces(lifecycle: Stub, rpc: Rpc) -> None:
    """Re-registering with different fields updates the agent under a new revision and
    emits a REGISTERED event carrying the new fields."""
    first = await lifecycle.RegisterAgent(register_request(agent_id="evolving"))
    second = await lifecycle.RegisterAgent(
        register_request(
            agent_id="evolving", version="2.0.0", capabilities=["summarize"], metadata={"a": "b"}
        )
    )
    assert second.agent_id == "evolving"
    assert second.revision > first.revision
    assert second.version == "2.0.0"
    assert list(second.capabilities) == ["summarize"]
    assert dict(second.metadata) == {"a": "b"}
    assert second.registered_at == first.registered_at

    fetched = await lifecycle.GetAgent(pb.GetAgentRequest(agent_id="evolving"))
    assert fetched == second

    events = await rpc.replay(lifecycle, first.revision, second.revision)
    assert len(events) == 1
    assert events[0].type == pb.AGENT_EVENT_TYPE_REGISTERED
    assert events[0].revision == second.revision
    assert events[0].agent.version == "2.0.0"


LONG_ID = "a" * 129
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("empty name", {"name": ""}, "name"),
    ("long name", {"name": "n" * 257}, "name"),
    ("id starts with dash", {"agent_id": "-agent"}, "agent_id"),
    ("id starts with dot", {"agent_id": ".agent"}, "agent_id"),
    ("id with space", {"agent_id": "my agent"}, "agent_id"),
    ("id with slash", {"agent_id": "a/b"}, "agent_id"),
    ("id too long", {"agent_id": LONG_ID}, "agent_id"),
    ("empty capability", {"capabilities": ["a", ""]}, "capabilities[1]"),
    ("long capability", {"capabilities": ["c" * 129]}, "capabilities[0]"),
    ("duplicate capability", {"capabilities": ["a", "b", "a"]}, "capabilities[2]"),
    ("long metadata value", {"metadata": {"k": "v" * 1025}}, "metadata[k]"),
    ("long version", {"version": "v" * 65}, "version"),
    ("long contact endpoint", {"contact_endpoint": "h" * 513}, "contact_endpoint"),
]


@pytest.mark.parametrize(("overrides", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_register_validation_names_the_field(
    lifecycle: Stub, rpc: Rpc, overrides: dict[str, Any], field: str
) -> None:
    """Each invalid registration field is refused with INVALID_ARGUMENT and a BadRequest
    violation whose path names exactly that field."""
    failure = await rpc.fails(lifecycle.RegisterAgent(register_request(**overrides)), INVALID)
    assert failure.fields == [field], failure.violations
    assert failure.reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("overrides", "prefix"),
    [
        ({"capabilities": [f"cap{i}" for i in range(65)]}, "capabilities"),
        ({"metadata": {f"k{i}": "v" for i in range(65)}}, "metadata"),
        ({"metadata": {"": "v"}}, "metadata"),
        ({"metadata": {"k" * 129: "v"}}, "metadata[k"),
    ],
    ids=["65 capabilities", "65 metadata entries", "empty metadata key", "long metadata key"],
)
async def test_register_collection_limits(
    lifecycle: Stub, rpc: Rpc, overrides: dict[str, Any], prefix: str
) -> None:
    """Too many capabilities or metadata entries, or an empty or overlong metadata key, are
    refused with a violation on that collection (a long key may be shortened in the path)."""
    failure = await rpc.fails(lifecycle.RegisterAgent(register_request(**overrides)), INVALID)
    assert failure.fields, "no BadRequest violations"
    assert all(f.startswith(prefix) for f in failure.fields), failure.violations


async def test_register_at_limits_is_accepted(lifecycle: Stub) -> None:
    """Values exactly at each documented limit are accepted."""
    agent = await lifecycle.RegisterAgent(
        register_request(
            agent_id="a" * 128,
            name="n" * 256,
            version="v" * 64,
            contact_endpoint="h" * 512,
            capabilities=[f"{i:03d}" + "c" * 125 for i in range(64)],
            metadata={"k" * 128: "v" * 1024, **{f"m{i}": "v" for i in range(63)}},
        )
    )
    assert len(agent.capabilities) == 64
    assert len(agent.metadata) == 64
    assert agent.metadata["k" * 128] == "v" * 1024


async def test_register_metadata_at_every_limit_at_once(lifecycle: Stub) -> None:
    """64 entries, a 128-character key and a 1024-character value, 16 KiB in all, are
    within every metadata limit and are accepted."""
    metadata = {f"{i:02d}": "v" * 200 for i in range(63)}
    metadata["k" * 128] = "v" * 1024
    filler = 16 * 1024 - sum(len(k) + len(v) for k, v in metadata.items())
    metadata["00"] += "v" * filler
    metadata["00"] = metadata["00"][:1024]
    agent = await lifecycle.RegisterAgent(register_request(metadata=metadata))
    assert dict(agent.metadata) == metadata


async def test_register_metadata_over_total_size_is_refused(lifecycle: Stub, rpc: Rpc) -> None:
    """Entries each within limits but over 16 KiB together are refused as a whole."""
    metadata = {f"{i:02d}": "v" * 1024 for i in range(17)}
    failure = await rpc.fails(lifecycle.RegisterAgent(register_request(metadata=metadata)), INVALID)
    assert failure.fields == ["metadata"]


async def test_register_reports_every_bad_field_at_once(lifecycle: Stub, rpc: Rpc) -> None:
    """A request with several bad fields gets one error listing all of them."""
    request = register_request(name="", version="v" * 65, capabilities=["x", "x"])
    failure = await rpc.fails(lifecycle.RegisterAgent(request), INVALID)
    assert sorted(failure.fields) == ["capabilities[1]", "name", "version"]


async def test_invalid_registration_changes_nothing(lifecycle: Stub, rpc: Rpc) -> None:
    """A refused re-registration leaves the stored agent untouched."""
    agent = await lifecycle.RegisterAgent(register_request(agent_id="keep"))
    await rpc.fails(lifecycle.RegisterAgent(register_request(agent_id="keep", name="")), INVALID)
    assert await lifecycle.GetAgent(pb.GetAgentRequest(agent_id="keep")) == agent


async def test_deregister_returns_last_snapshot_and_forgets(lifecycle: Stub, rpc: Rpc) -> None:
    """Deregistering returns the agent's last state, announces DEREGISTERED, and the agent
    is gone afterwards (get, second deregister and heartbeat are NOT_FOUND)."""
    await lifecycle.RegisterAgent(register_request(agent_id="leaving"))
    current = await lifecycle.UpdateAgentState(
        pb.UpdateAgentStateRequest(
            agent_id="leaving", state=pb.AGENT_STATE_DRAINING, details=rpc.struct(jobs=0)
        )
    )
    last = await lifecycle.DeregisterAgent(pb.DeregisterAgentRequest(agent_id="leaving"))
    assert last.agent_id == "leaving"
    assert last.state == pb.AGENT_STATE_DRAINING
    assert last.state_details == current.state_details

    failure = await rpc.fails(lifecycle.GetAgent(pb.GetAgentRequest(agent_id="leaving")), NOT_FOUND)
    assert failure.reason == "AGENT_NOT_FOUND"
    await rpc.fails(
        lifecycle.DeregisterAgent(pb.DeregisterAgentRequest(agent_id="leaving")), NOT_FOUND
    )
    await rpc.fails(lifecycle.Heartbeat(pb.HeartbeatRequest(agent_id="leaving")), NOT_FOUND)

    marker = await lifecycle.RegisterAgent(register_request(agent_id="marker"))
    events = await rpc.replay(lifecycle, current.revision, marker.revision)
    assert [e.type for e in events] == [
        pb.AGENT_EVENT_TYPE_DEREGISTERED,
        pb.AGENT_EVENT_TYPE_REGISTERED,
    ]
    assert events[0].agent.agent_id == "leaving"
    assert events[0].agent.state == pb.AGENT_STATE_DRAINING

    listed = await lifecycle.ListAgents(pb.ListAgentsRequest())
    assert [a.agent_id for a in listed.agents] == ["marker"]


async def test_deregister_unknown_is_not_found(lifecycle: Stub, rpc: Rpc) -> None:
    """Deregistering an agent that never existed is NOT_FOUND (AGENT_NOT_FOUND)."""
    failure = await rpc.fails(
        lifecycle.DeregisterAgent(pb.DeregisterAgentRequest(agent_id="ghost")), NOT_FOUND
    )
    assert failure.reason == "AGENT_NOT_FOUND"


async def test_get_unknown_agent_is_not_found(lifecycle: Stub, rpc: Rpc) -> None:
    """GetAgent for an unknown id is NOT_FOUND with ErrorInfo AGENT_NOT_FOUND naming the id."""
    failure = await rpc.fails(lifecycle.GetAgent(pb.GetAgentRequest(agent_id="nobody")), NOT_FOUND)
    assert failure.reason == "AGENT_NOT_FOUND"
    assert failure.error_metadata.get("agent_id") == "nobody"


async def test_get_with_empty_id_is_invalid(lifecycle: Stub, rpc: Rpc) -> None:
    """GetAgent without an id is INVALID_ARGUMENT on field agent_id."""
    failure = await rpc.fails(lifecycle.GetAgent(pb.GetAgentRequest()), INVALID)
    assert failure.fields == ["agent_id"]


async def register_many(lifecycle: Stub, ids: list[str]) -> None:
    shuffled = list(ids)
    random.Random(7).shuffle(shuffled)
    for agent_id in shuffled:
        await lifecycle.RegisterAgent(register_request(agent_id=agent_id))


async def list_all(lifecycle: Stub, page_size: int, **filters: Any) -> tuple[list[str], list[int]]:
    """Pages through ListAgents; returns all ids and the size of every page."""
    ids: list[str] = []
    sizes: list[int] = []
    token = ""
    for _ in range(100):
        page = await lifecycle.ListAgents(
            pb.ListAgentsRequest(page_size=page_size, page_token=token, **filters)
        )
        ids.extend(a.agent_id for a in page.agents)
        sizes.append(len(page.agents))
        token = page.next_page_token
        if not token:
            return ids, sizes
    raise AssertionError("ListAgents never returned an empty next_page_token")


async def test_list_pages_in_agent_id_order(lifecycle: Stub) -> None:
    """Paging walks every agent exactly once, in agent_id order, and the last page has no
    next_page_token."""
    ids = [f"agent-{i:02d}" for i in range(7)]
    await register_many(lifecycle, ids)
    listed, sizes = await list_all(lifecycle, page_size=3)
    assert listed == ids
    assert sizes == [3, 3, 1]

    exact, exact_sizes = await list_all(lifecycle, page_size=7)
    assert exact == ids
    assert exact_sizes[0] == 7


async def test_list_default_and_clamped_page_size(lifecycle: Stub) -> None:
    """page_size 0 means 50 per page; a page_size above the maximum is clamped, not refused."""
    ids = [f"bulk-{i:03d}" for i in range(55)]
    await register_many(lifecycle, ids)

    first = await lifecycle.ListAgents(pb.ListAgentsRequest())
    assert [a.agent_id for a in first.agents] == ids[:50]
    assert first.next_page_token
    rest = await lifecycle.ListAgents(pb.ListAgentsRequest(page_token=first.next_page_token))
    assert [a.agent_id for a in rest.agents] == ids[50:]
    assert rest.next_page_token == ""

    big = await lifecycle.ListAgents(pb.ListAgentsRequest(page_size=5000))
    assert [a.agent_id for a in big.agents] == ids
    assert big.next_page_token == ""


async def test_list_empty_registry(lifecycle: Stub) -> None:
    """Listing with no agents returns an empty last page."""
    page = await lifecycle.ListAgents(pb.ListAgentsRequest())
    assert list(page.agents) == []
    assert page.next_page_token == ""


async def test_list_filters_by_state_and_capability(lifecycle: Stub) -> None:
    """`states` and `capability` filters select matching agents, also across pages."""
    plan = {
        "f-0": (pb.AGENT_STATE_IDLE, ["gpu"]),
        "f-1": (pb.AGENT_STATE_BUSY, ["gpu", "cpu"]),
        "f-2": (pb.AGENT_STATE_ERROR, ["gpu"]),
        "f-3": (pb.AGENT_STATE_IDLE, ["cpu"]),
        "f-4": (None, ["gpu"]),
        "f-5": (pb.AGENT_STATE_BUSY, ["gpu"]),
    }
    for agent_id, (state, caps) in plan.items():
        await lifecycle.RegisterAgent(register_request(agent_id=agent_id, capabilities=caps))
        if state is not None:
            await lifecycle.UpdateAgentState(
                pb.UpdateAgentStateRequest(agent_id=agent_id, state=state)
            )

    working = [pb.AGENT_STATE_IDLE, pb.AGENT_STATE_BUSY]
    assert (await list_all(lifecycle, 2, states=working))[0] == ["f-0", "f-1", "f-3", "f-5"]
    assert (await list_all(lifecycle, 2, capability="gpu"))[0] == [
        "f-0",
        "f-1",
        "f-2",
        "f-4",
        "f-5",
    ]
    both = await list_all(lifecycle, 1, states=working, capability="gpu")
    assert both[0] == ["f-0", "f-1", "f-5"]
    initializing = await list_all(lifecycle, 10, states=[pb.AGENT_STATE_INITIALIZING])
    assert initializing[0] == ["f-4"]
    assert (await list_all(lifecycle, 10, capability="tpu"))[0] == []

    page = await lifecycle.ListAgents(pb.ListAgentsRequest(capability="gpu"))
    assert all("gpu" in a.capabilities for a in page.agents)


async def test_list_rejects_negative_page_size(lifecycle: Stub, rpc: Rpc) -> None:
    """A negative page_size is INVALID_ARGUMENT on field page_size."""
    failure = await rpc.fails(lifecycle.ListAgents(pb.ListAgentsRequest(page_size=-1)), INVALID)
    assert failure.fields == ["page_size"]


@pytest.mark.parametrize("token", ["garbage", "%%%not-a-token%%%"])
async def test_list_rejects_garbage_page_token(lifecycle: Stub, rpc: Rpc, token: str) -> None:
    """A page_token the server did not hand out is INVALID_ARGUMENT on field page_token."""
    failure = await rpc.fails(lifecycle.ListAgents(pb.ListAgentsRequest(page_token=token)), INVALID)
    assert failure.fields == ["page_token"]


async def test_list_rejects_token_with_other_filters(lifecycle: Stub, rpc: Rpc) -> None:
    """A page_token reused with different filters is INVALID_ARGUMENT."""
    await register_many(lifecycle, [f"t-{i}" for i in range(4)])
    page = await lifecycle.ListAgents(pb.ListAgentsRequest(page_size=2))
    assert page.next_page_token
    await rpc.fails(
        lifecycle.ListAgents(
            pb.ListAgentsRequest(page_size=2, page_token=page.next_page_token, capability="x")
        ),
        INVALID,
    )
    await rpc.fails(
        lifecycle.ListAgents(
            pb.ListAgentsRequest(
                page_size=2, page_token=page.next_page_token, states=[pb.AGENT_STATE_IDLE]
            )
        ),
        INVALID,
    )
    same = await lifecycle.ListAgents(
        pb.ListAgentsRequest(page_size=2, page_token=page.next_page_token)
    )
    assert [a.agent_id for a in same.agents] == ["t-2", "t-3"]
