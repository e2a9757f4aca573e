"""Seeded fault injection: which call gets a delay, an error, a 5xx or a dropped connection."""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.simulator.config import Faults

# Actions whose faults may strike after the work (`Faults.after_create`): the calls that make
# something, so a client can see a failure for an image or a copy that exists.
MAKING_ACTIONS = frozenset({"CreateImage", "SyncImages"})


class Fault(enum.Enum):
    """What goes wrong with one call."""

    INTERNAL_ERROR = "InternalError"
    HTTP_5XX = "http-5xx"
    DROP = "drop"


@dataclass(frozen=True, slots=True)
class Decision:
    """The fate of one call: a delay, maybe a fault, and whether it strikes after the work."""

    latency: float = 0.0
    fault: Fault | None = None
    after: bool = False


NO_FAULT = Decision()


class FaultInjector:
    """Draws decisions from one seeded RNG, so a run with the same seed fails the same way."""

    __slots__ = ("_by_action", "_global", "_rng")

    def __init__(self, faults: Faults, by_action: Mapping[str, Faults], seed: int) -> None:
        self._global = faults
        self._by_action = dict(by_action)
        self._rng = random.Random(seed)

    def set(self, faults: Faults, action: str | None = None) -> None:
        """Replace the global faults, or those of one action."""
        if action is None:
            self._global = faults
        else:
            self._by_action[action] = faults

    def clear(self) -> None:
        """Stop injecting anything."""
        self._global = Faults()
        self._by_action.clear()

    def decide(self, action: str) -> Decision:
        """The fate of the next call of an action."""
        faults = self._by_action.get(action, self._global)
        if not faults.active:
            return NO_FAULT
        low, high = faults.latency
        latency = self._rng.uniform(low, high) if high > 0 else 0.0
        fault = self._pick(faults)
        after = (
            fault is not None
            and action in MAKING_ACTIONS
            and self._rng.random() < faults.after_create
        )
        return Decision(latency=latency, fault=fault, after=after)

    def _pick(self, faults: Faults) -> Fault | None:
        draw = self._rng.random()
        for fault, rate in (
            (Fault.DROP, faults.drop_rate),
            (Fault.HTTP_5XX, faults.http_5xx_rate),
            (Fault.INTERNAL_ERROR, faults.internal_error_rate),
        ):
            if draw < rate:
                return fault
            draw -= rate
        return None
