"""The benchmark's Postgres: a fresh embedded server in a temporary directory, or a given one.

Every scenario gets its own freshly migrated database, so one scenario's rows never slow down
or satisfy the next. With CVM_BACKUP_DATABASE_URL the databases are created on that server
(the user needs CREATEDB) and dropped afterwards; the database named in the URL is not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from orchestrator.db import embedded, migrate, pool
from orchestrator.db.dsn import redact, with_database

# Settings that decide how much each commit costs; reported next to the figures.
_REPORTED = ("fsync", "synchronous_commit", "shared_buffers", "max_connections", "server_version")


@dataclass(slots=True)
class BenchDatabase:
    """A Postgres server the bench may create databases on."""

    admin_dsn: str
    kind: str  # "embedded" or "external"
    data_dir: Path | None = None  # the embedded server's, whose processes we can see

    def cpu_seconds(self) -> float | None:
        """CPU the embedded server has used so far (all its processes); None if not ours."""
        pid_file = None if self.data_dir is None else self.data_dir / "postmaster.pid"
        if pid_file is None or not pid_file.exists():
            return None
        return _tree_cpu(int(pid_file.read_text().split()[0]))

    @asynccontextmanager
    async def fresh(self) -> AsyncIterator[str]:
        """The DSN of a new, migrated database, dropped on exit."""
        name = f"cvmbk_bench_{uuid.uuid4().hex[:12]}"
        await _execute(self.admin_dsn, f'CREATE DATABASE "{name}"')
        dsn = with_database(self.admin_dsn, name)
        try:
            conn = await pool.connect_dsn(dsn)
            try:
                await migrate.migrate(conn)
            finally:
                await conn.close()
            yield dsn
        finally:
            await _execute(self.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def describe(self) -> dict[str, Any]:
        """The server's kind, redacted address and durability settings."""
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            shown = {name: await conn.fetchval(f"SHOW {name}") for name in _REPORTED}
        finally:
            await conn.close()
        return {"kind": self.kind, "dsn": redact(self.admin_dsn), **shown}


def _tree_cpu(pid: int) -> float | None:
    """A postmaster's CPU: its own, its live backends', and the exited ones it reaped."""
    import psutil

    try:
        main = psutil.Process(pid)
        times = main.cpu_times()
        total = float(times.user + times.system + times.children_user + times.children_system)
        for child in main.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
    except psutil.Error:
        return None
    return total


async def _execute(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@asynccontextmanager
async def bench_database(external_dsn: str | None) -> AsyncIterator[BenchDatabase]:
    """The given server, else an embedded one in a temporary directory, removed on exit."""
    if external_dsn:
        yield BenchDatabase(external_dsn, "external")
        return
    root = Path(tempfile.mkdtemp(prefix="cvmbk-bench-"))
    # Out-of-the-box settings on purpose: the figures are what the embedded default gives.
    server = await asyncio.to_thread(embedded.start, root, cleanup_mode="stop")
    try:
        yield BenchDatabase(str(server.get_uri()), "embedded", root / embedded.PGDATA_DIRNAME)
    finally:
        await asyncio.to_thread(server.cleanup)
        shutil.rmtree(root, ignore_errors=True)
