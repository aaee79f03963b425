"""Workflow definitions: create, get (newest version), list (paging), delete, the example
files, and every validation rule (stored and inline, several problems at once)."""

from __future__ import annotations

from datetime import UTC
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from opspawn.opscore.v1 import workflow_pb2 as W
from workflow_support import EXAMPLES, definition, duration, task, to_dict

from opscore.protocol.definition_files import load_definition

if TYPE_CHECKING:
    from conftest import Rpc
    from workflow_support import Harness

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


async def test_create_and_get_round_trip_with_defaults(ops: Harness, rpc: Rpc) -> None:
    """A created definition is returned with created_at and the defaults filled in
    (3 attempts, 1s initial, x2, 100 x initial max, 60s timeout) and reads back equal."""
    assert ops.clock is not None
    created = await ops.define(
        definition(
            "wf.basic",
            task("a", "cap_a", parameters={"k": "v", "n": 2}),
            task("b", "cap_b", depends_on=["a"], timeout=7.5),
            task("c", "cap_c", retry={"max_attempts": 5, "initial_interval": 2}),
            description="three tasks",
            version="1.0",
        )
    )
    assert created.created_at.ToDatetime(tzinfo=UTC) == ops.clock.now()
    a, b, c = created.tasks
    assert a.retry_policy.max_attempts == 3
    assert a.retry_policy.initial_interval.ToTimedelta().total_seconds() == 1
    assert a.retry_policy.backoff_coefficient == 2.0
    assert a.retry_policy.maximum_interval.ToTimedelta().total_seconds() == 100
    assert a.timeout.ToTimedelta().total_seconds() == 60
    assert to_dict(a.parameters) == {"k": "v", "n": 2.0}
    assert b.timeout.ToTimedelta().total_seconds() == 7.5
    assert list(b.depends_on) == ["a"]
    assert c.retry_policy.max_attempts == 5
    assert c.retry_policy.maximum_interval.ToTimedelta().total_seconds() == 200
    assert created.description == "three tasks"

    got = await ops.workflow.GetWorkflowDefinition(
        W.GetWorkflowDefinitionRequest(id="wf.basic", version="1.0")
    )
    assert got == created
    newest = await ops.workflow.GetWorkflowDefinition(W.GetWorkflowDefinitionRequest(id="wf.basic"))
    assert newest == created


async def test_taken_id_and_version_is_already_exists(ops: Harness, rpc: Rpc) -> None:
    """A second definition with the same id and version is refused ALREADY_EXISTS and
    the first one is left untouched; another version of the same id is fine."""
    first = await ops.define(definition("wf.dup", task("a")))
    failure = await rpc.fails(
        ops.define(definition("wf.dup", task("other", "x"))), grpc.StatusCode.ALREADY_EXISTS
    )
    assert failure.reason == "WORKFLOW_DEFINITION_EXISTS"
    got = await ops.workflow.GetWorkflowDefinition(
        W.GetWorkflowDefinitionRequest(id="wf.dup", version="1")
    )
    assert got == first
    await ops.define(definition("wf.dup", task("a"), version="2"))


async def test_get_without_version_returns_newest_created(ops: Harness, rpc: Rpc) -> None:
    """An empty version means the most recently created version (not the largest
    string); unknown ids and versions are NOT_FOUND, malformed ids INVALID_ARGUMENT."""
    await ops.define(definition("wf.v", task("a"), version="b"))
    await ops.define(definition("wf.v", task("a"), task("z"), version="a"))
    newest = await ops.workflow.GetWorkflowDefinition(W.GetWorkflowDefinitionRequest(id="wf.v"))
    assert newest.version == "a"
    assert [t.task_id for t in newest.tasks] == ["a", "z"]

    failure = await rpc.fails(
        ops.workflow.GetWorkflowDefinition(W.GetWorkflowDefinitionRequest(id="nope")), NOT_FOUND
    )
    assert failure.reason == "WORKFLOW_DEFINITION_NOT_FOUND"
    await rpc.fails(
        ops.workflow.GetWorkflowDefinition(W.GetWorkflowDefinitionRequest(id="wf.v", version="c")),
        NOT_FOUND,
    )
    for bad in ("", "-lead", "sp ace"):
        failure = await rpc.fails(
            ops.workflow.GetWorkflowDefinition(W.GetWorkflowDefinitionRequest(id=bad)), INVALID
        )
        assert failure.fields == ["id"]


