"""Queries on the `policies` table: load into the policy model, upsert, prune.

Rows are validated by the same code as policy files (`orchestrator.policies.validate`). The
table's CHECK constraints refuse most bad rows; what only the application can check (a cron
expression croniter refuses, a timezone zoneinfo does not know) makes `fetch_policies` log
`policy.invalid` and skip that row, so one bad row never stops the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from orchestrator import logs
from orchestrator.policies import (
    KEEP_RULES,
    Policy,
    PolicyDiff,
    PolicyError,
    copies_raw,
    diff,
    format_duration,
    validate,
)

if TYPE_CHECKING:
    from orchestrator.db.pool import Conn

# An interval past timedelta's range (a row older than migration 0006's bound) would fail the
# decoding of every row fetched with it; clamped to 10000 days it is still over the validator's
# bound, so that row alone is reported and skipped.
_COLUMNS = (
    "id, name, account, region, schedule, timezone, instance_ids, instance_tags, force_poweroff,"
    " sysprep, include_data_disks, on_quota,"
    " LEAST(completion_window, interval '10000 days') AS completion_window, enabled, keep_last,"
    " keep_daily, keep_weekly, keep_monthly, keep_yearly, max_age_days, copies"
)
_PLAIN = (
    "name",
    "account",
    "region",
    "schedule",
    "timezone",
    "force_poweroff",
    "sysprep",
    "include_data_disks",
    "on_quota",
    "enabled",
)

_UPSERT = """
INSERT INTO policies (name, account, region, schedule, timezone, instance_ids, instance_tags,
                      force_poweroff, sysprep, include_data_disks, on_quota, completion_window,
                      enabled, keep_last, keep_daily, keep_weekly, keep_monthly, keep_yearly,
                      max_age_days, copies)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
        $20)
ON CONFLICT (name) DO UPDATE SET
    account = EXCLUDED.account, region = EXCLUDED.region, schedule = EXCLUDED.schedule,
    timezone = EXCLUDED.timezone, instance_ids = EXCLUDED.instance_ids,
    instance_tags = EXCLUDED.instance_tags, force_poweroff = EXCLUDED.force_poweroff,
    sysprep = EXCLUDED.sysprep, include_data_disks = EXCLUDED.include_data_disks,
    on_quota = EXCLUDED.on_quota, completion_window = EXCLUDED.completion_window,
    enabled = EXCLUDED.enabled, keep_last = EXCLUDED.keep_last, keep_daily = EXCLUDED.keep_daily,
    keep_weekly = EXCLUDED.keep_weekly, keep_monthly = EXCLUDED.keep_monthly,
    keep_yearly = EXCLUDED.keep_yearly, max_age_days = EXCLUDED.max_age_days,
    copies = EXCLUDED.copies
"""

# Serialises concurrent `policy apply` runs so each one's diff is what it writes; readers
# (the scheduler) are not blocked.
_LOCK = "LOCK TABLE policies IN SHARE ROW EXCLUSIVE MODE"


def row_to_raw(row: asyncpg.Record) -> dict[str, Any]:
    """A table row in the file format, so it can go through `validate`."""
    raw: dict[str, Any] = {key: row[key] for key in _PLAIN}
    raw["instance_ids"] = list(row["instance_ids"])
    raw["instance_tags"] = dict(row["instance_tags"])
    raw["completion_window"] = format_duration(row["completion_window"])
    raw["retention"] = {key: row[key] for key in KEEP_RULES}
    if row["max_age_days"] is not None:
        raw["retention"]["max_age_days"] = row["max_age_days"]
    raw["copies"] = row["copies"]
    return raw


def row_to_policy(row: asyncpg.Record) -> Policy:
    """Validate a row like a file's policy; raises PolicyError naming the row."""
    where = f"policies table (id {row['id']})"
    policy, problems = validate(row_to_raw(row), where=where, policy_id=row["id"])
    if policy is None:
        raise PolicyError(*problems)
    return policy


# Problems already reported, by row id: every pass fetches the rows again, and an error per
# pass would bury everything else in the log. A row reported once is reported again only when
# its problems change (or after it was fixed and broke again).
_reported: dict[int, tuple[str, ...]] = {}


def _valid(rows: Sequence[asyncpg.Record]) -> list[Policy]:
    policies = []
    for row in rows:
        try:
            policies.append(row_to_policy(row))
            _reported.pop(row["id"], None)
        except PolicyError as exc:
            _report(row, tuple(exc.messages))
    return policies


