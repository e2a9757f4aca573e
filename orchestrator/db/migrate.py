"""Forward-only migrations: numbered SQL files shipped inside the package.

Files are `orchestrator/migrations/NNNN_name.sql` (a symlink to the repository's `migrations/`,
copied into the wheel as package data). Each pending file runs with its `schema_migrations` row
in one transaction, under a session advisory lock so two processes never migrate at once: the
second waits, then finds nothing pending.

Each row records the sha256 of the file's bytes. A shipped file whose bytes no longer match what
was applied makes the schema "not current": `migrate`, the daemon and every command that checks
the schema refuse to go on (exit 2) rather than run against a schema no file describes. Rows
written before checksums were recorded (the column is NULL) are filled in by the next `migrate`
from the files as they are then: those files are trusted once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING

from orchestrator import logs
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
# Added to tables made before checksums, and nullable: their rows have none until the next
# `migrate` fills them in, and a cvm-backup from before it inserts rows without one.
_ADD_CHECKSUM = """
ALTER TABLE schema_migrations
    ADD COLUMN IF NOT EXISTS checksum text CHECK (checksum ~ '^[0-9a-f]{64}$')
"""
_HAS_CHECKSUM = """
SELECT EXISTS (
    SELECT 1 FROM pg_attribute
    WHERE attrelid = to_regclass('schema_migrations') AND attname = 'checksum'
      AND NOT attisdropped
)
"""
# `to_jsonb(row)` reads the checksum where the column exists and NULL where it does not yet, so
# the read-only status works on a table from before checksums without altering it.
_APPLIED = """
SELECT version, to_jsonb(m) ->> 'checksum' AS checksum
FROM schema_migrations AS m ORDER BY version
"""

log = logs.get("db.migrate")


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

    @property
    def checksum(self) -> str:
        """sha256 of the file's bytes (`sql` is those bytes decoded, newlines untouched)."""
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Applied versions against the versions this code ships."""

    applied: tuple[int, ...]
    available: tuple[Migration, ...]
    # Applied version -> the checksum recorded for it (None: applied before checksums).
    checksums: Mapping[int, str | None] = field(default_factory=dict)

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
    def changed(self) -> tuple[Migration, ...]:
        """Applied files whose bytes differ from what was recorded when they were applied."""
        return tuple(
            m for m in self.available if self.checksums.get(m.version) not in (None, m.checksum)
        )

    @property
    def unrecorded(self) -> tuple[Migration, ...]:
        """Applied files without a recorded checksum (applied before checksums were kept)."""
        recorded = self.checksums
        return tuple(m for m in self.available if m.version in recorded and not recorded[m.version])

    @property
    def current(self) -> bool:
        """True when the schema is exactly what this code expects, file for file."""
        return not (self.pending or self.unknown or self.changed or self.unrecorded)

    def describe(self) -> str:
        """One line for `check` and for errors."""
        if self.unknown:
            return (
                f"database schema has version(s) {', '.join(map(str, self.unknown))} that this "
                f"cvm-backup does not know (it ships up to {self.latest}): upgrade cvm-backup"
            )
        if self.changed:
            return _describe_changed(self.changed, self.checksums)
        if self.pending:
            labels = ", ".join(m.label for m in self.pending)
            return f"{len(self.pending)} pending migration(s): {labels}; run `cvm-backup migrate`"
        if self.unrecorded:
            labels = ", ".join(m.label for m in self.unrecorded)
            return (
                f"no checksum recorded yet for {labels} (applied by an older cvm-backup); "
                "run `cvm-backup migrate` to record them"
            )
        return f"schema current (version {self.latest})"

    @property
    def latest(self) -> int:
        """The newest version this code ships."""
        return self.available[-1].version if self.available else 0


def _describe_changed(changed: Sequence[Migration], checksums: Mapping[int, str | None]) -> str:
    files = "; ".join(
        f"{m.label}.sql (applied with sha256 {str(checksums.get(m.version))[:12]}..., "
        f"the file now has {m.checksum[:12]}...)"
        for m in changed
    )
    versions = ", ".join(str(m.version) for m in changed)
    return (
        f"migration file(s) changed after they were applied: {files}. Reinstall the cvm-backup "
        "release that applied them, or restore the files as released; a schema change belongs "
        "in a new numbered file. Only if the database already matches the edited file, accept "
        f"it: `UPDATE schema_migrations SET checksum = NULL WHERE version IN ({versions})`, "
        "then `cvm-backup migrate` records the file as it is now"
    )


def load(directory: Traversable) -> tuple[Migration, ...]:
    """The `NNNN_name.sql` files of `directory`, by version."""
    found: dict[int, Migration] = {}
    for entry in directory.iterdir():
        match = _FILENAME.match(entry.name)
        if not match:
            continue
        version = int(match["version"])
        if version in found:
            raise SchemaError(f"two migration files share version {version:04d}")
        # Bytes, not text mode: newline translation would hide a changed line ending.
        sql = entry.read_bytes().decode("utf-8")
        found[version] = Migration(version, match["name"], sql)
    return tuple(found[v] for v in sorted(found))


def available() -> tuple[Migration, ...]:
    """The migrations shipped with this package, by version."""
    return load(resources.files("orchestrator") / "migrations")


async def _applied(conn: Conn) -> dict[int, str | None]:
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return {}
    return {r["version"]: r["checksum"] for r in await conn.fetch(_APPLIED)}


async def schema_status(conn: Conn, shipped: Sequence[Migration] | None = None) -> SchemaStatus:
    """What is applied, pending and changed; reads only. `shipped` defaults to `available()`."""
    applied = await _applied(conn)
    files = tuple(shipped) if shipped is not None else available()
    return SchemaStatus(tuple(applied), files, applied)


async def ensure_current(conn: Conn, shipped: Sequence[Migration] | None = None) -> None:
    """Raise SchemaError unless the schema is exactly current (the daemon calls this first)."""
    status = await schema_status(conn, shipped)
    if not status.current:
        raise SchemaError(f"database schema is not current: {status.describe()}")


async def _apply(conn: Conn, migration: Migration) -> None:
    async with conn.transaction():
        await conn.execute(migration.sql)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            migration.version,
            migration.name,
            migration.checksum,
        )


async def _bootstrap(conn: Conn) -> None:
    await conn.execute(_CREATE_TABLE)
    # Only when missing: ALTER TABLE locks out readers (every replica's /readyz) even when it
    # finds nothing to do. Safe without a race: the caller holds the migration lock.
    if not await conn.fetchval(_HAS_CHECKSUM):
        await conn.execute(_ADD_CHECKSUM)


async def _backfill(conn: Conn, unrecorded: Sequence[Migration]) -> None:
    if not unrecorded:
        return
    async with conn.transaction():
        for migration in unrecorded:
            await conn.execute(
                "UPDATE schema_migrations SET checksum = $2 WHERE version = $1"
                " AND checksum IS NULL",
                migration.version,
                migration.checksum,
            )
    log.info("migrate.checksums_recorded", migrations=[m.label for m in unrecorded])


async def migrate(conn: Conn, shipped: Sequence[Migration] | None = None) -> tuple[Migration, ...]:
    """Apply every pending migration in order; return what was applied (empty: no-op).

    Refuses (SchemaError) before changing anything when the database is newer than the code or
    an applied file was changed; records the checksums of rows that have none.
    """
    # A session lock, not a transaction lock: it must span several transactions.
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        await _bootstrap(conn)
        status = await schema_status(conn, shipped)
        if status.unknown or status.changed:
            raise SchemaError(f"refusing to migrate: {status.describe()}")
        await _backfill(conn, status.unrecorded)
        for migration in status.pending:
            await _apply(conn, migration)
        return status.pending
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
