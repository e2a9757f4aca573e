"""Forward-only migrations: numbered SQL files shipped inside the package.

Files are `orchestrator/migrations/NNNN_name.sql` (a symlink to the repository's `migrations/`,
copied into the wheel as package data). Each pending file runs with its `schema_migrations` row
in one transaction, under a session advisory lock so two processes never migrate at once: the
second waits, then finds nothing pending.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from orchestrator.errors import UsageError

if TYPE_CHECKING:
    from orchestrator.db.pool import Conn

# Arbitrary but fixed: every cvm-backup process must agree on it ("cvmbkmig" in ASCII).
LOCK_KEY = 0x6376_6D62_6B6D_6967
_FILENAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class SchemaError(UsageError):
    """The database schema does not match this version of cvm-backup."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file."""

    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        """`0001_init`, as in the file name."""
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Applied versions against the versions this code ships."""

    applied: tuple[int, ...]
    available: tuple[Migration, ...]

    @property
    def pending(self) -> tuple[Migration, ...]:
        """Shipped but not applied, in order."""
        done = set(self.applied)
        return tuple(m for m in self.available if m.version not in done)

    @property
    def unknown(self) -> tuple[int, ...]:
        """Applied but not shipped: the database was migrated by a newer cvm-backup."""
        known = {m.version for m in self.available}
        return tuple(v for v in self.applied if v not in known)

    @property
    def current(self) -> bool:
        """True when the schema is exactly what this code expects."""
        return not self.pending and not self.unknown

    def describe(self) -> str:
        """One line for `check` and for errors."""
        if self.unknown:
            return (
                f"database schema has version(s) {', '.join(map(str, self.unknown))} that this "
                f"cvm-backup does not know (it ships up to {self.latest}): upgrade cvm-backup"
            )
        if self.pending:
            labels = ", ".join(m.label for m in self.pending)
            return f"{len(self.pending)} pending migration(s): {labels}; run `cvm-backup migrate`"
        return f"schema current (version {self.latest})"

    @property
    def latest(self) -> int:
        """The newest version this code ships."""
        return self.available[-1].version if self.available else 0


def available() -> tuple[Migration, ...]:
    """The migrations shipped with this package, by version."""
    found: dict[int, Migration] = {}
    for entry in (resources.files("orchestrator") / "migrations").iterdir():
        match = _FILENAME.match(entry.name)
        if not match:
            continue
        version = int(match["version"])
        if version in found:
            raise SchemaError(f"two migration files share version {version:04d}")
        found[version] = Migration(version, match["name"], entry.read_text(encoding="utf-8"))
    return tuple(found[v] for v in sorted(found))


async def _applied(conn: Conn) -> tuple[int, ...]:
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return ()
    rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return tuple(r["version"] for r in rows)


async def schema_status(conn: Conn) -> SchemaStatus:
    """What is applied and what is pending; reads only."""
    return SchemaStatus(await _applied(conn), available())


async def ensure_current(conn: Conn) -> None:
    """Raise SchemaError unless the schema is exactly current (the daemon calls this first)."""
    status = await schema_status(conn)
    if not status.current:
        raise SchemaError(f"database schema is not current: {status.describe()}")


async def _apply(conn: Conn, migration: Migration) -> None:
    async with conn.transaction():
        await conn.execute(migration.sql)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            migration.version,
            migration.name,
        )


async def migrate(conn: Conn) -> tuple[Migration, ...]:
    """Apply every pending migration in order; return what was applied (empty: no-op)."""
    # A session lock, not a transaction lock: it must span several transactions.
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await conn.execute(_CREATE_TABLE)
        status = await schema_status(conn)
        if status.unknown:
            raise SchemaError(f"refusing to migrate: {status.describe()}")
        for migration in status.pending:
            await _apply(conn, migration)
        return status.pending
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
