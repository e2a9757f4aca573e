"""The quota gate: jobs of a full region wait instead of calling CreateImage into the quota."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from orchestrator import quota_gate, scheduler
from orchestrator.context import EngineContext
from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.fleet import generate_fleet
from orchestrator.simulator.runner import Simulator
from tests.fixtures.engine import drain, insert_policy
from tests.fixtures.sim import TEST_REGION, assert_sim_clean, make_sim_config

FLEET = generate_fleet(8, regions=(TEST_REGION,), seed=7)
# The foreign image, one run of eight and two to spare: the second run fits two images, and
# the other six wait for those builds before rotation can evict anything of the first run.
QUOTA = 1 + len(FLEET) + 2
QUOTA_CODE = "ImageQuotaLimitExceeded"


@pytest.fixture
def sim_config() -> SimConfig:
    """Eight instances, no faults, images that take a while to build."""
    return replace(
        make_sim_config(),
        instances=FLEET,
        quota={TEST_REGION: QUOTA},
        create_delay=(1.5, 2.0),
        seed=3,
    )


async def _run_at(ctx: EngineContext, when: datetime) -> int:
    (created,) = await scheduler.schedule_pass(ctx, now=when)
    return await drain(ctx, run_id=created.run_id)


async def _outcomes(pool: asyncpg.Pool, outcome: str) -> int:
    value = await pool.fetchval(
        "SELECT count(*) FROM events WHERE kind = 'job.attempt' AND details->>'outcome' = $1",
        outcome,
    )
    return int(value)


async def _park_all(pool: asyncpg.Pool, until: datetime) -> None:
    """Park every job as the dispatcher does: released until `until`, a quota_gated ledger row."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE jobs SET next_attempt_at = $1", until)
        await conn.execute(
            "INSERT INTO events (kind, job_id, account, region, details)"
            " SELECT 'job.attempt', id, account, region, '{\"outcome\": \"quota_gated\"}'"
            " FROM jobs"
        )


async def test_full_region_waits_behind_the_gate_instead_of_calling(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Six jobs blocked by a full quota make at most one refused call each, and all succeed."""
    await insert_policy(pg_pool, "gate", instance_tags={"backup": "daily"}, keep_last=7)
    now = datetime.now(UTC)
    assert await _run_at(engine_ctx, now - timedelta(days=2)) == 0
    assert simulator.state.count_calls("CreateImage", QUOTA_CODE) == 0
    assert await _run_at(engine_ctx, now - timedelta(days=1)) == 0
    rows = await pg_pool.fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")
    assert {r["state"]: r["n"] for r in rows} == {"succeeded": 2 * len(FLEET)}
    # Without admission by the gate the blocked jobs make about 49 refused calls here; with the
    # gate alone, 6 (each blocked job once, from the limiter's queue); asked again at the
    # limiter's grant, 3 or 4 (the calls already sent when the region filled).
    blocked = len(FLEET) - 2
    assert simulator.state.count_calls("CreateImage", QUOTA_CODE) < blocked
    assert await _outcomes(pg_pool, "quota_gated") > 0
    assert simulator.state.count_calls("DescribeImageQuota") > 0
    assert await pg_pool.fetchval("SELECT count(*) FROM quota_gates") == 0
    live = [i for i in simulator.state.to_json()["images"] if i["ours"] and not i["deleted"]]
    assert len(live) <= QUOTA - 1
    assert_sim_clean(simulator)


async def test_closed_gate_parks_others_and_a_nudge_wakes_one_probe(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """A closed gate parks every job in Postgres; a settled image pulls exactly one forward."""
    await insert_policy(pg_pool, "park", instance_tags={"backup": "daily"})
    await scheduler.schedule_pass(engine_ctx, now=datetime.now(UTC))
    account, region = "default", TEST_REGION
    reopen = await quota_gate.close(engine_ctx, account, region)
    await _park_all(pg_pool, reopen + timedelta(hours=1))
    gate = await pg_pool.fetchrow(
        "SELECT *, now() AS now FROM quota_gates WHERE account = $1 AND region = $2",
        account,
        region,
    )
    assert gate is not None
    assert quota_gate.judge(gate, job_id=1).until == gate["reopen_at"]
    async with pg_pool.acquire() as conn:
        assert await quota_gate.nudge(conn, account, region)
    due = await pg_pool.fetchval("SELECT count(*) FROM jobs WHERE next_attempt_at <= now()")
    assert due == 1
    gate = await pg_pool.fetchrow("SELECT *, now() AS now FROM quota_gates")
    assert gate is not None
    assert quota_gate.judge(gate, job_id=1).why == "probe"
    assert simulator.state.count_calls("CreateImage") == 0


async def test_measured_room_opens_the_gate_for_that_many_jobs(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Room for two of eight waiting jobs: two tokens, two jobs woken, the gate stays."""
    await insert_policy(pg_pool, "room", instance_tags={"backup": "daily"})
    await scheduler.schedule_pass(engine_ctx, now=datetime.now(UTC))
    account, region = "default", TEST_REGION
    await quota_gate.close(engine_ctx, account, region)
    await _park_all(pg_pool, datetime.now(UTC) + timedelta(hours=1))
    room = await quota_gate.measure_room(engine_ctx, account, region)
    assert room == QUOTA - 1  # only the foreign image so far
    await quota_gate.open_room(engine_ctx, account, region, 2)
    assert await pg_pool.fetchval("SELECT tokens FROM quota_gates") == 2
    due = await pg_pool.fetchval("SELECT count(*) FROM jobs WHERE next_attempt_at <= now()")
    assert due == 2
    await quota_gate.open_room(engine_ctx, account, region, len(FLEET))
    assert await pg_pool.fetchval("SELECT count(*) FROM quota_gates") == 0
    assert simulator.state.count_calls("CreateImage") == 0
