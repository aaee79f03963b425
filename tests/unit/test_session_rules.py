"""Pure domain tests of the session aggregate (opscore.domain.workflows.session) and
workflow definitions (opscore.domain.workflows.definitions): no server, no store, no
clock but plain datetimes."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opscore.domain.workflows.definitions import (
    RetryPolicy,
    TaskDefinition,
    WorkflowDefinition,
    validate,
)
from opscore.domain.workflows.session import Session, TaskKey
from opscore.protocol.enums import (
    FINISHED,
    SessionEventType,
    SessionStatus,
    TaskStatus,
    WaitingReason,
)
from opscore.protocol.errors import (
    AttemptEndedError,
    InvalidArgumentError,
    InvalidStateError,
    TaskDispatchError,
)
from opscore.protocol.limits import RETRY_JITTER as JITTER

T0 = datetime(2026, 1, 1, tzinfo=UTC)
E = SessionEventType


class FixedRandom(random.Random):
    """A Random whose random() always returns `value`."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def t(task_id: str, cap: str = "work", **fields: Any) -> TaskDefinition:
    return TaskDefinition(task_id=task_id, name=task_id, agent_capability=cap, **fields)


def wf(*tasks: TaskDefinition, id: str = "wf") -> WorkflowDefinition:
    return WorkflowDefinition(id=id, name=id, description="", version="1", tasks=tasks)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def start(defn: WorkflowDefinition, **fields: Any) -> Session:
    return Session.start("s1", defn, fields.pop("input", {}), fields.pop("agent_id", ""), "", T0)


def types(run: Session) -> list[str]:
    return [e.type.name for e in run.new_events]


def violations(defn: WorkflowDefinition) -> list[tuple[str, str]]:
    with pytest.raises(InvalidArgumentError) as caught:
        validate(defn)
    return [(v.field, v.description) for v in caught.value.violations]


# --------------------------------------------------------------------------- retry policy


def test_delay_grows_geometrically_and_is_capped() -> None:
    """Without jitter the delay is initial x coefficient^(failures-1), capped at the
    maximum; the first failure waits the initial interval."""
    policy = RetryPolicy(
        max_attempts=10, initial_interval=1.5, backoff_coefficient=2.0, maximum_interval=10.0
    )
    no_jitter = FixedRandom(0.0)
    assert [policy.delay(n, no_jitter) for n in range(1, 6)] == [1.5, 3.0, 6.0, 10.0, 10.0]
    assert policy.delay(0, no_jitter) == 1.5
    flat = RetryPolicy(initial_interval=4.0, backoff_coefficient=1.0, maximum_interval=4.0)
    assert [flat.delay(n, no_jitter) for n in (1, 2, 7)] == [4.0, 4.0, 4.0]


def test_jitter_shortens_by_at_most_a_fifth() -> None:
    """Jitter multiplies the delay by (1 - 0.2 x random): the full delay at random() = 0,
    80% of it as random() approaches 1."""
    policy = RetryPolicy(initial_interval=10.0, maximum_interval=1000.0)
    assert JITTER == 0.2
    assert policy.delay(1, FixedRandom(0.0)) == 10.0
    assert policy.delay(1, FixedRandom(0.5)) == pytest.approx(9.0)
    assert policy.delay(2, FixedRandom(0.999999)) == pytest.approx(16.0, abs=1e-4)


@settings(max_examples=200, deadline=None)
@given(
    initial=st.floats(0.01, 100),
    coefficient=st.floats(1, 10),
    ceiling_factor=st.floats(1, 1000),
    failures=st.integers(1, 30),
    seed=st.integers(0, 2**32),
)
def test_delay_always_within_jitter_bounds(
    initial: float, coefficient: float, ceiling_factor: float, failures: int, seed: int
) -> None:
    """For any policy and failure count the delay lies in [0.8, 1] x the capped nominal
    delay, never above maximum_interval, and never below the previous nominal
    delay x 0.8."""
    policy = RetryPolicy(
        max_attempts=50,
        initial_interval=initial,
        backoff_coefficient=coefficient,
        maximum_interval=initial * ceiling_factor,
    )
    nominal = min(initial * coefficient ** (failures - 1), policy.maximum_interval)
    delay = policy.delay(failures, random.Random(seed))
    assert nominal * (1 - JITTER) - 1e-9 <= delay <= nominal + 1e-9
    assert delay <= policy.maximum_interval + 1e-9


# --------------------------------------------------------------------------- definitions


