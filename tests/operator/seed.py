"""Job history written with plain SQL, as a year of daemon runs would have left it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from tests.fixtures.sim import TEST_REGION


def midnight(days_ago: int) -> datetime:
    """UTC midnight `days_ago` days ago: the slots of a daily-at-midnight policy."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days_ago)


async def add_job(
    pool: asyncpg.Pool,
    policy_id: int,
    instance_id: str,
    slot: datetime,
    state: str,
    *,
    finished_ago: float = 0.0,
    reason: str | None = None,
    deadline: datetime | None = None,
) -> int:
    """One job of the policy's run at `slot`; a terminal one finished `finished_ago` s ago."""
    run_id = await pool.fetchval(
        "INSERT INTO runs (policy_id, slot) VALUES ($1, $2)"
        " ON CONFLICT (policy_id, slot) DO UPDATE SET trigger = runs.trigger RETURNING id",
        policy_id,
        slot,
    )
    terminal = state in ("succeeded", "failed", "expired", "skipped")
    value_ = await pool.fetchval(
        "INSERT INTO jobs (run_id, policy_id, account, region, instance_id, slot, image_name,"
        " deadline, state, image_id, reason, finished_at)"
        " VALUES ($1, $2, 'default', $3, $4, $5, $6, $7, $8,"
        " CASE WHEN $8::text = 'succeeded' THEN 'img-done' END, $9,"
        " CASE WHEN $10 THEN now() - make_interval(secs => $11::float8) END) RETURNING id",
        run_id,
        policy_id,
        TEST_REGION,
        instance_id,
        slot,
        f"cvmbk-x-{instance_id}-{slot:%Y%m%dT%H%MZ}",
        deadline or slot + timedelta(days=2),
        state,
        reason,
        terminal,
        finished_ago,
    )
    return int(value_)
