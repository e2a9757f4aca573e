"""The migrator: ordered, idempotent, serialised, refusing newer schemas and changed files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import asyncpg
import pytest
import structlog

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
        await migrate._bootstrap(conn)
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate._apply(conn, broken)
        assert await conn.fetchval("SELECT to_regclass('half')") is None
        assert await _versions(conn) == []
    finally:
        await conn.close()


# Checksums: each applied file's sha256 is recorded, and a changed file stops everything.

SYNTHETIC = {
    "0001_first.sql": "CREATE TABLE first_t (x int);\n",
    "0002_second.sql": "CREATE TABLE second_t (y int);\n",
}


def _files(directory: Path, files: dict[str, str]) -> tuple[migrate.Migration, ...]:
    for name, sql in files.items():
        (directory / name).write_bytes(sql.encode("utf-8"))
    return migrate.load(directory)


async def _checksums(conn: asyncpg.Connection) -> dict[int, str | None]:
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations ORDER BY version")
    return {r["version"]: r["checksum"] for r in rows}


def test_checksum_is_sha256_of_the_file_bytes(tmp_path: Path) -> None:
    """The checksum hashes the bytes on disk, CRLF line endings included."""
    (tmp_path / "0001_crlf.sql").write_bytes(b"SELECT 1;\r\nSELECT 2;\r\n")
    (tmp_path / "README").write_bytes(b"not a migration")
    (loaded,) = migrate.load(tmp_path)
    assert loaded.checksum == hashlib.sha256(b"SELECT 1;\r\nSELECT 2;\r\n").hexdigest()
    assert loaded.sql == "SELECT 1;\r\nSELECT 2;\r\n"


async def test_shipped_checksums_recorded(pg_empty_dsn: str) -> None:
    """Migrating records, per version, the sha256 of the shipped file's bytes."""
    conn = await pool.connect_dsn(pg_empty_dsn)
    try:
        await migrate.migrate(conn)
        recorded = await _checksums(conn)
    finally:
        await conn.close()
    package = resources.files("orchestrator") / "migrations"
    expected = {
        int(entry.name[:4]): hashlib.sha256(entry.read_bytes()).hexdigest()
        for entry in package.iterdir()
        if entry.name.endswith(".sql") and entry.name[:4].isdigit()
    }
    assert recorded == expected


async def test_changed_file_refused_before_anything_runs(pg_empty_dsn: str, tmp_path: Path) -> None:
    """An applied file edited afterwards: migrate and ensure_current refuse, naming it."""
    conn = await pool.connect_dsn(pg_empty_dsn)
    try:
        await migrate.migrate(conn, _files(tmp_path, SYNTHETIC))
        edited = {
            **SYNTHETIC,
            "0002_second.sql": SYNTHETIC["0002_second.sql"] + "-- a harmless comment\n",
            "0003_third.sql": "CREATE TABLE third_t (z int);\n",
        }
        shipped = _files(tmp_path, edited)
        with pytest.raises(migrate.SchemaError) as info:
            await migrate.migrate(conn, shipped)
        message = str(info.value)
        assert "0002_second.sql" in message
        assert "0001_first" not in message
        assert "WHERE version IN (2)" in message
        assert info.value.exit_code == 2
        # Nothing pending ran, and the advisory lock was released.
        assert await conn.fetchval("SELECT to_regclass('third_t')") is None
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", migrate.LOCK_KEY)
        await conn.execute("SELECT pg_advisory_unlock($1)", migrate.LOCK_KEY)
        with pytest.raises(migrate.SchemaError, match=r"not current: .*0002_second\.sql"):
            await migrate.ensure_current(conn, shipped)
        status = await migrate.schema_status(conn, shipped)
        assert [m.label for m in status.changed] == ["0002_second"]
        assert not status.current
    finally:
        await conn.close()


async def test_cleared_checksum_accepts_the_file_as_it_is(
    pg_empty_dsn: str, tmp_path: Path
) -> None:
    """The documented way out: NULL the checksum, and migrate records the edited file."""
    conn = await pool.connect_dsn(pg_empty_dsn)
    try:
        await migrate.migrate(conn, _files(tmp_path, SYNTHETIC))
        shipped = _files(tmp_path, {"0002_second.sql": "CREATE TABLE second_t (y int); -- ok\n"})
        await conn.execute("UPDATE schema_migrations SET checksum = NULL WHERE version IN (2)")
        assert await migrate.migrate(conn, shipped) == ()
        await migrate.ensure_current(conn, shipped)
        assert (await _checksums(conn))[2] == shipped[1].checksum
    finally:
        await conn.close()


async def test_install_from_before_checksums_is_backfilled(pg_dsn: str) -> None:
    """Rows without the column: status reads them, run refuses, migrate records every checksum."""
    conn = await pool.connect_dsn(pg_dsn)
    try:
        await conn.execute("ALTER TABLE schema_migrations DROP COLUMN checksum")
        status = await migrate.schema_status(conn)
        assert not status.pending
        assert status.unrecorded == status.available
        with pytest.raises(migrate.SchemaError, match=r"no checksum recorded .*cvm-backup migrate"):
            await migrate.ensure_current(conn)
        with structlog.testing.capture_logs() as logged:
            assert await migrate.migrate(conn) == ()
        recorded = await _checksums(conn)
        assert recorded == {m.version: m.checksum for m in migrate.available()}
        await migrate.ensure_current(conn)
        events = [e for e in logged if e["event"] == "migrate.checksums_recorded"]
        assert events[0]["migrations"] == [m.label for m in migrate.available()]
        # A cvm-backup from before checksums still inserts its rows (the column is nullable).
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (9998, 'old')")
    finally:
        await conn.close()


def _cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CVM_BACKUP_DATABASE_URL": dsn,
        # `check` resolves credentials: nothing outside loopback may be asked.
        "CVM_BACKUP_METADATA_URL": "http://127.0.0.1:1/latest/meta-data/",
        "TENCENTCLOUD_SECRET_ID": "AKIDmigratetest0000",
        "TENCENTCLOUD_SECRET_KEY": "migrate-test-key",
    }
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_commands_refuse_a_changed_migration(pg_dsn: str) -> None:
    """`migrate`, `run --once` and `status` exit 2 naming the file; `check` reports it (exit 1)."""
    run_sql(pg_dsn, "UPDATE schema_migrations SET checksum = repeat('0', 64) WHERE version = 1")
    for args in (["migrate"], ["run", "--once"], ["status"]):
        done = _cli(pg_dsn, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert "0001_init.sql" in done.stderr
        assert "Traceback" not in done.stderr
    check = _cli(pg_dsn, "check")
    assert check.returncode == 1, check.stdout
    assert "schema: FAIL: migration file(s) changed" in check.stdout
    # Nothing ran: the tampered row is still the only difference.
    rows = run_sql(pg_dsn, "SELECT checksum FROM schema_migrations WHERE version = 1")
    assert rows[0]["checksum"] == "0" * 64
