"""The matching rule of dispatch, as pure code that every store backend calls while
it walks ready tasks (oldest first) inside its claim transaction."""

from __future__ import annotations

from dataclasses import dataclass, field

from opscore.domain.workflows.session import Assignment, Session


@dataclass(frozen=True)
class Offer:
    """Free capacity of one connected agent, offered to the queue."""

    agent_id: str
    capabilities: tuple[str, ...]
    slots: int


@dataclass(frozen=True)
class Claim:
    """What one dispatch pass took from the queue."""

    assignments: list[tuple[int, Assignment]]  # (offer index, assignment)
    sessions: list[Session]
    # Offered capabilities with nothing left to claim now: until new work arrives, a
    # freed slot of an agent with only these capabilities needs no new pass.
    exhausted: frozenset[str]


@dataclass
class Matcher:
    """A ready task goes to the first offer with a free slot that has its capability
    and, for a session pinned to an agent, is that agent."""

    offers: list[Offer]
    free: list[int] = field(init=False)
    # Capabilities of ready tasks that no offer could take (pinned elsewhere, or
    # every capable offer full): they are not exhausted.
    left_behind: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.free = [o.slots for o in self.offers]

    def wanted(self) -> tuple[list[str], list[str]]:
        """The capabilities and agent ids of the offers with a free slot: only tasks
        they may take are worth reading (a backlog pinned to busy agents, or of
        capabilities whose agents are full, must not fill the window)."""
        open_offers = [o for o, free in zip(self.offers, self.free, strict=True) if free > 0]
        capabilities = sorted({c for o in open_offers for c in o.capabilities})
        return capabilities, sorted({o.agent_id for o in open_offers})

    def choose(self, capability: str, pinned_agent: str) -> int | None:
        """The offer that takes a ready task (its slot is booked), or None."""
        for i, offer in enumerate(self.offers):
            if (
                self.free[i] > 0
                and capability in offer.capabilities
                and pinned_agent in ("", offer.agent_id)
            ):
                self.free[i] -= 1
                return i
        self.left_behind.add(capability)
        return None

    def maybe_exhausted(self, seen_capabilities: list[str]) -> set[str]:
        """After every task the open offers may take was seen: capabilities that may
        have nothing ready left (the backend still checks no ready task needs them)."""
        if not any(self.free):
            return set()
        return set(seen_capabilities) - self.left_behind
