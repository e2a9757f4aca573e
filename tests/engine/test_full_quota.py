"""A full-quota slot under a delete delay: exactly the deficit goes, and every job succeeds."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from orchestrator import scheduler
from orchestrator.context import EngineContext
from orchestrator.daemon import Engine, Signals
from orchestrator.db import pool
from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.fleet import generate_fleet
from orchestrator.simulator.runner import Simulator
from tests.fixtures.engine import drain, insert_policy
from tests.fixtures.sim import FOREIGN_IMAGE, TEST_REGION, assert_sim_clean, make_sim_config

INSTANCES = 24
ROOM = 6
KEEP_LAST = 3
DELETE_DELAY = 4.0


@pytest.fixture
def sim_config() -> SimConfig:
    """24 instances; deleted images stay listed as DELETING, holding quota, for 4 s."""
    return replace(
        make_sim_config(),
        instances=generate_fleet(INSTANCES, regions=(TEST_REGION,), seed=21),
        create_delay=(0.05, 0.2),
        delete_delay=DELETE_DELAY,
        quota={TEST_REGION: 1000},
        seed=21,
    )


async def _two_slots(ctx: EngineContext, pg_pool: asyncpg.Pool) -> int:
    """Two earlier slots (two images per instance, inside keep_last); the policy id."""
    policy = await insert_policy(
        pg_pool, "full", instance_tags={"backup": "daily"}, keep_last=KEEP_LAST
    )
    now = datetime.now(UTC)
    for days in (3, 2):
        (run,) = await scheduler.schedule_pass(ctx, now=now - timedelta(days=days))
        assert await drain(ctx, run_id=run.run_id) == 0
    return policy


def _fill(sim: Simulator) -> None:
    """The quota: every image there now plus room for ROOM more."""
    live = [i for i in sim.state.images.values() if i.alive and i.region == TEST_REGION]
    sim.state.quota[TEST_REGION] = len(live) + ROOM


async def _check(pg_pool: asyncpg.Pool, sim: Simulator) -> None:
    """All 24 succeeded, exactly 18 deletions, each after a newer image of its instance."""
    states = await pg_pool.fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")
    assert {r["state"]: r["n"] for r in states} == {"succeeded": 3 * INSTANCES}
    assert len(sim.state.deletions) == INSTANCES - ROOM
    assert sim.state.images[FOREIGN_IMAGE.image_id].alive
    rows = await pg_pool.fetch(
        "SELECT e.at, i.instance_id, i.created_at FROM events e"
        " JOIN images i ON i.image_id = e.image_id WHERE e.kind = 'rotation.delete_requested'"
    )
    assert len(rows) == INSTANCES - ROOM
    assert len({r["instance_id"] for r in rows}) == INSTANCES - ROOM  # one per instance
    for row in rows:
        newer = await pg_pool.fetchval(
            "SELECT count(*) FROM images WHERE instance_id = $1 AND created_at > $2"
            " AND ready_at IS NOT NULL AND ready_at <= $3",
            row["instance_id"],
            row["created_at"],
            row["at"],
        )
        assert newer >= 1
    gone = await pg_pool.fetchval("SELECT count(*) FROM images WHERE deleted_at IS NOT NULL")
    assert gone == INSTANCES - ROOM  # confirmed once DescribeImages no longer listed them
    assert_sim_clean(sim)


async def test_full_quota_slot_deletes_exactly_the_deficit(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """24 jobs, room for 6, keep_last 3, 4 s delete delay: all succeed, exactly 18 go."""
    await _two_slots(engine_ctx, pg_pool)
    _fill(simulator)
    (run,) = await scheduler.schedule_pass(engine_ctx, now=datetime.now(UTC) - timedelta(days=1))
    assert await drain(engine_ctx, run_id=run.run_id, within=60) == 0
    await _check(pg_pool, simulator)


async def test_full_quota_slot_with_two_replicas(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator, pg_dsn: str
) -> None:
    """Two engines on one database split the same slot and still delete exactly 18."""
    await _two_slots(engine_ctx, pg_pool)
    _fill(simulator)
    (run,) = await scheduler.schedule_pass(engine_ctx, now=datetime.now(UTC) - timedelta(days=1))
    second = await pool.create_pool_dsn(pg_dsn, min_size=1, max_size=8)
    try:
        replica = replace(engine_ctx, pool=second, worker_id="other-host:2:def")
        engines = [
            Engine(c, Signals(), once=True, run_id=run.run_id) for c in (engine_ctx, replica)
        ]
        codes = await asyncio.wait_for(asyncio.gather(*(e.run() for e in engines)), 60)
    finally:
        await second.close()
    assert codes == [0, 0]
    await _check(pg_pool, simulator)