async def test_list_pages_in_id_version_order(ops: Harness, rpc: Rpc) -> None:
    """Listing with a small page size walks every definition once, ordered by id then
    version, and the last page has no next token; bad paging input is INVALID_ARGUMENT."""
    keys = [("d", "1"), ("a", "2"), ("c", "1"), ("a", "1"), ("b", "9"), ("b", "10"), ("e", "1")]
    for def_id, version in keys:
        await ops.define(definition(def_id, task("t"), version=version))
    seen: list[tuple[str, str]] = []
    token = ""
    pages = 0
    while True:
        page = await ops.workflow.ListWorkflowDefinitions(
            W.ListWorkflowDefinitionsRequest(page_size=3, page_token=token)
        )
        pages += 1
        assert len(page.definitions) <= 3
        seen.extend((d.id, d.version) for d in page.definitions)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == sorted(keys)
    everything = await ops.workflow.ListWorkflowDefinitions(W.ListWorkflowDefinitionsRequest())
    assert [(d.id, d.version) for d in everything.definitions] == sorted(keys)
    assert not everything.next_page_token

    failure = await rpc.fails(
        ops.workflow.ListWorkflowDefinitions(W.ListWorkflowDefinitionsRequest(page_size=-1)),
        INVALID,
    )
    assert failure.fields == ["page_size"]
    failure = await rpc.fails(
        ops.workflow.ListWorkflowDefinitions(W.ListWorkflowDefinitionsRequest(page_token="junk!")),
        INVALID,
    )
    assert failure.fields == ["page_token"]


async def test_delete_one_version(ops: Harness, rpc: Rpc) -> None:
    """Delete needs id and version, removes only that version (the newest falls back to
    the remaining one), is NOT_FOUND the second time, and leaves started runs alone."""
    await ops.define(definition("wf.del", task("a"), version="1"))
    await ops.define(definition("wf.del", task("a"), task("b"), version="2"))
    agent = await ops.agent("worker", ["work"])
    session = await ops.start("wf.del")
    assert session.workflow_definition_version == "2"

    failure = await rpc.fails(
        ops.workflow.DeleteWorkflowDefinition(W.DeleteWorkflowDefinitionRequest(id="wf.del")),
        INVALID,
    )
    assert failure.fields == ["version"]
    await ops.workflow.DeleteWorkflowDefinition(
        W.DeleteWorkflowDefinitionRequest(id="wf.del", version="2")
    )
    await rpc.fails(
        ops.workflow.DeleteWorkflowDefinition(
            W.DeleteWorkflowDefinitionRequest(id="wf.del", version="2")
        ),
        NOT_FOUND,
    )
    await rpc.fails(
        ops.workflow.GetWorkflowDefinition(
            W.GetWorkflowDefinitionRequest(id="wf.del", version="2")
        ),
        NOT_FOUND,
    )
    newest = await ops.workflow.GetWorkflowDefinition(W.GetWorkflowDefinitionRequest(id="wf.del"))
    assert newest.version == "1"

    # The run of the deleted version still finishes with both of its tasks.
    for _ in range(2):
        await agent.complete(await agent.next())
    done = await ops.wait_status(session.session_id, 3)
    assert [t.task_id for t in done.tasks] == ["a", "b"]


async def test_example_files_load_unchanged(ops: Harness) -> None:
    """examples/sample_workflow.json (camelCase, nextTaskId null) and the fan-out YAML
    load as they are and are accepted by the server."""
    sample = await ops.define(load_definition(EXAMPLES / "sample_workflow.json"))
    assert sample.id == "sample_workflow_id"
    assert sample.version == "1.0"
    step_1, step_2 = sample.tasks
    assert (step_1.task_id, step_1.agent_capability, step_1.next_task_id) == (
        "step_1",
        "test_capability",
        "step_2",
    )
    assert to_dict(step_1.parameters) == {"message": "This is the first step."}
    assert (step_2.agent_capability, step_2.next_task_id) == ("another_capability", "")
    assert to_dict(step_2.parameters) == {"value": 123.0}

    fan = await ops.define(load_definition(EXAMPLES / "fan_out_fan_in.yaml"))
    by_id = {t.task_id: t for t in fan.tasks}
    assert list(by_id) == ["fetch", "summarize", "translate", "publish"]
    assert by_id["fetch"].timeout.ToTimedelta().total_seconds() == 30
    assert list(by_id["publish"].depends_on) == ["summarize", "translate"]
    policy = by_id["summarize"].retry_policy
    assert policy.max_attempts == 5
    assert policy.initial_interval.ToTimedelta().total_seconds() == 2
    assert policy.maximum_interval.ToTimedelta().total_seconds() == 60


# --------------------------------------------------------------------------- validation


