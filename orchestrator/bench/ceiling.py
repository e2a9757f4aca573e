"""The engine's own ceiling: every rate limit lifted, jobs per second through Postgres.

The simulator answers at once (no latency, no limits) and builds images in a blink; the
daemon's limiter is configured far above anything it can reach. What is left is the engine:
scheduling, claiming, recording, tracking, and a few Postgres round trips per job. The daemon
otherwise runs with product defaults (max_in_flight, tracker intervals, durable commits).
"""

from __future__ import annotations

import resource
from typing import Any

from orchestrator.bench.daemon import DaemonConfig
from orchestrator.bench.harness import Env, daemon_config, daemon_for, drive, stage
from orchestrator.bench.measures import ratio, seconds, span_rate
from orchestrator.bench.options import Options
from orchestrator.bench.records import Timeline, add_due_policy, tally, timeline, write_counts
from orchestrator.bench.simside import TAGS, Fleet, api_summary, make_fleet
from orchestrator.config import DEFAULT_LIMITS
from orchestrator.simulator.config import NO_LIMITS

LIFTED = 1_000_000  # calls per second: a limiter setting nothing can reach
FAST_BUILD = (0.05, 0.1)
_TIMEOUT_FLOOR = 120.0


def lifted_config(options: Options) -> DaemonConfig:
    """Daemon settings with every limiter far out of the way."""
    return daemon_config(options, dict.fromkeys(DEFAULT_LIMITS, LIFTED))


def unlimited_fleet(count: int, seed: int) -> Fleet:
    """`count` tagged instances on a simulator without limits or latency."""
    return Fleet(
        instances=make_fleet(count, seed),
        limits=dict(NO_LIMITS),
        create_delay=FAST_BUILD,
        seed=seed,
    )


async def engine_ceiling(env: Env) -> dict[str, Any]:
    """Jobs per second from run creation to the last job recorded as succeeded."""
    options = env.options
    fleet = unlimited_fleet(options.ceiling_jobs, options.seed)
    async with stage(env, fleet) as st:
        own_cpu, db_cpu = _own_cpu(), env.database.cpu_seconds()
        await add_due_policy(st.dsn, "bench-ceiling", tags=TAGS)
        daemon = daemon_for(env, st, "ceiling", lifted_config(options))
        code = await drive(daemon, st, max(_TIMEOUT_FLOOR, options.ceiling_jobs / 10))
        own_cpu = _own_cpu() - own_cpu
        db_cpu = _spent(db_cpu, env.database.cpu_seconds())
        line = await timeline(st.pool)
        writes = await write_counts(st.pool)
        return {
            **_figures(line, st.arrivals.of("CreateImage"), daemon.started_at),
            "states": await tally(st.pool),
            "api": api_summary(st.sim, st.arrivals),
            "daemon": {
                "exit_code": code,
                "cpu_seconds": daemon.cpu_seconds,
                "cpu_ms_per_job": ratio((daemon.cpu_seconds or 0) * 1000, line.jobs, 2),
            },
            # The simulator and Postgres share the host's cores with the daemon.
            "simulator_cpu_seconds": round(own_cpu, 2),
            "database": {
                "cpu_seconds": None if db_cpu is None else round(db_cpu, 2),
                "cpu_ms_per_job": ratio(None if db_cpu is None else db_cpu * 1000, line.jobs, 2),
                # Round trips that commit, per job: what grouping writes saves.
                "commits_per_job": ratio(writes["commits"], line.jobs, 2),
                "row_writes": writes["tables"],
            },
        }


def _figures(line: Timeline, creates: list[float], spawned: float) -> dict[str, Any]:
    took = None if line.last_finished is None else line.last_finished - line.run_created
    rate = span_rate(creates)
    # From the last CreateImage to the last job recorded: the tracker's share of the run.
    tail = line.last_finished - creates[-1] if line.last_finished and creates else None
    return {
        "jobs": line.jobs,
        "seconds": seconds(took),
        "jobs_per_second": ratio(line.jobs, took, 1),
        "create_rate": None if rate is None else round(rate, 1),
        "scheduling_seconds": seconds(line.run_created - spawned),
        "last_create_to_recorded_seconds": seconds(tail),
    }


def _spent(before: float | None, after: float | None) -> float | None:
    """CPU used between two readings (None for a server whose processes we cannot see)."""
    return None if before is None or after is None else after - before


def _own_cpu() -> float:
    """CPU seconds of this process (the in-process simulator, plus the bench's polling)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