def test_dependencies_merge_next_task_id_and_depends_on() -> None:
    """A task's prerequisites are its depends_on plus every task naming it as
    next_task_id; final tasks are those nothing depends on."""
    defn = wf(t("a", next_task_id="c"), t("b"), t("c", depends_on=("b",)), t("d"))
    assert defn.dependencies() == {"a": set(), "b": set(), "c": {"a", "b"}, "d": set()}
    assert defn.final_tasks() == ["c", "d"]


def test_valid_definitions_pass() -> None:
    """A DAG with both dependency styles and custom policies validates."""
    validate(
        wf(
            t("a", next_task_id="b"),
            t("b", retry_policy=RetryPolicy(5, 0.5, 3.0, 30.0), timeout=0.5),
            t("c", depends_on=("a", "b")),
        )
    )


@pytest.mark.parametrize(
    ("defn", "field"),
    [
        (wf(), "definition.tasks"),
        (wf(t("a"), id=""), "definition.id"),
        (wf(t("a"), t("a")), "definition.tasks[1].task_id"),
        (wf(t("a"), t("b", "")), "definition.tasks[1].agent_capability"),
        (wf(t("a", next_task_id="x")), "definition.tasks[0].next_task_id"),
        (wf(t("a", next_task_id="a")), "definition.tasks[0].next_task_id"),
        (wf(t("a", depends_on=("x",))), "definition.tasks[0].depends_on[0]"),
        (wf(t("a"), t("b", depends_on=("a", "a"))), "definition.tasks[1].depends_on[1]"),
        (wf(t("a", timeout=0)), "definition.tasks[0].timeout"),
        (wf(t("a", retry_policy=RetryPolicy(0))), "definition.tasks[0].retry_policy.max_attempts"),
        (
            wf(t("a", retry_policy=RetryPolicy(3, 0.0, 2.0, 1.0))),
            "definition.tasks[0].retry_policy.initial_interval",
        ),
        (
            wf(t("a", retry_policy=RetryPolicy(3, 1.0, 0.9, 10.0))),
            "definition.tasks[0].retry_policy.backoff_coefficient",
        ),
        (
            wf(t("a", retry_policy=RetryPolicy(3, 5.0, 2.0, 1.0))),
            "definition.tasks[0].retry_policy.maximum_interval",
        ),
    ],
)
def test_validation_names_the_field(defn: WorkflowDefinition, field: str) -> None:
    """Each rule reports its own field path."""
    assert [f for f, _ in violations(defn)] == [field]


def test_cycle_reported_only_when_nothing_else_is_wrong() -> None:
    """A cycle is one violation on a member task mentioning "cycle"; it is looked for
    only once the graph's references are valid."""
    cyclic = wf(t("a", depends_on=("c",)), t("b", depends_on=("a",)), t("c", depends_on=("b",)))
    [(field, description)] = violations(cyclic)
    assert field in {"definition.tasks[0]", "definition.tasks[1]", "definition.tasks[2]"}
    assert "cycle" in description
    broken = wf(*cyclic.tasks, t("d", depends_on=("ghost",)))
    assert [f for f, _ in violations(broken)] == ["definition.tasks[3].depends_on[0]"]


def test_prefix_is_configurable() -> None:
    """validate(prefix=...) roots the field paths elsewhere (or nowhere)."""
    with pytest.raises(InvalidArgumentError) as caught:
        validate(wf(), prefix="")
    assert caught.value.violations[0].field == "tasks"


# --------------------------------------------------------------------------- the run


def test_start_queues_only_root_tasks() -> None:
    """A new run is PENDING; tasks without prerequisites are queued (ready now), the
    others wait; events are CREATED then one TASK_QUEUED per root."""
    run = start(wf(t("a"), t("b", depends_on=("a",)), t("c")))
    assert run.status is SessionStatus.PENDING
    assert run.tasks["a"].ready_at == T0
    assert run.tasks["b"].ready_at is None
    assert run.tasks["c"].ready_at == T0
    assert types(run) == ["CREATED", "TASK_QUEUED", "TASK_QUEUED"]
    assert [e.sequence for e in run.new_events] == [1, 2, 3]


