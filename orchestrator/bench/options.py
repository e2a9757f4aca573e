"""What one benchmark run measures and at which sizes: the defaults, and `--quick` for CI."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

SLOT_NEXT_MINUTE = "next-minute"
SLOT_NOW = "now"
DEFAULT_OUT = Path("bench/results/bench.json")


@dataclass(frozen=True, slots=True)
class Options:
    """Sizes and simulated conditions of every scenario (seconds unless named otherwise)."""

    instances: int = 300
    build_delay: float = 3.0  # how long an image stays CREATING in the fleet runs
    latency: tuple[float, float] = (0.03, 0.08)  # per call, uniform: realistic jitter
    ceiling_jobs: int = 3000
    memory_jobs: int = 100_000
    memory_seconds: float = 15.0  # how long the dispatcher runs once the jobs exist
    fault_rate: float = 0.2  # InternalError on every action
    busy_share: float = 0.1  # instances busy with another operation when the run starts
    busy_seconds: float = 10.0
    delete_delay: float = 3.0  # the quota scenario: a deleted image lingers, DELETING
    # The history scenario (only with --only history: it writes ~10 GB): instances backed up
    # daily for this many days.
    history_instances: int = 3000
    history_span: int = 365
    slot: str = SLOT_NEXT_MINUTE  # first-call latency from a real cron slot, or from start
    baseline: bool = True
    seed: int = 2026
    out: Path = DEFAULT_OUT
    # Daemon settings beyond the product defaults; only --quick sets any (shorter backoffs and
    # intervals, so a CI run is not dominated by waits the default figures already show).
    daemon_settings: dict[str, float] = field(default_factory=dict)
    daemon_retry: dict[str, float] = field(default_factory=dict)
    scenarios: tuple[str, ...] = (
        "baseline",
        "fleet",
        "faults",
        "quota",
        "copies",
        "ceiling",
        "memory",
    )
    quick: bool = False


def quick_options(base: Options) -> Options:
    """Small sizes and short delays: the whole bench in well under a minute."""
    return replace(
        base,
        instances=min(base.instances, 20),
        build_delay=0.5,
        ceiling_jobs=min(base.ceiling_jobs, 200),
        memory_jobs=min(base.memory_jobs, 2000),
        memory_seconds=min(base.memory_seconds, 2.0),
        history_instances=min(base.history_instances, 40),
        history_span=min(base.history_span, 50),
        busy_seconds=1.0,
        delete_delay=0.5,
        slot=SLOT_NOW,
        quick=True,
        daemon_settings={
            "poll_interval": 0.5,
            "tracker_min_interval": 0.2,
            "tracker_max_interval": 1.0,
        },
        daemon_retry={"transient_base": 0.1, "busy_base": 0.5, "max_delay": 2.0},
    )
