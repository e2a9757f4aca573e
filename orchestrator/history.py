"""History pruning: what is older than `history_days` and no longer needed goes, in small batches.

Every job, ledger row and image row used to stay forever: at 3,000 instances backed up daily,
a year is 1.1 M jobs and about 26 M ledger rows. A pass prunes, in this order:

1. images rows whose deletion was confirmed (`deleted_at`) before the cutoff;
2. finished jobs (a terminal state, `finished_at` before the cutoff) that no images row
   references: the job of an image that still exists stays with it, however old;
3. ledger rows (`events`) from before the cutoff, except a kept job's own `job.*` rows (its
   attempts and outcome stay with it);
4. completed runs from before the cutoff with no job left.

Retention reads only live images rows and their policies (orchestrator.rotation), and quota
rotation only those and live jobs, so a pruned history never changes what they decide. The
scheduler only ever asks for a slot within its completion window (at most 31 days), and the
cutoff is always older than that (`history_days` >= 32), so a pruned run is never made again.

Each batch is one short transaction of at most `BATCH_ROWS` rows, with a pause between batches,
so the daemon's own statements never wait long behind it. Only a replica that holds an account
lease prunes (a standby does nothing), and a transaction-level advisory lock lets only one of
them prune at a time. Deleting from the ledger needs `cvm_backup.prune_history` set in the
transaction, and Postgres refuses it for rows younger than 32 days (migration 0008).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from orchestrator import logs
from orchestrator.context import EngineContext
from orchestrator.db.resilience import DbWatch
from orchestrator.jobs import TERMINAL_STATES

log = logs.get("history")

BATCH_ROWS = 1000
# Between batches: lets autovacuum and the daemon's own writes in, and spreads a backlog's I/O.
BATCH_PAUSE = 0.2
# Seconds between passes; a replica that gains its first lease prunes at its next tick.
INTERVAL = 3600.0
TICK = 5.0
# Two-key advisory lock ("CVBH"), apart from the account leases' and rotation's namespaces.
LOCK_NAMESPACE = 0x43564248
LOCK_KEY = "cvm-backup:history"
# Migration 0008's trigger lets a DELETE on events through only with this set in the transaction.
PRUNE_SETTING = "cvm_backup.prune_history"

Conn = Any  # an asyncpg connection (pool proxies included)

_IMAGES = """
WITH doomed AS (
    SELECT image_id FROM images WHERE deleted_at < $1
    ORDER BY deleted_at LIMIT $2 FOR UPDATE SKIP LOCKED
)
DELETE FROM images i USING doomed d WHERE i.image_id = d.image_id
"""

# The deadline test is implied by the cutoff (history_days > the longest window); it is here
# so that no setting can ever prune a job whose slot could still be scheduled.
_JOBS = """
WITH doomed AS (
    SELECT j.id FROM jobs j
    WHERE j.finished_at < $1 AND j.state = ANY($3::text[]) AND j.deadline < now()
      AND NOT EXISTS (SELECT 1 FROM images i WHERE i.job_id = j.id)
    ORDER BY j.finished_at LIMIT $2 FOR UPDATE OF j SKIP LOCKED
)
DELETE FROM jobs j USING doomed d WHERE j.id = d.id
"""

# The ledger has no index on `at` (one would cost every insert); ids grow with time, so a walk
# along the primary key from `$3` finds the old rows first. It ends at a batch with no old row
# at all, so a few rows written while a clock was ahead do not end it early.
_EVENTS = """
WITH scanned AS (
    SELECT id, at, kind, job_id FROM events WHERE id > $3 ORDER BY id LIMIT $2
), doomed AS (
    DELETE FROM events e USING scanned s
    WHERE e.id = s.id AND s.at < $1
      AND NOT (s.kind LIKE 'job.%' AND s.job_id IS NOT NULL
               AND EXISTS (SELECT 1 FROM jobs j WHERE j.id = s.job_id))
    RETURNING 1
)
SELECT (SELECT count(*) FROM doomed) AS deleted, count(*) AS scanned, max(id) AS last,
       NOT coalesce(bool_or(at < $1), false) AS reached
FROM scanned
"""

_RUNS = """
WITH doomed AS (
    SELECT r.id FROM runs r
    WHERE r.state = 'completed' AND r.completed_at < $1
      AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.run_id = r.id)
    ORDER BY r.completed_at LIMIT $2 FOR UPDATE SKIP LOCKED
)
DELETE FROM runs r USING doomed d WHERE r.id = d.id
"""

_LEDGER = """
INSERT INTO events (kind, reason, details) VALUES ('history.pruned', $1, $2)
"""

TABLES = ("images", "jobs", "events", "runs")


@dataclass
class PruneResult:
    """What one pass removed per table, in how many batches, and what stopped it early."""

    cutoff: datetime | None = None
    deleted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    batches: int = 0
    batch_seconds: list[float] = field(default_factory=list)  # each batch's transaction
    busy: bool = False  # another replica was pruning: this pass stopped
    blocked: dict[str, str] = field(default_factory=dict)  # table -> what refused its deletes

    @property
    def total(self) -> int:
        """Rows removed in all."""
        return sum(self.deleted.values())


@dataclass
class _Cursor:
    """Where one table's batches are: done, and (for the ledger) the last id looked at."""

    done: bool = False
    after: int = 0


