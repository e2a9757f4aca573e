"""Soak fixtures: a Postgres of the test's own that it can stop and start mid-run.

The session server is shared by every test, so restarting it would break the others; this one
is a dedicated embedded server in a temporary directory. The directory carries the session
fixture's prefix and an owner.pid, so a session killed before its teardown gets the server
reaped by the next one (tests.fixtures.pg).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.db import migrate, pool
from tests.engine.conftest import captured_logs
from tests.fixtures.pg import _ROOT_PREFIX, _start_embedded, run_async

__all__ = ["OwnPostgres", "captured_logs", "own_postgres"]


class OwnPostgres:
    """A migrated Postgres that can be restarted; `dsn` stays valid across restarts."""

    def __init__(self, server: Any, dsn: str) -> None:
        self.server = server
        self.dsn = dsn
        self.restarts = 0

    def stop(self) -> None:
        """Fast shutdown: sessions are cut off mid-query, as in a real restart."""
        self.server.stop_postmaster()

    def start(self) -> None:
        """Start again on the same socket (the embedded module's options: unix socket only)."""
        self.server.start_postmaster()

    async def restart(self, down_for: float) -> None:
        """Stop, stay down for `down_for` seconds (connects are refused), start again."""
        await asyncio.to_thread(self.stop)
        await asyncio.sleep(down_for)
        await asyncio.to_thread(self.start)
        self.restarts += 1


async def _migrate(dsn: str) -> None:
    conn = await pool.connect_dsn(dsn)
    try:
        await migrate.migrate(conn)
    finally:
        await conn.close()


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A dedicated, migrated, restartable Postgres for one test."""
    root = Path(tempfile.mkdtemp(prefix=_ROOT_PREFIX))
    (root / "owner.pid").write_text(str(os.getpid()))
    server, dsn = _start_embedded(root)
    run_async(lambda: _migrate(dsn))
    own = OwnPostgres(server, dsn)
    try:
        yield own
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
