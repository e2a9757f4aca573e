"""The notification outbox (migration 0007): gather events into messages, seal, claim, settle.

Every step is one short statement or transaction, safe with any number of replicas at once:
events are taken with `FOR UPDATE SKIP LOCKED` and deleted in the transaction that files them,
appends to a gathering message go through its unique (target, group) index, and a message is
claimed for one attempt at a time by moving its `next_attempt_at` past the attempt's timeout, so
a replica that dies mid-attempt leaves a claim that lapses by itself. No step holds a
connection while a webhook is being called.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from orchestrator.config import NotifySettings

# Events taken per transaction; the notifier loops while a batch comes back full.
BATCH = 500
# Events listed in one message; the rest are counted in `total` and `counts`.
MAX_ITEMS = 50
# A message is sealed at the latest this many group delays after it opened, however busy.
MAX_GROUP_DELAYS = 10

_TAKE = """
WITH taken AS (
    DELETE FROM notify_events
    WHERE id IN (SELECT id FROM notify_events ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
    RETURNING *
)
SELECT t.*, p.name AS policy, r.slot AS run_slot
FROM taken t
LEFT JOIN runs r ON r.id = t.run_id
LEFT JOIN policies p ON p.id = t.policy_id
ORDER BY t.id
"""

# Appends to the target's gathering message of the group, or opens it. Items are kept in order
# up to MAX_ITEMS; per-kind counts are summed key by key.
_FILE = f"""
INSERT INTO notify_outbox (target, group_key, run_id, subject, items, total, counts, group_delay,
                           give_up_after)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (target, group_key) WHERE state = 'open' DO UPDATE SET
    items = jsonb_path_query_array(notify_outbox.items || EXCLUDED.items,
                                   '$[0 to {MAX_ITEMS - 1}]'),
    total = notify_outbox.total + EXCLUDED.total,
    counts = (SELECT jsonb_object_agg(k, coalesce((notify_outbox.counts ->> k)::int, 0)
                                         + coalesce((EXCLUDED.counts ->> k)::int, 0))
              FROM jsonb_object_keys(notify_outbox.counts || EXCLUDED.counts) AS k),
    last_at = now()
"""

# A run's message waits for the run to complete, unless it has been quiet for its group delay
# or open for MAX_GROUP_DELAYS of them. An event of the run not yet filed (committed after the
# last take) keeps it open one more round, so a run's failures are not split at its completion.
# $1: the daemon is stopping: every message that is not a run's goes now, and so does run $3's
# (the run `backup-now --wait` waited for). $2: seal every message (the end of `run --once`: the
# next pass may be a day away).
_SEAL = f"""
UPDATE notify_outbox o SET state = 'pending', sealed_at = now(), next_attempt_at = now()
WHERE state = 'open' AND (
    $2
    OR ($1 AND (run_id IS NULL OR run_id = $3::bigint))
    OR last_at <= now() - make_interval(secs => group_delay)
    OR opened_at <= now() - make_interval(secs => group_delay * {MAX_GROUP_DELAYS})
    OR (run_id IS NOT NULL
        AND EXISTS (SELECT 1 FROM runs r WHERE r.id = o.run_id AND r.state = 'completed')
        AND NOT EXISTS (SELECT 1 FROM notify_events e WHERE e.run_id = o.run_id))
)
"""

_CLAIM = """
UPDATE notify_outbox SET attempts = attempts + 1,
                         next_attempt_at = now() + make_interval(secs => $2)
WHERE id = (SELECT id FROM notify_outbox
            WHERE state = 'pending' AND target = $1 AND next_attempt_at <= now()
            ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, run_id, subject, items, total, counts, attempts,
          sealed_at + make_interval(secs => give_up_after) AS give_up_at
"""

_TALLY = """
SELECT r.state,
       (SELECT jsonb_object_agg(s.state, s.n)
        FROM (SELECT state, count(*) AS n FROM jobs WHERE run_id = r.id GROUP BY state) AS s)
       AS tally
FROM runs r WHERE r.id = $1
"""

# Messages for targets this replica does not know, past the time their target would have given
# up: the target left the configuration (or another replica's configuration differs).
_ORPHANS = """
DELETE FROM notify_outbox
WHERE state = 'pending' AND NOT (target = ANY($1::text[]))
  AND sealed_at + make_interval(secs => give_up_after) < now()
RETURNING id, target, attempts
"""


@dataclass(frozen=True, slots=True)
class Claimed:
    """One message claimed for one attempt."""

    id: int
    run_id: int | None
    subject: Mapping[str, Any]
    items: Sequence[Mapping[str, Any]]
    total: int
    counts: Mapping[str, int]
    attempts: int
    give_up_at: datetime


@dataclass
class _Group:
    """One (target, group) of a batch of events, before it is filed."""

    run_id: int | None
    subject: dict[str, Any]
    items: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, item: dict[str, Any]) -> None:
        self.total += 1
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.items) < MAX_ITEMS:
            self.items.append(item)


def _item(row: asyncpg.Record) -> dict[str, Any]:
    """What a message lists about one event (no nulls; times as ISO text)."""
    values = {
        "kind": row["kind"],
        "at": row["at"].isoformat(),
        "job": row["job_id"],
        "instance": row["instance_id"],
        "account": row["account"],
        "region": row["region"],
        "reason": row["reason"],
        "code": row["code"],
        "message": row["message"],
        "details": row["details"] or None,
    }
    return {key: value for key, value in values.items() if value is not None}


def _group_of(row: asyncpg.Record) -> tuple[str, int | None, dict[str, Any]]:
    """A job outcome belongs to its run's message; anything else to the target's `events`."""
    if row["kind"].startswith("job.") and row["run_id"] is not None:
        slot = row["run_slot"].isoformat() if row["run_slot"] is not None else None
        subject = {"run": row["run_id"], "policy": row["policy"], "slot": slot}
        return f"run:{row['run_id']}", row["run_id"], subject
    return "events", None, {}


def _groups(
    rows: Sequence[asyncpg.Record], targets: Sequence[NotifySettings]
) -> dict[tuple[NotifySettings, str], _Group]:
    groups: dict[tuple[NotifySettings, str], _Group] = {}
    for row in rows:
        key, run_id, subject = _group_of(row)
        item = _item(row)
        for target in targets:
            if row["kind"] in target.events:
                group = groups.setdefault((target, key), _Group(run_id, subject))
                group.add(row["kind"], item)
    return groups


async def file_events(pool: asyncpg.Pool, targets: Sequence[NotifySettings]) -> int:
    """Fold one batch of new events into the targets' messages; the number of events taken.

    Events no target listens to are taken all the same: with no [[notify]] at all the table
    stays empty instead of keeping a backlog that a target added later would send at once.
    """
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_TAKE, BATCH)
        for (target, key), group in _groups(rows, targets).items():
            await conn.execute(
                _FILE,
                target.key,
                key,
                group.run_id,
                group.subject,
                group.items,
                group.total,
                group.counts,
                target.group_delay,
                target.give_up_after,
            )
    return len(rows)


async def seal(
    pool: asyncpg.Pool,
    *,
    stopping: bool = False,
    everything: bool = False,
    run_id: int | None = None,
) -> int:
    """Make gathered messages ready to send; how many were sealed."""
    status = await pool.execute(_SEAL, stopping, everything, run_id)
    return int(status.split()[-1])


async def claim(pool: asyncpg.Pool, target: str, lease: float) -> Claimed | None:
    """The target's next due message, claimed for one attempt of at most `lease` seconds."""
    row = await pool.fetchrow(_CLAIM, target, lease)
    if row is None:
        return None
    return Claimed(
        id=row["id"],
        run_id=row["run_id"],
        subject=row["subject"],
        items=row["items"],
        total=row["total"],
        counts=row["counts"],
        attempts=row["attempts"],
        give_up_at=row["give_up_at"],
    )


async def tally(pool: asyncpg.Pool, run_id: int) -> tuple[dict[str, int] | None, bool]:
    """A run's jobs by state, and whether it has completed (None, False once it is pruned)."""
    row = await pool.fetchrow(_TALLY, run_id)
    if row is None:
        return None, False
    return dict(row["tally"] or {}), row["state"] == "completed"


async def delivered(pool: asyncpg.Pool, message_id: int) -> None:
    """The receiver took the message: nothing more to keep."""
    await pool.execute("DELETE FROM notify_outbox WHERE id = $1", message_id)


async def retry(pool: asyncpg.Pool, message_id: int, delay: float, error: str) -> None:
    """Try the message again after `delay` seconds."""
    await pool.execute(
        "UPDATE notify_outbox SET next_attempt_at = now() + make_interval(secs => $2),"
        " last_error = $3 WHERE id = $1",
        message_id,
        delay,
        error[:500],
    )


async def drop(pool: asyncpg.Pool, message_id: int) -> None:
    """Give the message up."""
    await pool.execute("DELETE FROM notify_outbox WHERE id = $1", message_id)


async def drop_orphans(pool: asyncpg.Pool, known: Collection[str]) -> list[asyncpg.Record]:
    """Delete expired messages of targets not configured here; what was deleted."""
    return await pool.fetch(_ORPHANS, sorted(known))


async def record(
    pool: asyncpg.Pool, kind: str, *, reason: str | None, details: Mapping[str, Any]
) -> None:
    """An event the database does not see by itself (a dead daemon task), for the notifier."""
    await pool.execute(
        "INSERT INTO notify_events (kind, reason, details) VALUES ($1, $2, $3)",
        kind,
        reason,
        dict(details),
    )