async def _images(conn: Conn, cutoff: datetime, limit: int, cursor: _Cursor) -> int:
    return _count(await conn.execute(_IMAGES, cutoff, limit), limit, cursor)


async def _jobs(conn: Conn, cutoff: datetime, limit: int, cursor: _Cursor) -> int:
    return _count(await conn.execute(_JOBS, cutoff, limit, list(TERMINAL_STATES)), limit, cursor)


async def _runs(conn: Conn, cutoff: datetime, limit: int, cursor: _Cursor) -> int:
    return _count(await conn.execute(_RUNS, cutoff, limit), limit, cursor)


async def _events(conn: Conn, cutoff: datetime, limit: int, cursor: _Cursor) -> int:
    row = await conn.fetchrow(_EVENTS, cutoff, limit, cursor.after)
    cursor.done = row["scanned"] < limit or row["reached"]
    cursor.after = row["last"] or cursor.after
    return int(row["deleted"])


def _count(status: str, limit: int, cursor: _Cursor) -> int:
    # A short batch means nothing more is due (or the rest is locked: next pass).
    deleted = int(status.rsplit(maxsplit=1)[-1])
    cursor.done = deleted < limit
    return deleted


Step = Callable[[Conn, datetime, int, _Cursor], Awaitable[int]]
_STEPS: dict[str, Step] = {"images": _images, "jobs": _jobs, "events": _events, "runs": _runs}


async def prune(
    pool: asyncpg.Pool,
    history_days: int,
    *,
    batch: int = BATCH_ROWS,
    pause: float = BATCH_PAUSE,
    stop: asyncio.Event | None = None,
) -> PruneResult:
    """One pass over every table, oldest rows first, `batch` rows per transaction."""
    result = PruneResult()
    result.cutoff = await pool.fetchval("SELECT now() - make_interval(days => $1)", history_days)
    for table in _STEPS:
        cursor = _Cursor()
        while not cursor.done and not result.busy and not (stop and stop.is_set()):
            await _batch(pool, table, result, cursor, limit=batch)
            if not cursor.done:
                await _pause(pause, stop)
        if result.busy:
            break
    if result.total:
        await pool.execute(_LEDGER, f"older than {history_days} days", _details(result))
    return result


async def _batch(
    pool: asyncpg.Pool, table: str, result: PruneResult, cursor: _Cursor, *, limit: int
) -> None:
    """One transaction: the lock (else `busy`), then at most `limit` of the table's rows."""
    assert result.cutoff is not None
    step = _STEPS[table]
    started = time.monotonic()
    try:
        async with pool.acquire() as conn, conn.transaction():
            locked = await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock($1, hashtext($2))", LOCK_NAMESPACE, LOCK_KEY
            )
            if not locked:
                result.busy = True
                return
            await conn.execute("SELECT set_config($1, 'on', true)", PRUNE_SETTING)
            result.deleted[table] += await step(conn, result.cutoff, limit, cursor)
        result.batches += 1
        result.batch_seconds.append(time.monotonic() - started)
    except asyncpg.ForeignKeyViolationError as exc:
        # A table cvm-backup does not know refers to these rows: keep them, prune the rest.
        cursor.done = True
        result.blocked[table] = exc.constraint_name or str(exc)
        log.warning(
            "history.prune_blocked",
            table=table,
            constraint=exc.constraint_name,
            referenced_by=exc.table_name,
            hint="the rows it refers to are kept until its own rows go",
        )


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    if seconds <= 0:
        return
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def _details(result: PruneResult) -> dict[str, Any]:
    assert result.cutoff is not None
    return {"cutoff": result.cutoff.isoformat(), "batches": result.batches, **result.deleted}


async def run(
    ctx: EngineContext,
    stop: asyncio.Event,
    driven: Callable[[], Collection[str]],
    *,
    interval: float = INTERVAL,
    tick: float = TICK,
) -> None:
    """Prune every `interval` while this replica drives an account, until `stop`."""
    watch = DbWatch("history", stop)
    loop = asyncio.get_running_loop()
    due = loop.time()
    while not stop.is_set():
        if driven() and loop.time() >= due:
            async with watch:
                await _pass(ctx, stop)
            # A failed pass (the database went away) is tried again after the watch's backoff.
            due = loop.time() + (0.0 if watch.down else interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=min(tick, max(due - loop.time(), 0.01)))


async def _pass(ctx: EngineContext, stop: asyncio.Event) -> None:
    started = time.monotonic()
    days = ctx.settings.history_days
    result = await prune(ctx.pool, days, stop=stop)
    if not result.total:
        return
    assert result.cutoff is not None
    log.info(
        "history.pruned",
        history_days=days,
        cutoff=result.cutoff.isoformat(),
        batches=result.batches,
        seconds=round(time.monotonic() - started, 2),
        busy=result.busy,
        **result.deleted,
    )
