"""The embedded default: a pgserver-managed Postgres under CVM_BACKUP_HOME/pgdata.

pgserver ships the Postgres binaries in its wheel, so a machine with nothing installed still
gets a real server. The data directory is reused across invocations. Sharing between processes
is pgserver's own protocol: an inter-process file lock serialises initdb, start and stop, and
`pgdata/.handle_pids.json` lists the processes using the server; the last one to exit stops it
(cleanup_mode "stop", via atexit). Two CLI commands at once therefore share one server.

What pgserver does not handle: a process killed with SIGKILL never removes its pid, and every
later process would then think someone else still uses the server and leave it running forever.
`start` forgets dead pids (under pgserver's lock) before joining.

To move to a real server: set CVM_BACKUP_DATABASE_URL, run `cvm-backup migrate`, then re-apply
the policy files (or copy the tables with pg_dump from the embedded server's socket).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

PGDATA_DIRNAME = "pgdata"


def _pgserver() -> Any:
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, cron); the
    # fallback it picks is fine, and the warning would land on every command's stderr.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        import pgserver.postgres_server

    return pgserver


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop pids of processes that died without pgserver's atexit cleanup (SIGKILL)."""
    import psutil

    pgserver = _pgserver()
    handles = pgserver.utils.DiskList(pgdata / ".handle_pids.json")
    with pgserver.postgres_server.PostgresServer._lock:
        alive = [pid for pid in handles.get() if psutil.pid_exists(pid)]
        if alive != handles.get():
            handles.put(alive)


def start(home: Path, *, cleanup_mode: str | None = "stop") -> Any:
    """Start (or join) the embedded server for `home` and return pgserver's handle."""
    pgdata = home.expanduser().resolve() / PGDATA_DIRNAME
    pgdata.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(pgdata)
    pgserver = _pgserver()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pgserver.get_server(pgdata, cleanup_mode=cleanup_mode)


def dsn(home: Path) -> str:
    """The embedded server's DSN for `home`, starting it if needed (trust auth, no password)."""
    uri: str = start(home).get_uri()
    return uri
