"""`cvm-backup migrate` and `cvm-backup check`."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from orchestrator import config


def register(subparsers: Any) -> None:
    """Add the database commands."""
    migrate = subparsers.add_parser("migrate", help="apply pending database migrations")
    migrate.set_defaults(handler=run_migrate)
    check = subparsers.add_parser(
        "check",
        help="health: database reachable, schema current, no account paused, credentials usable"
        " (exit 0/1)",
    )
    check.set_defaults(handler=run_check)


async def _migrate() -> int:
    from orchestrator.db import migrate, pool

    # The one command that may initdb the embedded database: every other one needs it made.
    conn = await pool.connect(config.load(), create=True)
    try:
        applied = await migrate.migrate(conn)
        status = await migrate.schema_status(conn)
    finally:
        await conn.close()
    for migration in applied:
        print(f"applied {migration.label}")
    print(f"{'migrated' if applied else 'nothing to do'}: {status.describe()}")
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    """Apply pending migrations; exit 0, or 2 when the database is newer than the code."""
    return asyncio.run(_migrate())


async def _check() -> tuple[int, list[str]]:
    from orchestrator.db import dsn, embedded, migrate, pool

    settings = config.load()
    where = dsn.redact(settings.database_url) if settings.database_url else "embedded"
    try:
        conn = await pool.connect(settings)
    except (pool.DatabaseUnavailable, embedded.NoDatabase) as exc:
        # Unhealthy, not misused: check's contract is exit 0/1, and it creates nothing.
        return 1, [f"database: FAIL: {exc}"]
    try:
        status = await migrate.schema_status(conn)
        paused_ok, paused_lines = await _check_pauses(conn) if status.current else (True, [])
    finally:
        await conn.close()
    lines = [
        f"database: ok ({where})",
        f"schema: {'ok' if status.current else 'FAIL'}: {status.describe()}",
        *paused_lines,
    ]
    creds_ok, creds_lines, malformed = await _check_credentials(settings)
    healthy = status.current and paused_ok and creds_ok
    return (2 if malformed else 0 if healthy else 1), lines + creds_lines


async def _check_pauses(conn: Any) -> tuple[bool, list[str]]:
    """Accounts paused by an account-wide error: their backups are not being made."""
    from orchestrator import pauses

    found = await pauses.listed(conn)
    if not found:
        return True, ["accounts: ok (none paused)"]
    return False, [
        f"account[{p.account}]: FAIL: paused since {p.paused_at:%Y-%m-%d %H:%M:%S}Z by {p.code};"
        f" next probe {p.probe_at:%H:%M:%S}Z (`cvm-backup account resume {p.account}`)"
        for p in found
    ]


async def _check_credentials(settings: config.Settings) -> tuple[bool, list[str], bool]:
    """Resolve every account's credentials chain; the source is shown, never the key."""
    from orchestrator.tencent.credentials import CredentialsError, default_chain

    ok, lines, malformed = True, [], False
    for account in settings.accounts:
        try:
            found = await default_chain(account).get()
        except CredentialsError as exc:
            ok, malformed = False, malformed or exc.malformed
            lines.append(f"credentials[{account.name}]: FAIL: {exc.message}")
        else:
            lines.append(f"credentials[{account.name}]: ok ({found.source})")
    if malformed:
        lines.append("credentials: a credentials file is malformed; fix it (exit 2)")
    return ok, lines, malformed


def run_check(args: argparse.Namespace) -> int:
    """Report database, schema, pauses and credentials: exit 0 when healthy, else 1.

    A credentials file that exists but is not one (not UTF-8, not INI) is the operator's input
    being wrong, like a bad config file: exit 2.
    """
    code, lines = asyncio.run(_check())
    print("\n".join(lines))
    return code
