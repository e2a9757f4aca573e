"""History pruning: old finished rows go in batches; living images, retention and leases hold."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from orchestrator import accounts, config, history, rotation, sweep
from orchestrator.bench.history_data import ACCOUNT, REGION, generate, shape
from orchestrator.context import EngineContext
from orchestrator.daemon import Engine, Signals
from orchestrator.db import pool as db_pool
from orchestrator.errors import UsageError
from tests.fixtures.logs import LogCapture
from tests.fixtures.polling import wait_for

# Four instances backed up daily for 100 days; pruning keeps 40 of them. Over 100 days the
# monthly and weekly rules always keep an image 41 days old or older (checked for every day of
# two years): a living image older than the cutoff.
INSTANCES, DAYS, KEEP_DAYS = 4, 100, 40


@pytest.fixture
async def year(pg_pool: asyncpg.Pool) -> dict[str, int]:
    """The bench's daily history, small: runs, jobs, images (live and deleted), ledger rows."""
    async with pg_pool.acquire() as conn:
        made = await generate(conn, shape(INSTANCES, DAYS), history=True)
    return dict(made["rows"])


async def _cutoff(pool: asyncpg.Pool, days: int = KEEP_DAYS) -> datetime:
    value = await pool.fetchval("SELECT now() - make_interval(days => $1)", days)
    assert isinstance(value, datetime)
    return value


async def _count(pool: asyncpg.Pool, query: str, *args: Any) -> int:
    return int(await pool.fetchval(query, *args))


async def _decisions(pool: asyncpg.Pool) -> dict[tuple[int, str], list[tuple[str, bool]]]:
    rows = await pool.fetch(rotation.REGION_IMAGES, ACCOUNT, REGION)
    found = {}
    for group in rotation.per_instance(rows):
        images = [rotation.LiveImage.from_record(r) for r in group]
        decided = rotation.decide_or_skip(group[0], images) or []
        key = (group[0]["policy_id"], group[0]["instance_id"])
        found[key] = sorted((d.image_id, d.keep) for d in decided)
    return found


async def test_pruning_deletes_only_old_finished_rows_in_batches(
    pg_pool: asyncpg.Pool, year: dict[str, int]
) -> None:
    """Old terminal jobs, deleted images' rows, old ledger rows and empty runs go, 7 at a time."""
    cutoff = await _cutoff(pg_pool)
    live_images = await _count(pg_pool, "SELECT count(*) FROM images WHERE deleted_at IS NULL")
    live_jobs = await _count(pg_pool, "SELECT count(*) FROM jobs WHERE finished_at IS NULL")
    recent_events = await _count(pg_pool, "SELECT count(*) FROM events WHERE at >= $1", cutoff)
    result = await history.prune(pg_pool, KEEP_DAYS, batch=7, pause=0)

    assert all(result.deleted[table] > 0 for table in history.TABLES), result.deleted
    assert result.batches >= sum(math.ceil(n / 7) for n in result.deleted.values())
    assert not result.busy
    assert not result.blocked
    # What retention and the dispatcher read is all there.
    assert await _count(pg_pool, "SELECT count(*) FROM images WHERE deleted_at IS NULL") == (
        live_images
    )
    assert await _count(pg_pool, "SELECT count(*) FROM jobs WHERE finished_at IS NULL") == live_jobs
    # ... and one ledger row more: the pass itself.
    assert await _count(pg_pool, "SELECT count(*) FROM events WHERE at >= $1", cutoff) == (
        recent_events + 1
    )
    # Nothing older than the cutoff is left but what living images hold on to.
    assert not await _count(pg_pool, "SELECT count(*) FROM images WHERE deleted_at < $1", cutoff)
    assert not await _count(
        pg_pool,
        "SELECT count(*) FROM jobs j WHERE j.finished_at < $1"
        " AND NOT EXISTS (SELECT 1 FROM images i WHERE i.job_id = j.id)",
        cutoff,
    )
    assert not await _count(
        pg_pool,
        "SELECT count(*) FROM events e WHERE e.at < $1 AND NOT (e.kind LIKE 'job.%'"
        " AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = e.job_id))",
        cutoff,
    )
    assert not await _count(
        pg_pool,
        "SELECT count(*) FROM runs r WHERE r.completed_at < $1"
        " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.run_id = r.id)",
        cutoff,
    )
    ledger = await pg_pool.fetchrow("SELECT * FROM events WHERE kind = 'history.pruned'")
    assert ledger is not None
    assert ledger["details"]["jobs"] == result.deleted["jobs"]


