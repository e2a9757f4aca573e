"""The fleet at the real limit: utilization, completion against N/L + build, first-call latency.

The daemon runs as users run it (`cvm-backup run`, product defaults). By default the policy's
slot is the next whole minute, so the first CreateImage is timed from the slot instant itself;
`--quick` uses a slot that is already due and times it from the daemon's start instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator.bench.harness import Env, Stage, daemon_config, daemon_for, drive, stage
from orchestrator.bench.measures import max_gap, ratio, seconds, span_rate
from orchestrator.bench.options import SLOT_NEXT_MINUTE, Options
from orchestrator.bench.records import DUE_WINDOW, add_policy, tally, timeline
from orchestrator.bench.simside import TAGS, Fleet, api_summary, backed_up, make_fleet
from orchestrator.config import DEFAULT_LIMITS
from orchestrator.simulator.config import Faults

# The daemon needs a moment to start and listen; a slot closer than this waits a minute more.
SLOT_LEAD = 6.0
POLICY = "bench-fleet"


@dataclass(frozen=True, slots=True)
class SlotPlan:
    """A cron schedule, its completion window, and the slot instant (None: already due)."""

    schedule: str
    window: timedelta
    slot: float | None


def plan_slot(mode: str, now: float) -> SlotPlan:
    """The next whole minute at least SLOT_LEAD away as a daily UTC cron, or a due daily slot."""
    if mode != SLOT_NEXT_MINUTE:
        return SlotPlan("0 0 * * *", DUE_WINDOW, None)
    slot = math.ceil((now + SLOT_LEAD) / 60) * 60
    at = datetime.fromtimestamp(slot, UTC)
    # Daily at that minute: yesterday's slot is long out of its window, so only this one runs.
    return SlotPlan(f"{at.minute} {at.hour} * * *", timedelta(hours=6), float(slot))


def limit_fleet(options: Options, *, faults: Faults | None = None, busy: bool = False) -> Fleet:
    """The fleet at the published limits, with realistic latency (and optionally faults)."""
    instances = make_fleet(
        options.instances,
        options.seed,
        busy_share=options.busy_share if busy else 0.0,
        busy_seconds=options.busy_seconds,
    )
    return Fleet(
        instances=instances,
        limits=dict(DEFAULT_LIMITS),
        create_delay=(options.build_delay, options.build_delay),
        faults=faults or Faults(latency=options.latency),
        seed=options.seed,
    )


def drain_timeout(options: Options, extra: float = 0.0) -> float:
    """A generous bound on one fleet run: four times the ideal, plus slack."""
    limit = DEFAULT_LIMITS["CreateImage"]
    return 4 * (options.instances / limit + options.build_delay) + 60 + extra


async def fleet_at_limit(env: Env) -> dict[str, Any]:
    """cvm-backup against the fleet at 10 CreateImage/s."""
    options = env.options
    fleet = limit_fleet(options)
    async with stage(env, fleet) as st:
        plan = plan_slot(options.slot, time.time())
        await add_policy(st.dsn, POLICY, schedule=plan.schedule, window=plan.window, tags=TAGS)
        daemon = daemon_for(env, st, "fleet", daemon_config(options))
        wait = (plan.slot - time.time()) if plan.slot else 0.0
        code = await drive(daemon, st, drain_timeout(options, wait))
        return {
            "instances": len(fleet.instances),
            "limit": DEFAULT_LIMITS["CreateImage"],
            "latency": list(options.latency),
            "build_delay": options.build_delay,
            **await _figures(st, plan, daemon.started_at, options),
            "backed_up": backed_up(st.sim, fleet.ids),
            "api": api_summary(st.sim, st.arrivals),
            "daemon": {"exit_code": code, "cpu_seconds": daemon.cpu_seconds},
        }


async def _figures(st: Stage, plan: SlotPlan, spawned: float, options: Options) -> dict[str, Any]:
    line = await timeline(st.pool)
    creates = st.arrivals.of("CreateImage")
    # Without a future slot, completion counts from the run's creation, the first call from
    # the daemon's spawn (Python start-up included).
    start = plan.slot if plan.slot is not None else line.run_created
    first_from = plan.slot if plan.slot is not None else spawned
    return {
        **_throughput(creates),
        **_completion(line.last_finished, start, creates, options),
        "first_call": {
            "seconds": seconds(creates[0] - first_from, 3) if creates else None,
            "from": "slot" if plan.slot is not None else "daemon start",
        },
        # The tracker's longest pause: what stretches the completion past the bound.
        "describe_images_max_gap_seconds": max_gap(st.arrivals.of("DescribeImages")),
        "jobs": await tally(st.pool),
    }


def _throughput(creates: list[float]) -> dict[str, Any]:
    limit = DEFAULT_LIMITS["CreateImage"]
    rate = span_rate(creates)
    return {
        "create_calls": len(creates),
        "create_rate": None if rate is None else round(rate, 3),
        "utilization": ratio(rate, limit, 4),
        "dispatch_seconds": seconds(creates[-1] - creates[0]) if creates else None,
    }


def _completion(
    last: float | None, start: float, creates: list[float], options: Options
) -> dict[str, Any]:
    limit = DEFAULT_LIMITS["CreateImage"]
    bound = options.instances / limit + options.build_delay
    took = None if last is None else last - start
    # How long after the last image was built its job was recorded: the tracker's share.
    lag = None if last is None or not creates else last - (creates[-1] + options.build_delay)
    return {
        "completion_seconds": seconds(took),
        "lower_bound_seconds": seconds(bound),
        "completion_ratio": ratio(took, bound),
        "last_image_to_recorded_seconds": seconds(lag),
    }
