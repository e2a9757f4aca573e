"""The migrator: ordered, idempotent, serialised, and refusing newer schemas."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import pytest

from orchestrator.db import migrate, pool
from tests.fixtures.pg import run_sql


async def _versions(conn: asyncpg.Connection) -> list[tuple[int, str]]:
    rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    return [(r["version"], r["name"]) for r in rows]


def test_shipped_migrations_are_numbered_from_one() -> None:
    """The package ships 0001_init first, versions strictly increasing."""
    shipped = migrate.available()
    assert shipped[0].label == "0001_init"
    assert [m.version for m in shipped] == sorted({m.version for m in shipped})


async def test_migrate_applies_everything_then_is_a_no_op(pg_empty_dsn: str) -> None:
    """A second migrate applies nothing and leaves the version rows as they were."""
    conn = await pool.connect_dsn(pg_empty_dsn)
    try:
        first = await migrate.migrate(conn)
        rows = await _versions(conn)
        second = await migrate.migrate(conn)
        assert [m.version for m in first] == [m.version for m in migrate.available()]
        assert second == ()
        assert await _versions(conn) == rows
        assert (await migrate.schema_status(conn)).current
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_once(pg_empty_dsn: str) -> None:
    """Two connections migrating at once: one applies, the other waits and finds nothing."""
    conns = [await pool.connect_dsn(pg_empty_dsn) for _ in range(2)]
    try:
        results = await asyncio.gather(*(migrate.migrate(c) for c in conns))
        assert sorted(len(r) for r in results) == [0, len(migrate.available())]
        assert len(await _versions(conns[0])) == len(migrate.available())
    finally:
        for conn in conns:
            await conn.close()


def test_concurrent_migrate_processes_apply_once(pg_empty_dsn: str) -> None:
    """Two `cvm-backup migrate` processes at once leave one applied copy and both exit 0."""
    env = {**os.environ, "CVM_BACKUP_DATABASE_URL": pg_empty_dsn}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    applied = [out for out, _ in outputs if "applied 0001_init" in out]
    assert len(applied) == 1
    rows = run_sql(pg_empty_dsn, "SELECT version FROM schema_migrations")
    assert len(rows) == len(migrate.available())


async def test_schema_status_reports_pending_on_empty_database(pg_empty_dsn: str) -> None:
    """An unmigrated database is not current and the daemon check refuses it."""
    conn = await pool.connect_dsn(pg_empty_dsn)
    try:
        status = await migrate.schema_status(conn)
        assert not status.current
        assert status.pending[0].label == "0001_init"
        with pytest.raises(migrate.SchemaError, match="cvm-backup migrate"):
            await migrate.ensure_current(conn)
    finally:
        await conn.close()


async def test_newer_database_is_refused(pg_pool: asyncpg.Pool[asyncpg.Record]) -> None:
    """A schema version the code does not ship blocks migrate and the daemon's check."""
    async with pg_pool.acquire() as conn:
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'future')")
        with pytest.raises(migrate.SchemaError, match=r"9999.*upgrade cvm-backup"):
            await migrate.migrate(conn)
        with pytest.raises(migrate.SchemaError, match="not current"):
            await migrate.ensure_current(conn)
        # The refusal released the advisory lock: another session can take it at once.
        async with pg_pool.acquire() as other:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1)", migrate.LOCK_KEY)
            await other.execute("SELECT pg_advisory_unlock($1)", migrate.LOCK_KEY)


async def test_failed_migration_rolls_back_with_its_version_row(pg_empty_dsn: str) -> None:
    """A file that fails half-way leaves neither its tables nor its version row."""
    conn = await pool.connect_dsn(pg_empty_dsn)
    broken = migrate.Migration(1, "broken", "CREATE TABLE half (x int); SELECT 1/0;")
    try:
        await conn.execute(migrate._CREATE_TABLE)
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate._apply(conn, broken)
        assert await conn.fetchval("SELECT to_regclass('half')") is None
        assert await _versions(conn) == []
    finally:
        await conn.close()