async def test_an_old_job_stays_while_its_image_lives(
    pg_pool: asyncpg.Pool, year: dict[str, int]
) -> None:
    """A living image older than the cutoff keeps its row, its job and the job's own rows."""
    cutoff = await _cutoff(pg_pool)
    old = await pg_pool.fetchrow(
        "SELECT image_id, job_id FROM images WHERE deleted_at IS NULL AND created_at < $1"
        " ORDER BY created_at LIMIT 1",
        cutoff,
    )
    assert old is not None, "the monthly rule keeps an image older than the cutoff"
    job_rows = await _count(
        pg_pool, "SELECT count(*) FROM events WHERE job_id = $1 AND kind LIKE 'job.%'", old[1]
    )
    await history.prune(pg_pool, KEEP_DAYS, pause=0)
    assert await _count(pg_pool, "SELECT count(*) FROM images WHERE image_id = $1", old[0]) == 1
    assert await _count(pg_pool, "SELECT count(*) FROM jobs WHERE id = $1", old[1]) == 1
    assert (
        await _count(
            pg_pool, "SELECT count(*) FROM events WHERE job_id = $1 AND kind LIKE 'job.%'", old[1]
        )
        == job_rows
        > 0
    )
    # Its run stays with it; the runs around it whose jobs all went do not.
    assert (
        await _count(
            pg_pool,
            "SELECT count(*) FROM runs r JOIN jobs j ON j.run_id = r.id WHERE j.id = $1",
            old[1],
        )
        == 1
    )


async def test_retention_decides_the_same_before_and_after_pruning(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, year: dict[str, int]
) -> None:
    """Every live pair's keep/delete decisions, and a sweep's result, do not change."""
    before = await _decisions(pg_pool)
    swept_before = await sweep.sweep(engine_ctx, {ACCOUNT})
    result = await history.prune(pg_pool, KEEP_DAYS, pause=0)
    assert result.total > 0
    assert await _decisions(pg_pool) == before
    swept_after = await sweep.sweep(engine_ctx, {ACCOUNT})
    assert (swept_after.pairs, swept_after.deleted) == (swept_before.pairs, swept_before.deleted)
    assert swept_after.pairs == INSTANCES
    assert swept_after.deleted == []


async def test_the_ledger_refuses_recent_or_unsanctioned_deletes(
    pg_pool: asyncpg.Pool, year: dict[str, int]
) -> None:
    """Without the pruner's setting nothing goes; with it, nothing younger than 32 days does."""
    async with pg_pool.acquire() as conn:
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute("DELETE FROM events WHERE at < now() - interval '50 days'")
        async with conn.transaction():
            await conn.execute("SELECT set_config($1, 'on', true)", history.PRUNE_SETTING)
            with pytest.raises(asyncpg.RestrictViolationError):
                await conn.execute("DELETE FROM events WHERE at > now() - interval '31 days'")
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute("UPDATE events SET reason = 'x'")
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute("TRUNCATE events")
    assert await _count(pg_pool, "SELECT count(*) FROM events") == year["events"]


async def test_a_replica_without_a_lease_never_prunes(
    engine_ctx: EngineContext, pg_dsn: str, pg_pool: asyncpg.Pool, year: dict[str, int]
) -> None:
    """While another session holds the account's lease nothing goes; once it is ours, it does."""
    other = await db_pool.connect_dsn(pg_dsn)
    try:
        key = accounts.lock_key(ACCOUNT)
        assert await other.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2))", accounts.LOCK_NAMESPACE, key
        )
        leases = accounts.AccountLeases([ACCOUNT], lambda: db_pool.connect_dsn(pg_dsn))
        await leases.try_once()
        assert leases.held() == frozenset()
        looked = 0

        def driven() -> frozenset[str]:
            nonlocal looked
            looked += 1
            return leases.held()

        ctx = replace(engine_ctx, settings=replace(engine_ctx.settings, history_days=KEEP_DAYS))
        stop = asyncio.Event()
        task = asyncio.create_task(history.run(ctx, stop, driven, tick=0.02))

        async def looked_thrice() -> bool:
            return looked >= 3

        await wait_for(looked_thrice, within=10)
        assert await _count(pg_pool, "SELECT count(*) FROM jobs") == year["jobs"]
        await other.execute(
            "SELECT pg_advisory_unlock($1, hashtext($2))", accounts.LOCK_NAMESPACE, key
        )
        await leases.try_once()
        assert leases.held() == {ACCOUNT}

        async def pruned() -> bool:
            return await _count(pg_pool, "SELECT count(*) FROM jobs") < year["jobs"]

        await wait_for(pruned, within=20)
        stop.set()
        await asyncio.wait_for(task, 10)
        await leases.close()
    finally:
        await other.close()


async def test_only_one_replica_prunes_at_a_time(
    pg_pool: asyncpg.Pool, year: dict[str, int]
) -> None:
    """While another session holds the history lock a pass stops at once, deleting nothing."""
    async with pg_pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))",
            history.LOCK_NAMESPACE,
            history.LOCK_KEY,
        )
        result = await history.prune(pg_pool, KEEP_DAYS, pause=0)
        assert result.busy
        assert result.total == 0
    assert (await history.prune(pg_pool, KEEP_DAYS, pause=0)).total > 0