def _report(row: asyncpg.Record, problems: tuple[str, ...]) -> None:
    log = logs.get(__name__)
    first = _reported.get(row["id"]) != problems
    _reported[row["id"]] = problems
    (log.error if first else log.debug)("policy.invalid", policy=row["name"], problems=problems)


async def fetch_policies(
    conn: Conn | asyncpg.Pool[asyncpg.Record], *, enabled_only: bool = False
) -> list[Policy]:
    """Every valid policy by name (invalid rows are logged and skipped)."""
    where = "WHERE enabled" if enabled_only else ""
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM policies {where} ORDER BY name")
    return _valid(rows)


async def fetch_policy(conn: Conn | asyncpg.Pool[asyncpg.Record], name: str) -> Policy | None:
    """One policy by name; None if absent; PolicyError if the row is invalid."""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM policies WHERE name = $1", name)
    return None if row is None else row_to_policy(row)


def _params(policy: Policy) -> tuple[Any, ...]:
    r = policy.retention
    return (
        policy.name,
        policy.account,
        policy.region,
        policy.schedule,
        policy.timezone,
        list(policy.instance_ids),
        dict(policy.instance_tags),
        policy.force_poweroff,
        policy.sysprep,
        policy.include_data_disks,
        policy.on_quota,
        policy.completion_window,
        policy.enabled,
        r.keep_last,
        r.keep_daily,
        r.keep_weekly,
        r.keep_monthly,
        r.keep_yearly,
        r.max_age_days,
        copies_raw(policy.copies),
    )


async def upsert(conn: Conn, policy: Policy) -> None:
    """Insert or update one policy by name (call inside a transaction)."""
    await conn.execute(_UPSERT, *_params(policy))


@dataclass(frozen=True, slots=True)
class PruneResult:
    """Policies `--prune` removes: deleted when they never ran, else disabled (history kept)."""

    deleted: tuple[str, ...]
    disabled: tuple[str, ...]


async def plan_prune(conn: Conn, names: Sequence[str]) -> PruneResult:
    """Which of `names` would be deleted (no history) and which disabled (runs or images)."""
    rows = await conn.fetch(
        "SELECT p.name FROM policies p WHERE p.name = ANY($1::text[])"
        " AND (EXISTS (SELECT 1 FROM runs r WHERE r.policy_id = p.id)"
        "  OR EXISTS (SELECT 1 FROM images i WHERE i.policy_id = p.id))",
        list(names),
    )
    with_history = {r["name"] for r in rows}
    deleted = tuple(sorted(n for n in names if n not in with_history))
    return PruneResult(deleted, tuple(sorted(with_history)))


async def prune(conn: Conn, plan: PruneResult) -> None:
    """Carry out a prune plan (inside the transaction that made it)."""
    await conn.execute("DELETE FROM policies WHERE name = ANY($1::text[])", list(plan.deleted))
    await conn.execute(
        "UPDATE policies SET enabled = false WHERE name = ANY($1::text[]) AND enabled",
        list(plan.disabled),
    )


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What `apply` found and did."""

    diff: PolicyDiff
    pruned: PruneResult | None


async def apply(
    conn: Conn,
    wanted: Sequence[Policy],
    *,
    dry_run: bool = False,
    prune_missing: bool = False,
) -> ApplyResult:
    """Diff and upsert every policy in one transaction; all or nothing.

    A dry run makes the very same writes and rolls them back, so it refuses exactly what the
    real apply refuses (a CHECK the validator does not mirror included).
    """
    transaction = conn.transaction()
    await transaction.start()
    try:
        result = await _apply_in(conn, wanted, prune_missing=prune_missing)
    except BaseException:
        await transaction.rollback()
        raise
    await (transaction.rollback() if dry_run else transaction.commit())
    return result


async def _apply_in(conn: Conn, wanted: Sequence[Policy], *, prune_missing: bool) -> ApplyResult:
    await conn.execute(_LOCK)
    result = diff(await fetch_policies(conn), wanted)
    plan = await plan_prune(conn, [p.name for p in result.missing]) if prune_missing else None
    for policy in (*result.added, *(p for p, _ in result.changed)):
        await upsert(conn, policy)
    if plan is not None:
        await prune(conn, plan)
    return ApplyResult(result, plan)
