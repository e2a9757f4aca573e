"""Peak resident memory of the daemon process with 100,000 jobs materialized.

The daemon runs as its own process, so /proc/PID/status (VmHWM, the kernel's high-water mark)
measures it and nothing else. It starts idle, then a policy naming 100,000 explicit instance
ids is stored; the scheduler resolves them (1,000 DescribeInstances calls), inserts the run and
its jobs, and the dispatcher and tracker work through them for a while at unlimited rates.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from orchestrator.bench.ceiling import lifted_config, unlimited_fleet
from orchestrator.bench.daemon import Daemon, Memory
from orchestrator.bench.harness import BenchError, Env, Stage, daemon_for, stage
from orchestrator.bench.records import add_due_policy, poll, run_created, tally

STARTED_EVENT = '"daemon.started"'
_START_TIMEOUT = 60.0
_SETTLE = 1.0  # let the idle daemon finish its first passes before the idle reading
_SAMPLE_EVERY = 0.2


def _mib(memory: Memory | None) -> dict[str, float | None]:
    return {"rss_mb": memory.rss if memory else None, "peak_mb": memory.peak if memory else None}


async def _started(daemon: Daemon) -> bool:
    if not daemon.running:
        raise BenchError(f"the daemon exited early:\n{daemon.tail()}")
    return STARTED_EVENT in daemon.log_path.read_text(encoding="utf-8", errors="replace")


async def _sample(daemon: Daemon, peaks: list[float]) -> None:
    """Keep the largest VmRSS seen (a cross-check of VmHWM)."""
    while True:
        memory = daemon.memory()
        if memory is not None:
            peaks.append(memory.rss)
        await asyncio.sleep(_SAMPLE_EVERY)


async def memory_at_scale(env: Env) -> dict[str, Any]:
    """Idle RSS, RSS once the jobs exist, and the peak after dispatching for a while."""
    options = env.options
    fleet = unlimited_fleet(options.memory_jobs, options.seed)
    async with stage(env, fleet) as st:
        daemon = daemon_for(env, st, "memory", lifted_config(options))
        await daemon.start(once=False)
        try:
            found = await _measure(env, st, daemon, fleet.ids)
        finally:
            code = await daemon.stop()
        return {**found, "states": await tally(st.pool), "daemon": {"exit_code": code}}


async def _measure(env: Env, st: Stage, daemon: Daemon, ids: list[str]) -> dict[str, Any]:
    if not await poll(lambda: _started(daemon), _START_TIMEOUT):
        raise BenchError(f"the daemon did not start:\n{daemon.tail()}")
    await asyncio.sleep(_SETTLE)
    idle = daemon.memory()
    peaks: list[float] = []
    sampler = asyncio.create_task(_sample(daemon, peaks))
    try:
        found = await _load(env, st, daemon, ids)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    final = found.pop("final_memory")
    return {
        "jobs": int(await st.pool.fetchval("SELECT count(*) FROM jobs")),
        **found,
        "idle": _mib(idle),
        "final": _mib(final),
        "peak_rss_mb": final.peak if final else None,
        "max_sampled_rss_mb": max(peaks, default=None),
        "source": "/proc/PID/status VmHWM" if final else "unavailable (not Linux)",
    }


async def _load(env: Env, st: Stage, daemon: Daemon, ids: list[str]) -> dict[str, Any]:
    """Store the policy, wait for its run, let the engine work on it; readings on the way."""
    began = time.monotonic()
    await add_due_policy(st.dsn, "bench-memory", ids=ids)
    if not await poll(lambda: run_created(st.pool), within=600, interval=0.25):
        raise BenchError(f"no run was created:\n{daemon.tail()}")
    scheduled = time.monotonic() - began
    after_schedule = daemon.memory()
    await asyncio.sleep(env.options.memory_seconds)
    return {
        "scheduling_seconds": round(scheduled, 2),
        "dispatch_seconds": env.options.memory_seconds,
        "after_schedule": _mib(after_schedule),
        "final_memory": daemon.memory(),
    }
