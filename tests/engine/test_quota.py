"""Quota: rotation frees room on the second run; `fail` and exhausted quotas fail the job."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from orchestrator import scheduler
from orchestrator.context import EngineContext
from orchestrator.simulator.config import Faults, SimConfig
from orchestrator.simulator.fleet import generate_fleet
from orchestrator.simulator.runner import Simulator
from tests.fixtures.engine import drain, insert_policy, job_states
from tests.fixtures.logs import LogCapture
from tests.fixtures.sim import FOREIGN_IMAGE, TEST_REGION, assert_sim_clean, make_sim_config

FLEET = generate_fleet(6, regions=(TEST_REGION,), seed=5)
QUOTA = 8  # the foreign image plus six of ours fit; a second run of six does not


@pytest.fixture
def sim_config() -> SimConfig:
    """Six instances, room for one run and a bit, 20% transient errors."""
    return replace(
        make_sim_config(),
        instances=FLEET,
        quota={TEST_REGION: QUOTA},
        faults=Faults(internal_error_rate=0.15, drop_rate=0.05, after_create=0.5),
        seed=11,
    )


async def _run_at(ctx: EngineContext, when: datetime) -> int:
    (created,) = await scheduler.schedule_pass(ctx, now=when)
    return await drain(ctx, run_id=created.run_id)


async def test_second_run_rotates_our_oldest_images_to_fit_the_quota(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    captured_logs: LogCapture,
) -> None:
    """Run two evicts first-run images (never the foreign one) and every job succeeds."""
    await insert_policy(pg_pool, "rot", instance_tags={"backup": "daily"}, keep_last=7)
    now = datetime.now(UTC)
    assert await _run_at(engine_ctx, now - timedelta(days=2)) == 0
    code = await _run_at(engine_ctx, now - timedelta(days=1))
    assert code == 0, [
        (line["event"], line.get("instance"), line.get("code"), line.get("reason"))
        for line in captured_logs.lines
        if line["event"].startswith(("job.failed", "quota", "rotation.w", "image.failed"))
    ]
    rows = await pg_pool.fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")
    assert {r["state"]: r["n"] for r in rows} == {"succeeded": 12}
    live = [i for i in simulator.state.to_json()["images"] if i["ours"] and not i["deleted"]]
    assert len(live) <= QUOTA - 1
    newest = await pg_pool.fetch(
        "SELECT image_id FROM jobs WHERE slot = (SELECT max(slot) FROM runs)"
    )
    assert {r["image_id"] for r in newest} <= {i["image_id"] for i in live}
    assert simulator.state.images[FOREIGN_IMAGE.image_id].alive
    assert "rotation.deleted" in captured_logs.events()
    assert_sim_clean(simulator)


@pytest.mark.parametrize("on_quota", ["fail", "rotate"])
async def test_full_quota_without_room_fails_the_job(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator, on_quota: str
) -> None:
    """A region full of images that are not ours: the job fails with ImageQuotaLimitExceeded."""
    simulator.clear_faults()
    simulator.state.quota = {TEST_REGION: 1}  # the foreign image fills it
    await insert_policy(pg_pool, "full", instance_ids=[FLEET[0].instance_id], on_quota=on_quota)
    assert await drain(engine_ctx) == 1
    state, _, code = (await job_states(pg_pool))[FLEET[0].instance_id]
    assert (state, code) == ("failed", "ImageQuotaLimitExceeded")
    assert simulator.state.deletions == []
