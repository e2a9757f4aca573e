"""Pooled connections skip asyncpg's reset round trip, except when they kept session state."""

from __future__ import annotations

import asyncpg

from orchestrator.db import pool as db_pool


async def _commits(pool: asyncpg.Pool) -> int:
    # pg_stat_xact_* counts the current transaction's own view; the database total is what moves.
    await pool.execute("SELECT pg_stat_clear_snapshot()")
    value = await pool.fetchval(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    )
    return int(value)


async def test_a_flagged_advisory_lock_is_released_with_the_connection(pg_dsn: str) -> None:
    """A session lock flagged as session state does not outlive the checkout."""
    pool = await db_pool.create_pool_dsn(pg_dsn, max_size=1)
    try:
        async with pool.acquire() as conn:
            db_pool.keeps_session_state(conn)
            await conn.execute("SELECT pg_advisory_lock(4242)")
        async with pool.acquire() as conn:
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
            )
        assert held == 0
    finally:
        await pool.close()


async def test_a_clean_connection_goes_back_without_a_reset(pg_dsn: str) -> None:
    """Plain statements leave no session state: their release costs no extra statement."""
    pool = await db_pool.create_pool_dsn(pg_dsn, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("SET application_name = 'cvm-backup-reset-test'")
        async with pool.acquire() as conn:
            # No RESET ALL ran in between: the setting is still there.
            assert await conn.fetchval("SHOW application_name") == "cvm-backup-reset-test"
    finally:
        await pool.close()
