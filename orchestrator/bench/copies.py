"""Cross-region copies at the real limits: how long from a backup's NORMAL to its copy's.

The fleet of the `fleet` scenario, its policy copying every backup to one destination. Copies
start as backups become NORMAL, so SyncImages (10/s) runs beside CreateImage (10/s) through the
same limiter; a copy syncs for the build delay. Reported: the lag of each copy behind its source
(median, p95, max: a copy queued behind a rate limit shows here), the whole run's completion,
and what the API saw (throttles and limit violations must stay 0).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

from orchestrator.bench.fleet import drain_timeout, limit_fleet, plan_slot
from orchestrator.bench.harness import Env, daemon_config, daemon_for, drive, stage
from orchestrator.bench.measures import seconds
from orchestrator.bench.records import add_policy, tally, timeline
from orchestrator.bench.simside import TAGS, api_summary
from orchestrator.config import DEFAULT_LIMITS

POLICY = "bench-copies"
DESTINATION = "ap-shanghai"

# Each copy beside its source: both ready times, from the images the tracker recorded.
_LAGS = """
SELECT extract(epoch FROM c.ready_at - s.ready_at) AS lag
FROM images c JOIN images s ON s.image_id = c.source_image_id
WHERE c.ready_at IS NOT NULL AND s.ready_at IS NOT NULL
"""


async def copies_at_limit(env: Env) -> dict[str, Any]:
    """cvm-backup making a backup and a copy of each of the fleet's instances."""
    options = env.options
    delay = (options.build_delay, options.build_delay)
    fleet = replace(limit_fleet(options), sync_delay=delay)
    async with stage(env, fleet) as st:
        plan = plan_slot(options.slot, time.time())
        await add_policy(
            st.dsn,
            POLICY,
            schedule=plan.schedule,
            window=plan.window,
            tags=TAGS,
            copies=(DESTINATION,),
        )
        daemon = daemon_for(env, st, "copies", daemon_config(options))
        wait = (plan.slot - time.time()) if plan.slot else 0.0
        # Twice the calls of a fleet run: a CreateImage and a SyncImages per instance.
        code = await drive(daemon, st, 2 * drain_timeout(options, wait))
        lags = [float(r["lag"]) for r in await st.pool.fetch(_LAGS)]
        line = await timeline(st.pool)
        start = plan.slot if plan.slot is not None else line.run_created
        return {
            "instances": len(fleet.instances),
            "limits": {a: DEFAULT_LIMITS[a] for a in ("CreateImage", "SyncImages")},
            "build_and_sync_delay": options.build_delay,
            "copies": len(lags),
            **_lags(lags),
            "completion_seconds": seconds(
                None if line.last_finished is None else line.last_finished - start
            ),
            "jobs": await tally(st.pool),
            "api": api_summary(st.sim, st.arrivals),
            "daemon": {"exit_code": code, "cpu_seconds": daemon.cpu_seconds},
        }


def _lags(lags: list[float]) -> dict[str, Any]:
    if not lags:
        return {"normal_to_copy_normal_seconds": None}
    ordered = sorted(lags)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "normal_to_copy_normal_seconds": {
            "median": seconds(statistics.median(ordered)),
            "p95": seconds(p95),
            "max": seconds(ordered[-1]),
        }
    }