def _raw_task(**fields: Any) -> W.TaskDefinition:
    fields.setdefault("agent_capability", "work")
    return W.TaskDefinition(**fields)


def _with_retry(**policy: Any) -> W.TaskDefinition:
    out = task("a")
    out.retry_policy.SetInParent()
    for key, value in policy.items():
        target = getattr(out.retry_policy, key)
        if isinstance(target, type(duration(0))):
            target.CopyFrom(value)
        else:
            setattr(out.retry_policy, key, value)
    return out


def _with_timeout(value: Any) -> W.TaskDefinition:
    out = task("a")
    out.timeout.CopyFrom(value)
    return out


# (case id, definition, expected field path, text the description must contain)
INVALID_DEFINITIONS: list[tuple[str, W.WorkflowDefinition, str, str]] = [
    ("no tasks", definition("wf"), "definition.tasks", "at least one"),
    ("missing id", definition("", task("a")), "definition.id", "required"),
    ("bad id", definition("-wf", task("a")), "definition.id", ""),
    ("long id", definition("w" * 129, task("a")), "definition.id", ""),
    ("long name", definition("wf", task("a"), name="n" * 257), "definition.name", "256"),
    (
        "long description",
        definition("wf", task("a"), description="d" * 4097),
        "definition.description",
        "4096",
    ),
    ("long version", definition("wf", task("a"), version="v" * 65), "definition.version", "64"),
    (
        "missing task id",
        definition("wf", _raw_task(task_id="")),
        "definition.tasks[0].task_id",
        "required",
    ),
    (
        "bad task id",
        definition("wf", task("a"), _raw_task(task_id="b c")),
        "definition.tasks[1].task_id",
        "",
    ),
    (
        "duplicate task id",
        definition("wf", task("a"), task("a", "other")),
        "definition.tasks[1].task_id",
        "duplicate",
    ),
    (
        "missing capability",
        definition("wf", task("a"), task("b"), task("c", "")),
        "definition.tasks[2].agent_capability",
        "required",
    ),
    (
        "blank capability",
        definition("wf", task("a", "   ")),
        "definition.tasks[0].agent_capability",
        "required",
    ),
    (
        "long capability",
        definition("wf", task("a", "c" * 129)),
        "definition.tasks[0].agent_capability",
        "128",
    ),
    (
        "long task name",
        definition("wf", task("a", name="n" * 257)),
        "definition.tasks[0].name",
        "256",
    ),
    (
        "unknown next task",
        definition("wf", task("a", next_task_id="b"), task("b", next_task_id="zzz")),
        "definition.tasks[1].next_task_id",
        "zzz",
    ),
    (
        "task follows itself",
        definition("wf", task("a", next_task_id="a")),
        "definition.tasks[0].next_task_id",
        "itself",
    ),
    (
        "unknown dependency",
        definition("wf", task("a", depends_on=["ghost"])),
        "definition.tasks[0].depends_on[0]",
        "ghost",
    ),
    (
        "depends on itself",
        definition("wf", task("a"), task("b", depends_on=["a", "b"])),
        "definition.tasks[1].depends_on[1]",
        "itself",
    ),
    (
        "duplicate dependency",
        definition("wf", task("a"), task("b", depends_on=["a", "a"])),
        "definition.tasks[1].depends_on[1]",
        "duplicate",
    ),
    (
        "zero timeout",
        definition("wf", _with_timeout(duration(0))),
        "definition.tasks[0].timeout",
        "",
    ),
    (
        "negative timeout",
        definition("wf", _with_timeout(duration(-5))),
        "definition.tasks[0].timeout",
        "",
    ),
    (
        "timeout over 7 days",
        definition("wf", _with_timeout(duration(7 * 24 * 3600 + 1))),
        "definition.tasks[0].timeout",
        "",
    ),
    (
        "negative max attempts",
        definition("wf", _with_retry(max_attempts=-1)),
        "definition.tasks[0].retry_policy.max_attempts",
        "",
    ),
    (
        "too many attempts",
        definition("wf", _with_retry(max_attempts=101)),
        "definition.tasks[0].retry_policy.max_attempts",
        "100",
    ),
    (
        "zero initial interval",
        definition("wf", _with_retry(initial_interval=duration(0))),
        "definition.tasks[0].retry_policy.initial_interval",
        "",
    ),
    (
        "backoff below 1",
        definition("wf", _with_retry(backoff_coefficient=0.5)),
        "definition.tasks[0].retry_policy.backoff_coefficient",
        "",
    ),
    (
        "backoff above 100",
        definition("wf", _with_retry(backoff_coefficient=101)),
        "definition.tasks[0].retry_policy.backoff_coefficient",
        "",
    ),
    (
        "maximum below initial",
        definition("wf", _with_retry(initial_interval=duration(10), maximum_interval=duration(5))),
        "definition.tasks[0].retry_policy.maximum_interval",
        "",
    ),
    (
        "too many tasks",
        definition("wf", *(task(f"t{i}") for i in range(1001))),
        "definition.tasks",
        "1000",
    ),
]


