"""Side by side: the sequential SDK loop and cvm-backup, on the same fleet, clean and faulty.

Each contender gets a fresh simulator built from the same configuration (same seed, same fleet,
same faults), so neither inherits the other's images or throttling windows. What counts is
judged at the simulator: an instance is backed up when it has a live NORMAL image.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from orchestrator.bench.baseline import MISSING_SDK, SdkMissing, run_baseline
from orchestrator.bench.fleet import drain_timeout, limit_fleet
from orchestrator.bench.harness import Env, daemon_config, daemon_for, drive, stage
from orchestrator.bench.options import Options
from orchestrator.bench.records import add_due_policy, tally, timeline
from orchestrator.bench.simside import TAGS, Fleet, api_summary, backed_up, serve
from orchestrator.simulator.config import Faults

PACED = 0.1  # seconds slept after each call: `time.sleep(0.1)` for a 10/s limit


def faulty_fleet(options: Options) -> Fleet:
    """The limit fleet with InternalError on every action and a share of busy instances."""
    faults = Faults(internal_error_rate=options.fault_rate, latency=options.latency)
    return limit_fleet(options, faults=faults, busy=True)


def fault_summary(options: Options, fleet: Fleet) -> dict[str, Any]:
    """What was injected, for the report."""
    busy = sum(1 for i in fleet.instances if i.behaviour == "busy")
    return {
        "internal_error_rate": options.fault_rate,
        "busy_instances": busy,
        "busy_seconds": options.busy_seconds,
    }


async def sdk_loop(env: Env, fleet: Fleet, pause: float = 0.0) -> dict[str, Any]:
    """The baseline against a fresh simulator for `fleet`."""
    async with serve(fleet) as (sim, arrivals):
        timeout = drain_timeout(env.options)
        try:
            result = await asyncio.to_thread(run_baseline, sim.endpoint, fleet.ids, timeout, pause)
        except SdkMissing:
            print(MISSING_SDK, file=sys.stderr, flush=True)
            return {"skipped": MISSING_SDK}
        done = backed_up(sim, fleet.ids)
        return {
            "instances": len(fleet.ids),
            "pause": pause,
            "backed_up": done,
            "without_backup": len(fleet.ids) - done,
            "seconds": result.seconds,
            "create_loop_seconds": result.create_seconds,
            "errors": dict(result.errors.most_common()),
            "api": api_summary(sim, arrivals),
        }


async def cvm_backup(env: Env, fleet: Fleet, name: str) -> dict[str, Any]:
    """cvm-backup against a fresh simulator for `fleet`, policy due at once."""
    async with stage(env, fleet) as st:
        await add_due_policy(st.dsn, f"bench-{name}", tags=TAGS)
        daemon = daemon_for(env, st, name, daemon_config(env.options))
        code = await drive(daemon, st, drain_timeout(env.options, env.options.busy_seconds * 4))
        line = await timeline(st.pool)
        done = backed_up(st.sim, fleet.ids)
        took = None if line.last_finished is None else line.last_finished - line.run_created
        return {
            "instances": len(fleet.ids),
            "backed_up": done,
            "without_backup": len(fleet.ids) - done,
            "seconds": None if took is None else round(took, 2),
            "jobs": await tally(st.pool),
            "api": api_summary(st.sim, st.arrivals),
            "daemon": {"exit_code": code, "cpu_seconds": daemon.cpu_seconds},
        }


async def baseline_clean(env: Env) -> dict[str, Any]:
    """The SDK loop on the clean fleet (cvm-backup's side is the `fleet` scenario)."""
    return await sdk_loop(env, limit_fleet(env.options))


async def with_faults(env: Env) -> dict[str, Any]:
    """Both contenders on the faulty fleet."""
    fleet = faulty_fleet(env.options)
    found: dict[str, Any] = {"faults": fault_summary(env.options, fleet)}
    if env.options.baseline:
        found["baseline"] = await sdk_loop(env, fleet)
        # Paced, so what it leaves behind is the faults' doing rather than the throttling's.
        found["baseline_paced"] = await sdk_loop(env, fleet, PACED)
    found["cvm_backup"] = await cvm_backup(env, fleet, "faults")
    return found
