"""A full-quota slot beside the same slot with room: what rotation costs, and what it deletes.

Both runs start from the same account: every instance already has two images of ours (the two
previous slots, recorded in the database as the daemon would have), and deleted images stay
listed as DELETING, holding their quota, for `delete_delay` seconds as on the real API. With
room, the slot's jobs just create. With the quota exactly full, every job needs an eviction:
rotation must delete exactly one image per job (the deficit), never more, and only each
instance's older image. The report gives the ratio of the two completion times (target 1.5)
and the deletions against the deficit (target: equal).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator import naming
from orchestrator.bench.fleet import drain_timeout, limit_fleet
from orchestrator.bench.harness import Env, Stage, daemon_config, daemon_for, drive, stage
from orchestrator.bench.measures import ratio, seconds
from orchestrator.bench.records import add_due_policy, tally, timeline
from orchestrator.bench.simside import REGION, TAGS, backed_up
from orchestrator.naming import DEFAULT_DEPLOYMENT
from orchestrator.simulator.records import SimImage

POLICY = "bench-quota"
ACCOUNT = "default"
PRIOR_SLOTS = 2  # images per instance before the measured slot: the older one is evictable

_PRIOR = """
INSERT INTO images (image_id, name, account, region, instance_id, policy_id, slot, state,
                    size_gb, created_at, ready_at)
SELECT image_id, name, $2, $3, instance_id, $1, slot, 'NORMAL', 50, slot, slot
FROM unnest($4::text[], $5::text[], $6::text[], $7::timestamptz[])
     AS p(image_id, name, instance_id, slot)
"""


async def quota_rotation(env: Env) -> dict[str, Any]:
    """The same slot twice: with room for every job, then with the quota exactly full."""
    roomy = await _slot(env, full=False)
    full = await _slot(env, full=True)
    return {
        "instances": env.options.instances,
        "delete_delay": env.options.delete_delay,
        "roomy": roomy,
        "full": full,
        "completion_ratio": ratio(full["completion_seconds"], roomy["completion_seconds"]),
        "deletions": full["deletions"],
        "deficit": full["deficit"],
        "extra_deletions": full["deletions"] - full["deficit"],
    }


async def _slot(env: Env, *, full: bool) -> dict[str, Any]:
    options = env.options
    fleet = replace(limit_fleet(options), delete_delay=options.delete_delay)
    async with stage(env, fleet) as st:
        await add_due_policy(st.dsn, POLICY, tags=TAGS)
        await _prior_images(st, fleet.ids)
        occupied = sum(1 for i in st.sim.state.images.values() if i.alive and i.region == REGION)
        room = 0 if full else len(fleet.ids)
        st.sim.state.quota[REGION] = occupied + room
        name = "quota-full" if full else "quota-roomy"
        daemon = daemon_for(env, st, name, daemon_config(options))
        code = await drive(daemon, st, 2 * drain_timeout(options))
        line = await timeline(st.pool)
        took = None if line.last_finished is None else line.last_finished - line.run_created
        return {
            "room": room,
            "completion_seconds": seconds(took),
            "deletions": len(st.sim.state.deletions),
            "deficit": max(len(fleet.ids) - room, 0),
            "backed_up": backed_up(st.sim, fleet.ids),
            "jobs": await tally(st.pool),
            "daemon": {"exit_code": code, "cpu_seconds": daemon.cpu_seconds},
        }


async def _prior_images(st: Stage, ids: list[str]) -> None:
    """Two earlier slots' images per instance, in the simulator and in our table."""
    policy_id = await st.pool.fetchval("SELECT id FROM policies WHERE name = $1", POLICY)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    rows: list[tuple[str, str, str, datetime]] = []
    for back in range(PRIOR_SLOTS, 0, -1):
        slot = today - timedelta(days=back)
        rows += [_seed(st, instance_id, slot) for instance_id in ids]
    columns = [list(column) for column in zip(*rows, strict=True)]
    await st.pool.execute(_PRIOR, policy_id, ACCOUNT, REGION, *columns)


def _seed(st: Stage, instance_id: str, slot: datetime) -> tuple[str, str, str, datetime]:
    state = st.sim.state
    image = SimImage(
        image_id=state.new_image_id(),
        name=naming.image_name(POLICY, instance_id, slot),
        account=state.accounts[0],
        region=REGION,
        state="NORMAL",
        created_time=slot.strftime("%Y-%m-%dT%H:%M:%SZ"),
        instance_id=instance_id,
        tags=naming.ours_tags(DEFAULT_DEPLOYMENT, POLICY),
        description=naming.description(POLICY, instance_id, slot),
    )
    state.add_image(image, delay=None)
    return image.image_id, image.name, instance_id, slot
