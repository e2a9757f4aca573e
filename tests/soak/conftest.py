"""Soak fixtures: a Postgres of the test's own that it can stop and start mid-run.

The restartable server and why it is separate: tests.fixtures.own_pg.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.own_pg import OwnPostgres, migrate_dsn
from tests.fixtures.pg import _ROOT_PREFIX, _start_embedded, run_async


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A dedicated, migrated, restartable Postgres for one test."""
    root = Path(tempfile.mkdtemp(prefix=_ROOT_PREFIX))
    (root / "owner.pid").write_text(str(os.getpid()))
    server, dsn = _start_embedded(root)
    run_async(lambda: migrate_dsn(dsn))
    own = OwnPostgres(server, dsn)
    try:
        yield own
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)
