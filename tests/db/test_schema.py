"""The schema refuses bad rows by itself: CHECK constraints, uniqueness, an append-only ledger."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from orchestrator.db import policies as queries

GOOD: dict[str, Any] = {
    "name": "web-nightly",
    "region": "ap-guangzhou",
    "schedule": "0 3 * * *",
    "timezone": "Asia/Shanghai",
    "instance_ids": ["ins-6pb6lrmy"],
    "instance_tags": {"backup": "nightly"},
    "on_quota": "rotate",
    "completion_window": "6 hours",
    "keep_last": 7,
}


async def insert_policy(conn: asyncpg.Connection | asyncpg.Pool, **overrides: Any) -> int:
    """Insert a policy row with plain SQL; return its id."""
    row = {**GOOD, **overrides}
    columns = ", ".join(row)
    casts = {"completion_window": "::text::interval", "instance_ids": "::text[]"}
    values = ", ".join(f"${i}{casts.get(k, '')}" for i, k in enumerate(row, start=1))
    query = f"INSERT INTO policies ({columns}) VALUES ({values}) RETURNING id"
    policy_id: int = await conn.fetchval(query, *row.values())
    return policy_id


BAD_POLICIES = [
    ("policies_name_format", {"name": "Web_Nightly"}),
    ("policies_name_format", {"name": "a" * 21}),
    ("policies_name_format", {"name": "-leading"}),
    ("policies_region_format", {"region": "guangzhou"}),
    ("policies_region_format", {"region": "AP-Guangzhou"}),
    ("policies_schedule_fields", {"schedule": "0 3 * *"}),
    ("policies_timezone_format", {"timezone": "../etc/passwd"}),
    ("policies_instance_ids_format", {"instance_ids": ["i-123"]}),
    ("policies_instance_ids_format", {"instance_ids": ["ins-aaaa", "ins-aaaa"]}),
    ("policies_instance_tags_map", {"instance_tags": {"backup": 1}}),
    ("policies_instance_tags_map", {"instance_tags": ["backup"]}),
    ("policies_on_quota", {"on_quota": "ignore"}),
    ("policies_completion_window_positive", {"completion_window": "0 seconds"}),
    ("policies_completion_window_positive", {"completion_window": "-1 hour"}),
    ("policies_keep_last_nonneg", {"keep_last": -1}),
    ("policies_keep_daily_nonneg", {"keep_daily": -1}),
    ("policies_keep_weekly_nonneg", {"keep_weekly": -2}),
    ("policies_keep_monthly_nonneg", {"keep_monthly": -3}),
    ("policies_keep_yearly_nonneg", {"keep_yearly": -4}),
    ("policies_keep_rule", {"keep_last": 0}),
    ("policies_max_age_days_positive", {"max_age_days": 0}),
    ("policies_target", {"instance_ids": [], "instance_tags": {}}),
    ("policies_completion_window_max", {"completion_window": "3000000 days"}),
    ("policies_keep_max", {"keep_last": 2147483647}),
    ("policies_keep_max", {"keep_yearly": 10001}),
    ("policies_max_age_days_max", {"max_age_days": 1000000}),
    ("policies_instance_ids_max", {"instance_ids": [f"ins-{n:08d}" for n in range(10001)]}),
    ("policies_schedule_length", {"schedule": "0 3 * * *" + " " * 200}),
    ("policies_instance_tags_within", {"instance_tags": {"k" * 128: "x"}}),
    ("policies_instance_tags_within", {"instance_tags": {"team": "v" * 256}}),
    ("policies_instance_tags_within", {"instance_tags": {"team": "a\u001bb"}}),
]


@pytest.mark.parametrize(("constraint", "overrides"), BAD_POLICIES)
async def test_bad_policy_rows_are_refused(
    pg_pool: asyncpg.Pool, constraint: str, overrides: dict[str, Any]
) -> None:
    """Each CHECK on policies refuses a plain-SQL insert that breaks it."""
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await insert_policy(pg_pool, **overrides)
    assert caught.value.constraint_name == constraint
    assert await pg_pool.fetchval("SELECT count(*) FROM policies") == 0


async def test_sql_policy_is_as_valid_as_a_file_policy(pg_pool: asyncpg.Pool) -> None:
    """A row inserted with SQL loads into the policy model with defaults filled in."""
    policy_id = await insert_policy(pg_pool, max_age_days=400, keep_daily=7)
    policy = await queries.fetch_policy(pg_pool, "web-nightly")
    assert policy is not None
    assert policy.id == policy_id
    assert policy.instance_tags == {"backup": "nightly"}
    assert policy.retention.keep_daily == 7
    assert policy.retention.max_age_days == 400
    assert policy.account == "default"
    assert policy.enabled


async def test_sql_row_croniter_refuses_is_skipped(pg_pool: asyncpg.Pool) -> None:
    """A five-field schedule croniter cannot parse passes the CHECK but is not loaded."""
    await insert_policy(pg_pool, name="bad-cron", schedule="99 3 * * *")
    await insert_policy(pg_pool, name="good")
    assert [p.name for p in await queries.fetch_policies(pg_pool)] == ["good"]


async def test_policy_name_is_unique(pg_pool: asyncpg.Pool) -> None:
    """Two policies cannot share a name."""
    await insert_policy(pg_pool)
    with pytest.raises(asyncpg.UniqueViolationError):
        await insert_policy(pg_pool)


async def _run(conn: asyncpg.Pool, policy_id: int) -> int:
    run_id: int = await conn.fetchval(
        "INSERT INTO runs (policy_id, slot) VALUES ($1, '2024-05-01 03:00Z') RETURNING id",
        policy_id,
    )
    return run_id


async def _job(conn: asyncpg.Pool, policy_id: int, run_id: int, **overrides: Any) -> int:
    row: dict[str, Any] = {
        "run_id": run_id,
        "policy_id": policy_id,
        "account": "default",
        "region": "ap-guangzhou",
        "instance_id": "ins-6pb6lrmy",
        "slot": "2024-05-01 03:00Z",
        "image_name": "cvmbk-web-nightly-ins-6pb6lrmy-20240501T0300Z",
        "deadline": "2024-05-01 09:00Z",
        **overrides,
    }
    casts = {
        "slot": "::text::timestamptz",
        "deadline": "::text::timestamptz",
        "finished_at": "::text::timestamptz",
        "lease_expires_at": "::text::timestamptz",
    }
    values = ", ".join(f"${i}{casts.get(k, '')}" for i, k in enumerate(row, start=1))
    query = f"INSERT INTO jobs ({', '.join(row)}) VALUES ({values}) RETURNING id"
    job_id: int = await conn.fetchval(query, *row.values())
    return job_id


BAD_JOBS = [
    ("jobs_state", {"state": "running"}),
    ("jobs_image_name_length", {"image_name": "x" * 61}),
    ("jobs_attempts_nonneg", {"attempts": -1}),
    ("jobs_lease_pair", {"lease_owner": "host:1:abc"}),
    ("jobs_finished_at", {"state": "failed"}),
    ("jobs_finished_at", {"finished_at": "2024-05-01 04:00Z"}),
    ("jobs_waiting_has_image", {"state": "waiting_image"}),
    ("jobs_succeeded_has_image", {"state": "succeeded", "finished_at": "2024-05-01 04:00Z"}),
]


@pytest.mark.parametrize(("constraint", "overrides"), BAD_JOBS)
async def test_bad_job_rows_are_refused(
    pg_pool: asyncpg.Pool, constraint: str, overrides: dict[str, Any]
) -> None:
    """Each CHECK on jobs refuses an insert that breaks it."""
    policy_id = await insert_policy(pg_pool)
    run_id = await _run(pg_pool, policy_id)
    with pytest.raises(asyncpg.CheckViolationError) as caught:
        await _job(pg_pool, policy_id, run_id, **overrides)
    assert caught.value.constraint_name == constraint


async def test_one_run_per_slot_and_one_job_per_instance_slot(pg_pool: asyncpg.Pool) -> None:
    """runs (policy, slot) and jobs (policy, instance, slot) are unique."""
    policy_id = await insert_policy(pg_pool)
    run_id = await _run(pg_pool, policy_id)
    await _job(pg_pool, policy_id, run_id)
    with pytest.raises(asyncpg.UniqueViolationError):
        await _run(pg_pool, policy_id)
    with pytest.raises(asyncpg.UniqueViolationError):
        await _job(pg_pool, policy_id, run_id)


async def test_image_delete_needs_intent_first(pg_pool: asyncpg.Pool) -> None:
    """An image cannot be marked deleted without a recorded intent and reason."""
    policy_id = await insert_policy(pg_pool)
    insert = (
        "INSERT INTO images (image_id, name, account, region, instance_id, policy_id, slot, state,"
        " deleted_at, delete_requested_at, delete_reason)"
        " VALUES ($1, 'n', 'default', 'ap-guangzhou', 'ins-1', $2, now(), 'NORMAL', $3, $4, $5)"
    )
    with pytest.raises(asyncpg.CheckViolationError, match="images_delete_intent_first"):
        await pg_pool.execute(insert, "img-1", policy_id, _now(), None, None)
    with pytest.raises(asyncpg.CheckViolationError, match="images_delete_reason"):
        await pg_pool.execute(insert, "img-2", policy_id, None, _now(), None)
    await pg_pool.execute(insert, "img-3", policy_id, _now(), _now(), "retention: keep_last")


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


async def test_events_are_append_only(pg_pool: asyncpg.Pool) -> None:
    """The ledger takes inserts and refuses UPDATE, DELETE and TRUNCATE."""
    await pg_pool.execute(
        "INSERT INTO events (kind, image_id, reason, details) VALUES ($1, $2, $3, $4)",
        "retention.delete",
        "img-x",
        "older than max_age_days",
        {"age_days": 401},
    )
    row = await pg_pool.fetchrow("SELECT reason, details FROM events WHERE image_id = 'img-x'")
    assert row is not None
    assert row["details"] == {"age_days": 401}
    for statement in ("UPDATE events SET reason = 'x'", "DELETE FROM events", "TRUNCATE events"):
        with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
            await pg_pool.execute(statement)
    with pytest.raises(asyncpg.CheckViolationError, match="events_kind_format"):
        await pg_pool.execute("INSERT INTO events (kind) VALUES ('NoDots')")


async def test_policy_change_notifies_listeners(pg_pool: asyncpg.Pool) -> None:
    """Insert, update and delete of a policy each NOTIFY cvm_backup_policy_changed."""
    heard: asyncio.Queue[str] = asyncio.Queue()

    def on_notify(*args: Any) -> None:
        heard.put_nowait(args[3])

    async with pg_pool.acquire() as listener:
        await listener.add_listener("cvm_backup_policy_changed", on_notify)
        try:
            policy_id = await insert_policy(pg_pool)
            await pg_pool.execute("UPDATE policies SET enabled = false WHERE id = $1", policy_id)
            await pg_pool.execute("DELETE FROM policies WHERE id = $1", policy_id)
            payloads = [await asyncio.wait_for(heard.get(), timeout=5) for _ in range(3)]
        finally:
            await listener.remove_listener("cvm_backup_policy_changed", on_notify)
    assert payloads == [str(policy_id)] * 3


async def test_updated_at_moves_on_update(pg_pool: asyncpg.Pool) -> None:
    """The touch trigger refreshes updated_at (a new transaction has a later now())."""
    policy_id = await insert_policy(pg_pool)
    before = await pg_pool.fetchval("SELECT updated_at FROM policies WHERE id = $1", policy_id)
    await pg_pool.execute("UPDATE policies SET keep_last = 8 WHERE id = $1", policy_id)
    after = await pg_pool.fetchval("SELECT updated_at FROM policies WHERE id = $1", policy_id)
    assert after > before
