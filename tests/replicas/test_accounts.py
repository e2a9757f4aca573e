"""Policies name configured accounts; an unknown one is refused loudly, not silently queued."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from orchestrator import scheduler
from orchestrator.context import EngineContext
from tests.fixtures.engine import insert_policy
from tests.fixtures.logs import LogCapture


async def test_policy_naming_an_unconfigured_account_creates_no_jobs_and_says_why(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    captured_logs: LogCapture,
) -> None:
    """A due policy of an account missing from [[accounts]] logs schedule.failed, no jobs."""
    policy_id = await insert_policy(pg_pool, "ghost", instance_tags={"backup": "daily"})
    await pg_pool.execute("UPDATE policies SET account = 'nope' WHERE id = $1", policy_id)
    created = await scheduler.schedule_pass(engine_ctx, now=datetime.now(UTC) - timedelta(days=1))
    assert created == []
    assert await pg_pool.fetchval("SELECT count(*) FROM jobs") == 0
    failed = [line for line in captured_logs.lines if line["event"] == "schedule.failed"]
    assert failed, captured_logs.events()
    assert "'nope' is not configured" in failed[0]["error"]
