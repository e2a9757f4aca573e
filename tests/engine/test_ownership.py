"""Ownership: an image with a job's exact name is adopted only when its tags prove it is ours."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from orchestrator import naming, scheduler, status
from orchestrator.context import EngineContext
from orchestrator.daemon import EXIT_JOBS_FAILED
from orchestrator.db import policies as policy_rows
from orchestrator.scheduler import Targets
from orchestrator.simulator.config import SimConfig, SimImageSeed
from orchestrator.simulator.runner import Simulator
from tests.fixtures.engine import drain, insert_policy, job_states
from tests.fixtures.sim import TEST_REGION, make_sim_config

POLICY = "own"
NOW = datetime.now(UTC).replace(second=0, microsecond=0)
SLOT_1 = NOW - timedelta(days=2)
SLOT_2 = NOW - timedelta(days=1)
LOOKALIKE = "img-lookalik"

# Tags an image with our exact name may carry and still not be ours.
FOREIGN_TAGS = {
    "someone_else": {"owner": "someone-else"},
    "policy_tag_only": {naming.TAG_POLICY: POLICY},
    "other_deployment": {naming.TAG_DEPLOYMENT: "staging", naming.TAG_POLICY: POLICY},
}


@pytest.fixture(params=sorted(FOREIGN_TAGS))
def sim_config(request: pytest.FixtureRequest) -> SimConfig:
    """The test fleet plus an image named exactly like the first instance's slot-1 backup."""
    config = make_sim_config()
    instance = config.instances[0].instance_id
    lookalike = SimImageSeed(
        image_id=LOOKALIKE,
        name=naming.image_name(POLICY, instance, SLOT_1),
        region=TEST_REGION,
        tags=FOREIGN_TAGS[request.param],
        instance_id=instance,
    )
    return replace(config, images=(*config.images, lookalike))


async def _run(pool: asyncpg.Pool, instance: str, slot: datetime) -> int:
    policy = await policy_rows.fetch_policy(pool, POLICY)
    assert policy is not None
    return (
        await scheduler.create_run(pool, policy, slot, Targets((instance,), ()), "manual")
    ).run_id


def _alive(sim: Simulator, image_id: str) -> bool:
    return sim.state.images[image_id].alive


async def test_lookalike_is_never_adopted_shown_or_deleted_across_two_slots(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Slot 1 fails name_taken; slot 2 succeeds, and keep_last=1 retention spares the look-alike."""
    instance = simulator.config.instances[0].instance_id
    await insert_policy(pg_pool, POLICY, instance_ids=[instance], keep_last=1)
    assert await drain(engine_ctx, run_id=await _run(pg_pool, instance, SLOT_1)) == EXIT_JOBS_FAILED
    row = await pg_pool.fetchrow("SELECT state, reason, last_error_code, image_id FROM jobs")
    assert row is not None
    assert (row["state"], row["reason"], row["last_error_code"]) == (
        "failed",
        "name_taken",
        "ImageNameTaken",
    )
    assert row["image_id"] is None
    assert await drain(engine_ctx, run_id=await _run(pg_pool, instance, SLOT_2)) == 0
    assert _alive(simulator, LOOKALIKE)
    assert LOOKALIKE not in {d.image_id for d in simulator.state.deletions}
    assert await pg_pool.fetchval("SELECT count(*) FROM images WHERE image_id = $1", LOOKALIKE) == 0
    rows = await status.fetch_rows(pg_pool)
    assert LOOKALIKE not in {r.get("latest_image_id") for r in rows}


async def test_a_crashed_job_meeting_a_lookalike_fails_without_calling_create_image(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """A crashed job's name look-up finds a foreign image: name_taken, no call, no adoption."""
    instance = simulator.config.instances[0].instance_id
    await insert_policy(pg_pool, POLICY, instance_ids=[instance], keep_last=1)
    run_id = await _run(pg_pool, instance, SLOT_1)
    await pg_pool.execute("UPDATE jobs SET state = 'creating'")
    assert await drain(engine_ctx, run_id=run_id) == EXIT_JOBS_FAILED
    assert (await job_states(pg_pool))[instance][:2] == ("failed", "name_taken")
    assert simulator.state.count_calls("CreateImage") == 0
    message = await pg_pool.fetchval("SELECT last_error_message FROM jobs")
    assert LOOKALIKE in message
    assert _alive(simulator, LOOKALIKE)
