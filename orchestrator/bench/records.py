"""The bench's view of the daemon's tables: policies in, outcomes and their times out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

from orchestrator.bench.simside import REGION
from orchestrator.db import policies as policy_rows
from orchestrator.db.pool import connect_dsn
from orchestrator.policies import CopyTarget, Policy, Retention

TERMINAL = ("succeeded", "failed", "expired", "skipped")
# Long enough that today's 00:00 UTC slot is still open whenever the bench runs.
DUE_WINDOW = timedelta(days=2)


async def add_policy(
    dsn: str,
    name: str,
    *,
    schedule: str,
    window: timedelta,
    tags: Mapping[str, str] | None = None,
    ids: Sequence[str] = (),
    copies: Sequence[str] = (),
) -> None:
    """Store one policy through the same code as `cvm-backup policy apply` (`copies`: the
    destination regions, each keeping 7 copies)."""
    policy = Policy(
        name=name,
        region=REGION,
        schedule=schedule,
        instance_ids=tuple(ids),
        instance_tags=dict(tags or {}),
        completion_window=window,
        # One image per instance per run: retention never has anything to delete here.
        retention=Retention(keep_last=7),
        copies=tuple(CopyTarget(region, Retention(keep_last=7)) for region in copies),
    )
    conn = await connect_dsn(dsn)
    try:
        await policy_rows.apply(conn, [policy])
    finally:
        await conn.close()


async def add_due_policy(
    dsn: str, name: str, *, tags: Mapping[str, str] | None = None, ids: Sequence[str] = ()
) -> None:
    """A daily policy whose latest slot (today, 00:00 UTC) is due at once."""
    await add_policy(dsn, name, schedule="0 0 * * *", window=DUE_WINDOW, tags=tags, ids=ids)


async def tally(pool: asyncpg.Pool) -> dict[str, int]:
    """Jobs per state."""
    rows = await pool.fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")
    return {row["state"]: int(row["n"]) for row in rows}


async def drained(pool: asyncpg.Pool) -> bool:
    """A run exists and every one of its jobs is terminal."""
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM runs) AS runs,"
        " (SELECT count(*) FROM jobs WHERE state <> ALL($1::text[])) AS live",
        list(TERMINAL),
    )
    assert row is not None
    return bool(row["runs"]) and row["live"] == 0


async def run_created(pool: asyncpg.Pool) -> bool:
    """Whether the scheduler has made the run (and, in the same transaction, its jobs)."""
    return bool(await pool.fetchval("SELECT EXISTS (SELECT 1 FROM runs)"))


@dataclass(frozen=True, slots=True)
class Timeline:
    """When the run was created and its last job finished (epoch seconds), and how many jobs."""

    slot: float
    run_created: float
    last_finished: float | None
    jobs: int


async def timeline(pool: asyncpg.Pool) -> Timeline:
    """The single run's timeline (Postgres timestamps, same host clock as the bench)."""
    row = await pool.fetchrow(
        "SELECT extract(epoch FROM r.slot)::float8 AS slot,"
        " extract(epoch FROM r.created_at)::float8 AS created,"
        " (SELECT extract(epoch FROM max(finished_at))::float8 FROM jobs) AS last,"
        " (SELECT count(*) FROM jobs) AS jobs"
        " FROM runs r ORDER BY r.id LIMIT 1"
    )
    assert row is not None, "no run was created"
    return Timeline(row["slot"], row["created"], row["last"], int(row["jobs"]))


async def poll(check: Callable[[], Awaitable[bool]], within: float, interval: float = 0.1) -> bool:
    """Call `check` until it holds or `within` seconds pass; whether it held."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if await check():
            return True
        await asyncio.sleep(interval)
    return False


async def write_counts(pool: asyncpg.Pool) -> dict[str, Any]:
    """Commits and row writes in this database so far, per table (Postgres' own statistics).

    Backends report at transaction end, so read after the daemon has exited.
    """
    commits = await pool.fetchval(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    )
    rows = await pool.fetch(
        "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
        " WHERE n_tup_ins + n_tup_upd > 0 ORDER BY relname"
    )
    tables = {
        row["relname"]: {
            "inserted": row["n_tup_ins"],
            "updated": row["n_tup_upd"],
            "hot_updated": row["n_tup_hot_upd"],
        }
        for row in rows
    }
    return {"commits": int(commits or 0), "tables": tables}