def test_dispatch_builds_payload_and_lease() -> None:
    """Dispatch makes attempt 1 with a lease of the task timeout and a payload of
    parameters, session input and upstream outputs; the run becomes RUNNING."""
    defn = wf(t("a"), t("b", depends_on=("a",), parameters={"p": 1}, timeout=30))
    run = start(defn, input={"in": True})
    first = run.dispatch("a", "ag", at(1))
    assert first.key == TaskKey("s1", "a", 1)
    assert first.deadline == at(61)
    assert run.status is SessionStatus.RUNNING
    run.complete(first.key, {"out": "x"}, at(2))
    second = run.dispatch("b", "ag2", at(3))
    assert second.payload == {
        "parameters": {"p": 1},
        "input": {"in": True},
        "upstream": {"a": {"out": "x"}},
    }
    assert second.deadline == at(33)
    with pytest.raises(InvalidStateError):
        run.dispatch("b", "ag2", at(4))


def test_fan_in_waits_for_every_prerequisite() -> None:
    """A task with two prerequisites is queued only when both have completed; the
    session completes with the outputs of its final tasks."""
    run = start(wf(t("a"), t("b"), t("c", depends_on=("a", "b"))))
    ka = run.dispatch("a", "x", T0).key
    kb = run.dispatch("b", "x", T0).key
    run.complete(ka, {"a": 1}, at(1))
    assert run.tasks["c"].ready_at is None
    run.complete(kb, {"b": 1}, at(2))
    assert run.tasks["c"].ready_at == at(2)
    kc = run.dispatch("c", "x", at(3)).key
    run.complete(kc, {"c": 1}, at(4))
    assert run.status is SessionStatus.COMPLETED
    assert run.output == {"c": {"c": 1}}
    assert run.ended_at == at(4)
    assert types(run)[-1] == "SESSION_COMPLETED"


def test_repeated_answer_is_a_no_op_and_the_other_answer_is_refused() -> None:
    """Completing an attempt twice records one event; failing it afterwards is
    refused (kept in `refusal`, recorded as TASK_ANSWER_REFUSED); a heartbeat of the
    ended attempt is refused without a record; an unknown task raises at once."""
    run = start(wf(t("a"), t("b")))
    key = run.dispatch("a", "x", T0).key
    run.complete(key, {"v": 1}, at(1))
    count = len(run.new_events)
    run.complete(key, {"v": 2}, at(2))
    assert len(run.new_events) == count and run.refusal is None
    assert run.tasks["a"].output == {"v": 1}
    run.fail(key, "late", True, at(3))
    assert isinstance(run.refusal, AttemptEndedError)
    refused = run.new_events[-1]
    assert (refused.type, refused.attempt, refused.detail["answer"]) == (
        E.TASK_ANSWER_REFUSED,
        1,
        "failed",
    )
    run.refusal = None
    assert run.heartbeat(key, at(3)) == (False, None)
    assert isinstance(run.refusal, AttemptEndedError)
    assert len(run.new_events) == count + 1
    with pytest.raises(TaskDispatchError):
        run.complete(TaskKey("s1", "nope", 1), {}, at(3))


def test_superseded_attempt_is_refused_and_counted() -> None:
    """After attempt 1 timed out and attempt 2 was dispatched, attempt 1's answer is
    refused and recorded with attempt 1; attempt 2 is untouched."""
    run = start(wf(t("a", timeout=10)))
    first = run.dispatch("a", "x", T0).key
    run.time_out("a", at(10), FixedRandom(0))
    second = run.dispatch("a", "y", at(20)).key
    run.complete(first, {"late": True}, at(21))
    assert run.refusal is not None and "superseded by attempt 2" in str(run.refusal)
    assert run.new_events[-1].type is E.TASK_ANSWER_REFUSED
    assert run.new_events[-1].attempt == 1
    assert run.tasks["a"].status is TaskStatus.DISPATCHED
    run.refusal = None
    run.complete(second, {"v": 2}, at(22))
    assert run.refusal is None and run.status is SessionStatus.COMPLETED


