"""Where the demo keeps its data: a temporary home with its own embedded Postgres, removed after.

The demo never uses the operator's database: not the embedded one under CVM_BACKUP_HOME and not
a DSN from the environment. Only an explicit `--database-url` points it elsewhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import Settings
from orchestrator.db import embedded
from orchestrator.errors import UsageError

LOG_NAME = "demo.log"


@dataclass(frozen=True, slots=True)
class Workspace:
    """The demo's database and where it lives; `temporary` when the demo owns (and drops) it."""

    dsn: str
    home: Path | None
    temporary: bool


@contextmanager
def temporary_home() -> Iterator[Path]:
    """A fresh directory under the system temp dir, deleted with everything in it."""
    path = Path(tempfile.mkdtemp(prefix="cvm-backup-demo-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def embedded_postgres(home: Path) -> Iterator[str]:
    """A private embedded server in `home`, stopped on exit; yields its DSN."""
    server = embedded.start(home, cleanup_mode="stop")
    try:
        yield str(server.get_uri())
    finally:
        # We are the server's only user (the directory is ours), so this stops it.
        server.cleanup()


@contextmanager
def workspace(database_url: str | None) -> Iterator[Workspace]:
    """The explicit database, else a temporary home with its own server."""
    if database_url:
        yield Workspace(database_url, None, temporary=False)
        return
    with temporary_home() as home, embedded_postgres(home) as dsn:
        yield Workspace(dsn, home, temporary=True)


def default_log_path() -> Path:
    """`$CVM_BACKUP_HOME/demo/demo.log` (default home: ~/.local/share/cvm-backup)."""
    home = os.environ.get("CVM_BACKUP_HOME")
    base = Path(home).expanduser() if home else Settings().home
    return base / "demo" / LOG_NAME


def open_log(path: Path) -> Path:
    """Create the log file's directory and truncate the file; the resolved path."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")
    except OSError as exc:
        raise UsageError(
            f"{path}: cannot write the demo log ({exc.strerror}); use --log-file"
        ) from None
    return path.resolve()