async def test_a_foreign_reference_keeps_its_rows_and_the_rest_is_pruned(
    pg_pool: asyncpg.Pool, year: dict[str, int], captured_logs: LogCapture
) -> None:
    """A table cvm-backup does not know pins a run: history.prune_blocked, the rest still goes."""
    cutoff = await _cutoff(pg_pool)
    oldest = await pg_pool.fetchval("SELECT min(id) FROM runs WHERE completed_at < $1", cutoff)
    await pg_pool.execute("CREATE TABLE outside (run_id bigint REFERENCES runs (id))")
    await pg_pool.execute("INSERT INTO outside VALUES ($1)", oldest)
    result = await history.prune(pg_pool, KEEP_DAYS, pause=0)
    assert "runs" in result.blocked
    assert result.deleted["jobs"] > 0
    assert result.deleted["events"] > 0
    assert await _count(pg_pool, "SELECT count(*) FROM runs WHERE id = $1", oldest) == 1
    blocked = [line for line in captured_logs.lines if line["event"] == "history.prune_blocked"]
    assert blocked
    assert blocked[0]["table"] == "runs"


async def _old_finished_run(pool: asyncpg.Pool) -> int:
    """A disabled policy's run of 500 days ago: one succeeded job, its image long deleted."""
    policy = await pool.fetchval(
        "INSERT INTO policies (name, region, schedule, instance_ids, keep_last, enabled)"
        " VALUES ('gone', $1, '0 0 * * *', '{ins-old1}', 7, false) RETURNING id",
        REGION,
    )
    slot = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    slot -= timedelta(days=500)
    run = await pool.fetchval(
        "INSERT INTO runs (policy_id, slot, state, created_at, completed_at)"
        " VALUES ($1, $2::timestamptz, 'completed', $2, $2 + interval '1 hour') RETURNING id",
        policy,
        slot,
    )
    job = await pool.fetchval(
        "INSERT INTO jobs (run_id, policy_id, account, region, instance_id, slot, image_name,"
        " state, deadline, image_id, created_at, finished_at)"
        " VALUES ($1, $2, $3, $4, 'ins-old1', $5::timestamptz, 'cvmbk-gone-ins-old1-x',"
        " 'succeeded', $5 + interval '6 hours', 'img-old1', $5, $5 + interval '10 minutes')"
        " RETURNING id",
        run,
        policy,
        ACCOUNT,
        REGION,
        slot,
    )
    await pool.execute(
        "INSERT INTO images (image_id, name, account, region, instance_id, policy_id, slot,"
        " job_id, state, created_at, delete_requested_at, delete_reason, deleted_at)"
        " VALUES ('img-old1', 'cvmbk-gone-ins-old1-x', $1, $2, 'ins-old1', $3, $4::timestamptz, $5,"
        " 'NORMAL',"
        " $4, $4 + interval '9 days', 'not selected by any rule', $4 + interval '9 days')",
        ACCOUNT,
        REGION,
        policy,
        slot,
        job,
    )
    await pool.execute(
        "INSERT INTO events (at, kind, job_id, image_id)"
        " VALUES ($1, 'job.attempt', $2, 'img-old1')",
        slot,
        job,
    )
    return int(run)


async def test_the_daemon_prunes_old_history_while_it_runs(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, captured_logs: LogCapture
) -> None:
    """A running daemon prunes what is older than history_days by itself and says so."""
    run = await _old_finished_run(pg_pool)
    engine = Engine(engine_ctx, Signals())
    running = asyncio.create_task(engine.run())

    async def gone() -> bool:
        return not await _count(pg_pool, "SELECT count(*) FROM runs WHERE id = $1", run)

    await wait_for(gone, within=20)
    engine.signals.stop.set()
    assert await asyncio.wait_for(running, 20) == 0
    for table in ("jobs", "images"):
        assert not await _count(pg_pool, f"SELECT count(*) FROM {table}")
    assert not await _count(pg_pool, "SELECT count(*) FROM events WHERE kind = 'job.attempt'")
    pruned = [line for line in captured_logs.lines if line["event"] == "history.pruned"]
    assert pruned
    assert (pruned[0]["jobs"], pruned[0]["images"], pruned[0]["runs"]) == (1, 1, 1)
    assert pruned[0]["history_days"] == 400


@pytest.mark.parametrize("value", ["31", "36501", "400.5", "true"])
def test_history_days_out_of_bounds_is_refused(tmp_path: Path, value: str) -> None:
    """history_days must be an integer from 32 to 36500: the file, key and bound are named."""
    path = tmp_path / "cvm-backup.toml"
    path.write_text(f"history_days = {value}\n", encoding="utf-8")
    with pytest.raises(UsageError) as caught:
        config.load({"CVM_BACKUP_CONFIG": str(path)})
    message = str(caught.value)
    assert str(path) in message
    assert "history_days" in message
    assert "32 to 36500" in message or "integer" in message


def test_history_days_defaults_to_400_and_reads_the_file(tmp_path: Path) -> None:
    """Unset it is 400; a value in range from the config file is taken."""
    assert config.load({}).history_days == 400
    path = tmp_path / "cvm-backup.toml"
    path.write_text("history_days = 90\n", encoding="utf-8")
    assert config.load({"CVM_BACKUP_CONFIG": str(path)}).history_days == 90