def test_retryable_failure_waits_then_exhausts_attempts() -> None:
    """Retryable failures put the task in RETRY_WAIT ready after the policy delay, with
    TASK_RETRY_SCHEDULED(delay_seconds, next_attempt); the last allowed failure fails
    the session with "task X failed: <error>" and cancels the other open tasks."""
    policy = RetryPolicy(
        max_attempts=3, initial_interval=2.0, backoff_coefficient=3.0, maximum_interval=100.0
    )
    run = start(wf(t("a", retry_policy=policy), t("other")))
    rng = FixedRandom(0.0)
    now = T0
    for attempt, delay in ((1, 2.0), (2, 6.0)):
        key = run.dispatch("a", "x", now).key
        assert key.attempt == attempt
        run.fail(key, f"e{attempt}", True, now, rng)
        assert run.tasks["a"].status is TaskStatus.RETRY_WAIT
        assert run.tasks["a"].ready_at == now + timedelta(seconds=delay)
        scheduled = run.new_events[-1]
        assert scheduled.type is E.TASK_RETRY_SCHEDULED
        assert scheduled.detail == {"delay_seconds": delay, "next_attempt": attempt + 1}
        # The same failure reported twice changes nothing.
        run.fail(key, f"e{attempt}", True, now, rng)
        assert run.new_events[-1] is scheduled
        now += timedelta(seconds=delay)
    key = run.dispatch("a", "x", now).key
    run.fail(key, "e3", True, now, rng)
    assert run.status is SessionStatus.FAILED
    assert run.error == "task a failed: e3"
    assert run.tasks["a"].status is TaskStatus.FAILED
    assert run.tasks["other"].status is TaskStatus.CANCELLED
    assert types(run)[-3:] == ["TASK_FAILED", "TASK_CANCELLED", "SESSION_FAILED"]


def test_non_retryable_failure_fails_at_once() -> None:
    """retryable=False fails the session on the first attempt; the leased sibling is
    cancelled and its key released."""
    run = start(wf(t("a"), t("b")))
    ka = run.dispatch("a", "x", T0).key
    kb = run.dispatch("b", "x", T0).key
    run.released.clear()
    run.fail(ka, "fatal", False, at(1))
    assert run.status is SessionStatus.FAILED
    assert run.error == "task a failed: fatal"
    assert run.tasks["b"].status is TaskStatus.CANCELLED
    assert set(run.released) == {ka, kb}
    assert run.heartbeat(kb, at(2)) == (True, None)


def test_heartbeat_timeout_only_after_the_lease_and_heartbeat_extends_it() -> None:
    """time_out does nothing before the lease ends; a heartbeat moves the end to now +
    timeout and marks the task RUNNING; after that end the attempt times out
    (HEARTBEAT) and is retried; a late answer is refused."""
    run = start(wf(t("a", timeout=10)))
    key = run.dispatch("a", "x", T0).key
    run.time_out("a", at(9), FixedRandom(0))
    assert run.tasks["a"].status is TaskStatus.DISPATCHED
    assert run.heartbeat(key, at(8)) == (False, at(18))
    assert run.tasks["a"].status is TaskStatus.RUNNING
    run.time_out("a", at(12), FixedRandom(0))
    assert run.tasks["a"].status is TaskStatus.RUNNING
    run.time_out("a", at(18), FixedRandom(0))
    assert run.tasks["a"].status is TaskStatus.RETRY_WAIT
    assert types(run)[-3:] == ["TASK_HEARTBEAT", "TASK_TIMED_OUT", "TASK_RETRY_SCHEDULED"]
    assert run.new_events[-2].detail["timeout_type"] == "HEARTBEAT"
    assert run.tasks["a"].error == "heartbeat timeout of 10s reached"
    run.complete(key, {}, at(19))
    assert isinstance(run.refusal, AttemptEndedError)


def test_start_to_close_caps_the_lease_even_while_heartbeating() -> None:
    """With start_to_close 25s and a 10s lease, heartbeats extend the lease only up to
    the attempt deadline; then the attempt times out (START_TO_CLOSE)."""
    run = start(wf(t("a", timeout=10, start_to_close=25)))
    assignment = run.dispatch("a", "x", T0)
    assert (assignment.attempt_deadline, assignment.deadline) == (at(25), at(10))
    assert (assignment.start_to_close, assignment.max_attempts) == (25, 3)
    assert run.heartbeat(assignment.key, at(9)) == (False, at(19))
    assert run.heartbeat(assignment.key, at(18)) == (False, at(25))
    run.time_out("a", at(25), FixedRandom(0))
    timed_out = run.new_events[-2]
    assert timed_out.type is E.TASK_TIMED_OUT
    assert timed_out.detail["timeout_type"] == "START_TO_CLOSE"
    assert run.tasks["a"].status is TaskStatus.RETRY_WAIT