@pytest.mark.parametrize(
    ("defn", "field", "text"),
    [case[1:] for case in INVALID_DEFINITIONS],
    ids=[case[0] for case in INVALID_DEFINITIONS],
)
async def test_invalid_definition_is_refused_with_field_path(
    ops: Harness, rpc: Rpc, defn: W.WorkflowDefinition, field: str, text: str
) -> None:
    """Each invalid definition is refused INVALID_ARGUMENT naming the exact field at
    fault, both when stored and when given inline to StartWorkflow, and nothing is
    stored or started."""
    failure = await rpc.fails(ops.define(defn), INVALID)
    assert failure.reason == "INVALID_ARGUMENT"
    assert failure.fields == [field], failure.violations
    assert text.lower() in failure.violations[0][1].lower()

    inline = await rpc.fails(ops.start(defn), INVALID)
    assert inline.fields == [field]

    listed = await ops.workflow.ListWorkflowDefinitions(W.ListWorkflowDefinitionsRequest())
    assert list(listed.definitions) == []
    assert await ops.list_all() == []


CYCLES: list[tuple[str, W.WorkflowDefinition, set[int]]] = [
    (
        "two tasks by depends_on",
        definition("wf", task("a", depends_on=["b"]), task("b", depends_on=["a"])),
        {0, 1},
    ),
    (
        "three tasks by next_task_id",
        definition(
            "wf",
            task("a", next_task_id="b"),
            task("b", next_task_id="c"),
            task("c", next_task_id="a"),
        ),
        {0, 1, 2},
    ),
    (
        "mixed, behind an acyclic start",
        definition(
            "wf",
            task("start"),
            task("x", depends_on=["start", "z"]),
            task("y", depends_on=["x"]),
            task("z", depends_on=["y"]),
            task("end", depends_on=["z"]),
        ),
        {1, 2, 3},
    ),
]


@pytest.mark.parametrize(("defn", "members"), [c[1:] for c in CYCLES], ids=[c[0] for c in CYCLES])
async def test_cycle_is_refused(
    ops: Harness, rpc: Rpc, defn: W.WorkflowDefinition, members: set[int]
) -> None:
    """A dependency cycle (via depends_on, next_task_id or both) is refused with one
    violation on a task of the cycle whose description says "cycle" and names it."""
    for call in (ops.define(defn), ops.start(defn)):
        failure = await rpc.fails(call, INVALID)
        assert len(failure.violations) == 1
        field, description = failure.violations[0]
        assert field in {f"definition.tasks[{i}]" for i in members}
        assert "cycle" in description
        for i in members:
            assert defn.tasks[i].task_id in description


async def test_every_problem_is_reported_at_once(ops: Harness, rpc: Rpc) -> None:
    """A definition with many mistakes gets one INVALID_ARGUMENT listing all of them."""
    defn = definition(
        "",
        task("a", next_task_id="missing", timeout=0),
        task("a", "", depends_on=["nowhere"]),
        task("c", retry={"max_attempts": 500, "backoff_coefficient": 0.1}),
        version="v" * 65,
    )
    expected = {
        "definition.id",
        "definition.version",
        "definition.tasks[0].timeout",
        "definition.tasks[1].task_id",
        "definition.tasks[1].agent_capability",
        "definition.tasks[2].retry_policy.max_attempts",
        "definition.tasks[2].retry_policy.backoff_coefficient",
        "definition.tasks[0].next_task_id",
        "definition.tasks[1].depends_on[0]",
    }
    failure = await rpc.fails(ops.define(defn), INVALID)
    assert set(failure.fields) == expected
    assert len(failure.fields) == len(expected)
    inline = await rpc.fails(ops.start(defn), INVALID)
    assert set(inline.fields) == expected


async def test_missing_definition_field_is_invalid(ops: Harness, rpc: Rpc) -> None:
    """CreateWorkflowDefinition without a definition names the `definition` field."""
    failure = await rpc.fails(
        ops.workflow.CreateWorkflowDefinition(W.CreateWorkflowDefinitionRequest()), INVALID
    )
    assert failure.fields == ["definition"]
