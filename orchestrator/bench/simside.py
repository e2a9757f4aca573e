"""The simulator side of the bench: fleets, arrival times, and what the account ended up with.

Everything measured about API traffic is measured where the API is: the simulator counts the
throttles and windows, and `Arrivals` notes the wall-clock instant each call reached it (before
its injected latency), which is what utilization and first-call latency are about.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.simulator.config import DEFAULT_REGION, Faults, SimConfig, SimInstance
from orchestrator.simulator.fleet import generate_fleet
from orchestrator.simulator.ratelimit import RateWindows
from orchestrator.simulator.runner import Simulator, run_simulator

# A simulator-only key pair: the simulator accepts exactly this, nothing real ever does.
SECRET_ID = "AKIDbenchfleet00000000000000000000"  # noqa: S105
SECRET_KEY = "bench-fleet-secret-key"  # noqa: S105
REGION = DEFAULT_REGION
TAGS: Mapping[str, str] = {"backup": "daily"}
# Room for every image a scenario makes: the quota is not what a bench measures.
AMPLE_QUOTA = 10_000_000


class Arrivals(RateWindows):
    """The simulator's rate windows, also noting when each call arrived (wall clock)."""

    __slots__ = ("times",)

    def __init__(self, limits: Mapping[str, int | None]) -> None:
        super().__init__(limits, time.monotonic)
        self.times: dict[str, list[float]] = {}

    def admit(self, account: str, action: str) -> None:
        """Note the arrival, then count it as the simulator does."""
        self.times.setdefault(action, []).append(time.time())
        super().admit(account, action)

    def of(self, action: str) -> list[float]:
        """Arrival instants of one action, in order."""
        return self.times.get(action, [])


@dataclass(frozen=True, slots=True)
class Fleet:
    """The simulated account of one scenario."""

    instances: tuple[SimInstance, ...]
    limits: Mapping[str, int | None]
    create_delay: tuple[float, float]
    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    delete_delay: float = 0.0  # how long a deleted image stays listed as DELETING
    sync_delay: tuple[float, float] = (0.1, 0.4)  # how long a copy stays SYNCING

    @property
    def ids(self) -> list[str]:
        """The instance ids, in fleet order."""
        return [i.instance_id for i in self.instances]

    def config(self) -> SimConfig:
        """The simulator configuration for this fleet."""
        return SimConfig(
            credentials={SECRET_ID: SECRET_KEY},
            limits=dict(self.limits),
            create_delay=self.create_delay,
            faults=self.faults,
            instances=self.instances,
            default_quota=AMPLE_QUOTA,
            seed=self.seed,
            delete_delay=self.delete_delay,
            sync_delay=self.sync_delay,
        )


def make_fleet(
    count: int, seed: int, *, busy_share: float = 0.0, busy_seconds: float = 0.0
) -> tuple[SimInstance, ...]:
    """`count` tagged instances; a share of them busy for `busy_seconds` after the start."""
    behaviours = {"busy": busy_share} if busy_share else None
    fleet = generate_fleet(count, seed=seed, tags=dict(TAGS), behaviours=behaviours)
    return tuple(
        replace(i, busy_seconds=busy_seconds) if i.behaviour == "busy" else i for i in fleet
    )


@asynccontextmanager
async def serve(fleet: Fleet) -> AsyncIterator[tuple[Simulator, Arrivals]]:
    """A running simulator for `fleet` and the arrival log of its calls."""
    async with run_simulator(fleet.config()) as sim:
        arrivals = Arrivals(fleet.limits)
        # Swapped in before any call: the store reads `windows` on every admission.
        sim.state.windows = arrivals
        yield sim, arrivals


def backed_up(sim: Simulator, ids: list[str]) -> int:
    """How many of `ids` have at least one live NORMAL image made through CreateImage."""
    wanted = set(ids)
    done = {
        i.instance_id
        for i in sim.state.iter_ours()
        if i.alive and i.state == "NORMAL" and i.instance_id in wanted
    }
    return len(done)


def api_summary(sim: Simulator, arrivals: Arrivals) -> dict[str, Any]:
    """What the API saw: calls and throttles per action, busiest windows, duplicate names."""
    state = sim.state
    return {
        "calls": {action: len(times) for action, times in sorted(arrivals.times.items())},
        "throttled": state.count_calls(code="RequestLimitExceeded"),
        "violations": state.violations,
        "max_window": state.windows.max_windows(),
        "duplicates": len(state.duplicates),
    }