def test_an_answer_after_the_deadline_times_out_the_attempt_first() -> None:
    """An answer arriving after the lease ended, before the scheduler noticed, is
    refused; the same transaction records the timeout, so the history says why (the
    refusal itself is not recorded after the session's terminal event)."""
    run = start(wf(t("a", timeout=10, retry_policy=RetryPolicy(max_attempts=1))))
    key = run.dispatch("a", "x", T0).key
    run.complete(key, {"v": 1}, at(11))
    assert isinstance(run.refusal, AttemptEndedError)
    assert types(run)[-2:] == ["TASK_TIMED_OUT", "SESSION_FAILED"]  # the end stays last
    assert run.status is SessionStatus.FAILED


def test_schedule_to_start_limits_the_wait_for_an_agent() -> None:
    """A ready task nobody takes within schedule_to_start times out
    (SCHEDULE_TO_START) without an attempt, and is retried per its policy: the next
    wait starts when the backoff ends; out of retries the session fails."""
    policy = RetryPolicy(max_attempts=2, initial_interval=5)
    run = start(wf(t("a", schedule_to_start=30, retry_policy=policy)))
    assert run.tasks["a"].wait_deadline == at(30)
    run.time_out("a", at(29), FixedRandom(0))
    assert run.tasks["a"].status is TaskStatus.PENDING
    run.time_out("a", at(30), FixedRandom(0))
    assert types(run)[-2:] == ["TASK_TIMED_OUT", "TASK_RETRY_SCHEDULED"]
    assert run.new_events[-2].detail["timeout_type"] == "SCHEDULE_TO_START"
    task = run.tasks["a"]
    assert (task.status, task.attempt, task.ready_at) == (TaskStatus.RETRY_WAIT, 0, at(35))
    assert task.wait_deadline == at(65)
    run.time_out("a", at(65), FixedRandom(0))
    assert run.status is SessionStatus.FAILED
    assert run.error == "task a failed: schedule_to_start timeout of 30s reached"


def test_dispatch_clears_the_wait_limit() -> None:
    run = start(wf(t("a", schedule_to_start=30)))
    run.dispatch("a", "x", at(1))
    run.time_out("a", at(31), FixedRandom(0))
    assert run.tasks["a"].status is TaskStatus.DISPATCHED


def test_requeue_counts_a_lost_agent_and_undeliver_does_not() -> None:
    """requeue counts a failed attempt (and fails the session when none are left);
    undeliver takes back an attempt that never reached its agent under the same
    attempt number; a stale attempt is ignored by both."""
    run = start(wf(t("a", retry_policy=RetryPolicy(max_attempts=2))))
    key = run.dispatch("a", "x", T0).key
    run.undeliver("a", key.attempt, "agent disconnected before delivery", at(1))
    task = run.tasks["a"]
    assert (task.status, task.failures, task.attempt) == (TaskStatus.PENDING, 0, 0)
    assert task.ready_at == at(1)
    assert run.new_events[-1].detail == {"reason": "agent disconnected before delivery"}
    key = run.dispatch("a", "x", at(2)).key
    assert key.attempt == 1
    run.requeue("a", 0, "stale", at(3))  # not the current attempt: ignored
    assert run.tasks["a"].status is TaskStatus.DISPATCHED
    run.requeue("a", key.attempt, "agent disconnected", at(3))
    assert run.tasks["a"].failures == 1
    key = run.dispatch("a", "x", at(4)).key
    assert key.attempt == 2
    run.requeue("a", key.attempt, "agent disconnected", at(5))
    assert run.status is SessionStatus.FAILED
    assert run.error == "task a failed: agent disconnected; no attempts left"


def test_waiting_reasons() -> None:
    """A task says why it waits: its dependencies, its backoff, or (once ready) what
    the live agents say, which TASK_QUEUED events also carry."""
    run = start(wf(t("a", retry_policy=RetryPolicy(initial_interval=5)), t("b", depends_on=("a",))))
    assert run.tasks["a"].waiting_at(T0) is None
    assert run.tasks["b"].waiting_at(T0) == (
        WaitingReason.DEPENDENCIES,
        "waiting for the tasks it depends on",
    )
    run.note_waiting(lambda cap, pinned: (WaitingReason.NO_CAPABLE_AGENT, f"none has {cap}"))
    queued = [e for e in run.new_events if e.type is E.TASK_QUEUED]
    assert queued[0].detail == {
        "waiting_reason": "NO_CAPABLE_AGENT",
        "waiting_message": "none has work",
    }
    key = run.dispatch("a", "x", T0).key
    assert run.tasks["a"].waiting_at(T0) == (WaitingReason.UNSPECIFIED, "")
    run.fail(key, "boom", True, at(1), FixedRandom(0))
    reason, message = run.tasks["a"].waiting_at(at(2)) or (None, "")
    assert reason is WaitingReason.BACKOFF and at(6).isoformat() in message


