"""Soak fixtures: a Postgres of the test's own that it can stop and start mid-run.

The session server is shared by every test, so restarting it would break the others; this one
is a dedicated pgserver instance in a temporary directory. The directory carries the session
fixture's prefix and an owner.pid, so a session killed before its teardown gets the server
reaped by the next one (tests.fixtures.pg).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.db import migrate, pool
from tests.engine.conftest import captured_logs
from tests.fixtures.pg import _ROOT_PREFIX, _start_embedded, run_async

__all__ = ["OwnPostgres", "captured_logs", "own_postgres"]


def _pg_ctl(server: Any, *args: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    # Run as the server's system user (pgserver uses a dedicated one when we are root). No
    # pipes: the postmaster would inherit them and pg_ctl could hang on them.
    subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(server.pgdata), *args],
        check=True,
        user=server.system_user,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
    )


class OwnPostgres:
    """A migrated Postgres that can be restarted; `dsn` stays valid across restarts."""

    def __init__(self, server: Any, dsn: str) -> None:
        self.server = server
        self.dsn = dsn
        # The socket directory is fixed at the first start; later starts must reuse it.
        self._socket_dir = server.get_postmaster_info().socket_dir
        self.restarts = 0

    def stop(self) -> None:
        """Fast shutdown: sessions are cut off mid-query, as in a real restart."""
        _pg_ctl(self.server, "-w", "-m", "fast", "stop")

    def start(self) -> None:
        """Start again with the options pgserver used (unix socket only)."""
        _pg_ctl(
            self.server,
            "-w",
            "-o",
            '-h ""',
            "-o",
            f"-k {self._socket_dir}",
            "-l",
            str(self.server.log),
            "start",
        )

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
        # pgserver's own cleanup only stops the postmaster it started, not a restarted one.
        with contextlib.suppress(subprocess.SubprocessError):
            own.stop()
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