def test_cancel() -> None:
    """Cancel ends every open task (leased ones released, their heartbeat then asks to
    stop), records SESSION_CANCELLED with the reason, and refuses a finished run."""
    run = start(wf(t("a"), t("b", depends_on=("a",))))
    key = run.dispatch("a", "x", T0).key
    run.released.clear()
    run.cancel("stop", at(1))
    assert run.status is SessionStatus.CANCELLED
    assert run.error == "stop"
    assert run.ended_at == at(1)
    assert {task.status for task in run.tasks.values()} == {TaskStatus.CANCELLED}
    assert run.released == [key]
    assert run.new_events[-1].detail == {"reason": "stop"}
    assert run.heartbeat(key, at(2)) == (True, None)
    run.complete(key, {}, at(2))
    assert isinstance(run.refusal, AttemptEndedError)
    with pytest.raises(InvalidStateError):
        run.cancel("again", at(3))


# --------------------------------------------------------------------------- invariants


@settings(max_examples=150, deadline=None)
@given(
    outcomes=st.lists(
        st.sampled_from(["complete", "fail", "fatal", "expire", "lost", "undelivered"]),
        min_size=1,
        max_size=25,
    ),
    attempts=st.integers(1, 4),
)
def test_any_history_is_gap_free_and_ends_once(outcomes: list[str], attempts: int) -> None:
    """Whatever happens to a three-step chain's attempts, sequences stay 1..n without
    gaps, attempts only grow, at most one terminal event is recorded and it is last, and
    a finished session has no open task, and no attempt number exceeds max_attempts."""
    policy = RetryPolicy(max_attempts=attempts, initial_interval=1.0)
    run = start(
        wf(
            t("a", retry_policy=policy, next_task_id="b"),
            t("b", retry_policy=policy),
            t("c", retry_policy=policy, depends_on=("b",)),
        )
    )
    now = T0
    rng = FixedRandom(0.5)
    last_attempt: dict[str, int] = {}
    for outcome in outcomes:
        if run.status in FINISHED:
            break
        now += timedelta(seconds=200)  # past every backoff and lease
        ready = [
            task_id
            for task_id, task in run.tasks.items()
            if task.ready_at is not None and task.ready_at <= now
        ]
        if not ready:
            break
        task_id = ready[0]
        key = run.dispatch(task_id, "ag", now).key
        assert last_attempt.get(task_id, 0) <= key.attempt <= attempts
        last_attempt[task_id] = key.attempt
        if outcome == "complete":
            run.complete(key, {"by": task_id}, now)
        elif outcome in ("fail", "fatal"):
            run.fail(key, "x", outcome == "fail", now, rng)
        elif outcome == "expire":
            run.time_out(task_id, now + timedelta(seconds=61), rng)
        elif outcome == "lost":
            run.requeue(task_id, key.attempt, outcome, now)
        else:
            run.undeliver(task_id, key.attempt, outcome, now)

    assert [e.sequence for e in run.new_events] == list(range(1, len(run.new_events) + 1))
    assert run.last_sequence == len(run.new_events)
    terminal = {E.SESSION_COMPLETED, E.SESSION_FAILED, E.SESSION_CANCELLED}
    ends = [i for i, e in enumerate(run.new_events) if e.type in terminal]
    assert len(ends) == (1 if run.status in FINISHED else 0)
    if ends:
        assert ends[0] == len(run.new_events) - 1
        open_states = {
            TaskStatus.PENDING,
            TaskStatus.DISPATCHED,
            TaskStatus.RUNNING,
            TaskStatus.RETRY_WAIT,
        }
        assert not {task.status for task in run.tasks.values()} & open_states
        assert run.ended_at is not None
    for task in run.tasks.values():
        assert task.failures <= attempts


def test_undelivering_an_attempt_past_its_lease_times_it_out() -> None:
    """An attempt taken back after its lease ran out counts: it timed out."""
    run = start(wf(t("a", timeout=10, retry_policy=RetryPolicy(max_attempts=2))))
    key = run.dispatch("a", "x", T0).key
    run.undeliver("a", key.attempt, "agent reconnected without it", at(10), FixedRandom(0))
    assert types(run)[-2:] == ["TASK_TIMED_OUT", "TASK_RETRY_SCHEDULED"]
    assert (run.tasks["a"].attempt, run.tasks["a"].failures) == (1, 1)
