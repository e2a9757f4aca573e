"""Deleting images: retention sweeps and quota eviction, each deletion two-phase in a ledger.

A deletion is (1) an intent committed to `images` (delete_requested_at, delete_reason) and to
`events`, then (2) DeleteImages, then (3) the confirmation (deleted_at, another event). A crash
between (1) and (3) leaves an intent without a confirmation; the next sweep or rotation of that
region re-issues it (InvalidImageId.NotFound then means "already gone": confirmed).

Every deleting path holds the region's delete lock: an asyncio lock within the process plus a
Postgres session advisory lock across replicas, so only one rotation or sweep per
(account, region) decides at a time, from a consistent picture of what is live.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from orchestrator import logs, quota_gate, retention
from orchestrator.context import EngineContext
from orchestrator.db.pool import keeps_session_state
from orchestrator.retention import Candidate, Decision, Rules
from orchestrator.tencent.errors import ErrorClass, TencentError

log = logs.get("rotation")

NOT_FOUND = "InvalidImageId.NotFound"
CREATEFAILED = retention.CREATEFAILED
DELETABLE_STATES = (retention.NORMAL, CREATEFAILED)
# Advisory-lock namespace ("CVBR"): the two-int form keeps us apart from single-bigint locks.
LOCK_NAMESPACE = 0x43564252

Conn = Any  # an asyncpg connection (pool proxies included)

_LIVE_COLUMNS = """
    i.image_id, i.account, i.region, i.policy_id, i.instance_id, i.job_id, i.state,
    i.created_at, i.delete_requested_at, i.delete_reason
"""

_POLICY_RULES = """
    p.timezone, p.keep_last, p.keep_daily, p.keep_weekly, p.keep_monthly, p.keep_yearly,
    p.max_age_days
"""

_INSTANCE_IMAGES = f"""
SELECT {_LIVE_COLUMNS} FROM images i
WHERE i.policy_id = $1 AND i.instance_id = $2 AND i.account = $3 AND i.region = $4
  AND i.deleted_at IS NULL
"""

_REGION_IMAGES = f"""
SELECT {_LIVE_COLUMNS}, {_POLICY_RULES} FROM images i JOIN policies p ON p.id = i.policy_id
WHERE i.account = $1 AND i.region = $2 AND i.deleted_at IS NULL
"""

# Conditional: whoever writes the intent first owns the deletion; states are re-checked here so
# an image whose state changed since it was read is never sent to DeleteImages.
_REQUEST = """
UPDATE images SET delete_requested_at = now(), delete_reason = $2
WHERE image_id = $1 AND deleted_at IS NULL AND delete_requested_at IS NULL
  AND state = ANY($3::text[])
RETURNING delete_requested_at
"""

_CONFIRM = "UPDATE images SET deleted_at = now() WHERE image_id = $1 AND deleted_at IS NULL"

_WITHDRAW = """
UPDATE images SET delete_requested_at = NULL, delete_reason = NULL
WHERE image_id = $1 AND deleted_at IS NULL
"""

# Images still being built in the region, or deletions not yet confirmed: either will free or
# make room soon, so a quota-blocked job should wait rather than fail. A released 'creating'
# job counts too: its last CreateImage may have made an image we do not know the id of yet.
# Jobs holding a lease (the caller among them) do not: two quota-blocked jobs would otherwise
# wait on each other until their windows closed.
_IN_FLIGHT = """
SELECT EXISTS (SELECT 1 FROM images WHERE account = $1 AND region = $2 AND deleted_at IS NULL
                 AND (state = 'CREATING' OR delete_requested_at IS NOT NULL))
    OR EXISTS (SELECT 1 FROM jobs WHERE account = $1 AND region = $2
                 AND (state = 'waiting_image' OR (state = 'creating' AND lease_owner IS NULL)))
"""


@dataclass(frozen=True, slots=True)
class LiveImage:
    """One image of ours not yet confirmed deleted."""

    image_id: str
    account: str
    region: str
    policy_id: int
    instance_id: str
    job_id: int | None
    state: str
    created_at: datetime
    delete_requested_at: datetime | None
    delete_reason: str | None

    @classmethod
    def from_record(cls, row: Any) -> LiveImage:
        """From a row carrying at least the live columns."""
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})

    @property
    def candidate(self) -> Candidate:
        """As a retention candidate (every image in our table is ours)."""
        return Candidate(self.image_id, self.created_at, self.state, ours=True)


@dataclass(frozen=True, slots=True)
class RotationResult:
    """What a quota rotation did: images freed, or why none were (`wait` or `exhausted`)."""

    freed: int = 0
    wait: bool = False
    exhausted: bool = False
    deleted: tuple[str, ...] = ()


# -- the region's delete lock -----------------------------------------------------------------

# asyncio locks belong to one event loop; keyed by loop so tests (a loop each) never share one.
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], asyncio.Lock]]
_LOCKS = weakref.WeakKeyDictionary()


def _local_lock(account: str, region: str) -> asyncio.Lock:
    locks = _LOCKS.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault((account, region), asyncio.Lock())


@asynccontextmanager
async def region_lock(ctx: EngineContext, account: str, region: str) -> AsyncIterator[Conn]:
    """Hold the (account, region) delete lock; yields the connection that holds it."""
    key = f"{account}/{region}"
    async with _local_lock(account, region), ctx.pool.acquire() as conn:
        # A session lock: should the unlock below be cut short, the pool's reset releases it.
        keeps_session_state(conn)
        await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", LOCK_NAMESPACE, key)
        try:
            yield conn
        finally:
            # The pool's reset also runs pg_advisory_unlock_all(), should this be cut short.
            await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", LOCK_NAMESPACE, key)


# -- the two-phase delete ---------------------------------------------------------------------


async def record_event(
    conn: Conn,
    kind: str,
    image: LiveImage,
    reason: str | None,
    **details: Any,
) -> None:
    """Append one ledger row about `image`."""
    await record_events(conn, [(kind, image, reason, details)])


_EVENTS = """
INSERT INTO events (kind, policy_id, job_id, image_id, account, region, instance_id, reason,
                    details)
SELECT kind, policy_id, job_id, image_id, account, region, instance_id, reason, details::jsonb
FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::text[], $9::text[])
     WITH ORDINALITY AS e(kind, policy_id, job_id, image_id, account, region, instance_id, reason,
                          details, n)
ORDER BY n
"""

# (kind, image, reason, details): one ledger row, for `record_events`.
EventRow = tuple[str, "LiveImage", str | None, dict[str, Any]]


async def record_events(conn: Conn, rows: Sequence[EventRow]) -> None:
    """Append many ledger rows in one statement, in order."""
    if not rows:
        return
    columns: list[list[Any]] = [[] for _ in range(9)]
    for kind, image, reason, details in rows:
        values = (
            kind,
            image.policy_id,
            image.job_id,
            image.image_id,
            image.account,
            image.region,
            image.instance_id,
            reason,
            json.dumps({k: v for k, v in details.items() if v is not None}, default=str),
        )
        for column, value in zip(columns, values, strict=True):
            column.append(value)
    await conn.execute(_EVENTS, *columns)


async def request_delete(conn: Conn, kind: str, image: LiveImage, reason: str) -> LiveImage | None:
    """Write the intent (inside the caller's transaction, if any); the image as now pending.

    None when the image is not deletable or another deleter took it first.
    """
    async with conn.transaction():
        row = await conn.fetchrow(_REQUEST, image.image_id, reason, list(DELETABLE_STATES))
        if row is None:
            return None
        await record_event(conn, f"{kind}.delete_requested", image, reason, state=image.state)
    return replace(image, delete_requested_at=row["delete_requested_at"], delete_reason=reason)


async def _confirm(conn: Conn, kind: str, image: LiveImage, reason: str, **details: Any) -> None:
    async with conn.transaction():
        await conn.execute(_CONFIRM, image.image_id)
        await record_event(conn, f"{kind}.deleted", image, reason, **details)
        # One image fewer in the region: jobs parked behind its full quota may fit now.
        await quota_gate.nudge(conn, image.account, image.region)
    log.info(
        f"{kind}.deleted",
        image_id=image.image_id,
        policy_id=image.policy_id,
        instance_id=image.instance_id,
        account=image.account,
        region=image.region,
        reason=reason,
        **details,
    )


async def _failed(conn: Conn, kind: str, image: LiveImage, reason: str, exc: TencentError) -> None:
    # A transient failure keeps the intent so the next pass re-issues it; a refusal (shared,
    # wrong state) withdraws it so the image is judged afresh next time, not retried blindly.
    keep_intent = exc.error_class in (ErrorClass.TRANSIENT, ErrorClass.THROTTLED, ErrorClass.BUSY)
    async with conn.transaction():
        if not keep_intent:
            await conn.execute(_WITHDRAW, image.image_id)
        details = {"code": exc.code, "message": exc.message, "request_id": exc.request_id}
        await record_event(conn, f"{kind}.delete_failed", image, reason, **details)
    log.warning(
        f"{kind}.delete_failed",
        image_id=image.image_id,
        region=image.region,
        retry=keep_intent,
        **details,
    )


async def delete_image(
    ctx: EngineContext, conn: Conn, kind: str, image: LiveImage, reason: str
) -> bool:
    """Intent, DeleteImages, confirmation; True once the image is gone. `kind` names events."""
    if image.delete_requested_at is None:
        pending = await request_delete(conn, kind, image, reason)
        if pending is None:
            return False
        image = pending
    reason = image.delete_reason or reason
    snap = ctx.settings.delete_binded_snap
    try:
        request_id = await ctx.client(image.account).delete_images(
            image.region, [image.image_id], delete_binded_snap=snap
        )
    except TencentError as exc:
        if exc.code != NOT_FOUND:
            await _failed(conn, kind, image, reason, exc)
            return False
        await _confirm(conn, kind, image, reason, already_gone=True, request_id=exc.request_id)
        return True
    await _confirm(conn, kind, image, reason, request_id=request_id, delete_binded_snap=snap)
    return True


async def _finish_pending(
    ctx: EngineContext, conn: Conn, kind: str, images: Iterable[LiveImage]
) -> list[str]:
    """Re-issue intents a crash or a transient error left unconfirmed."""
    done = []
    for image in images:
        reason = image.delete_reason or "pending intent"
        if image.delete_requested_at is not None and await delete_image(
            ctx, conn, kind, image, reason
        ):
            done.append(image.image_id)
    return done


# -- retention after a backup -----------------------------------------------------------------


def rules_of(row: Any) -> Rules:
    """A policy row's retention rules."""
    return Rules(
        keep_last=row["keep_last"],
        keep_daily=row["keep_daily"],
        keep_weekly=row["keep_weekly"],
        keep_monthly=row["keep_monthly"],
        keep_yearly=row["keep_yearly"],
        max_age_days=row["max_age_days"],
    )


def _decide(row: Any, images: Sequence[LiveImage]) -> list[Decision]:
    """Retention over the images with no pending intent (those are already going)."""
    live = [i.candidate for i in images if i.delete_requested_at is None]
    return retention.decide(rules_of(row), row["timezone"], datetime.now(UTC), live)


async def _record_keeps(
    conn: Conn, images: Sequence[LiveImage], decisions: Sequence[Decision]
) -> None:
    await record_events(conn, _keep_rows(images, decisions))


async def apply_retention(ctx: EngineContext, policy_id: int, instance_id: str) -> list[str]:
    """Apply the policy's retention to one instance's images; the ids deleted."""
    policy = await ctx.pool.fetchrow(
        f"SELECT p.account, p.region, {_POLICY_RULES} FROM policies p WHERE p.id = $1", policy_id
    )
    if policy is None:
        return []
    account, region = policy["account"], policy["region"]
    with structlog.contextvars.bound_contextvars(policy_id=policy_id, instance_id=instance_id):
        async with region_lock(ctx, account, region) as conn:
            rows = await conn.fetch(_INSTANCE_IMAGES, policy_id, instance_id, account, region)
            images = [LiveImage.from_record(r) for r in rows]
            deleted = await _finish_pending(ctx, conn, "retention", images)
            decisions = _decide(policy, images)
            await _record_keeps(conn, images, decisions)
            by_id = {i.image_id: i for i in images}
            # Oldest first: a sweep cut short leaves the newer images, not holes in the middle.
            for d in reversed(retention.deletions(decisions)):
                if await delete_image(ctx, conn, "retention", by_id[d.image_id], d.reasons[0]):
                    deleted.append(d.image_id)
    return deleted


# The live images of many (policy, instance) pairs, each row with its policy's rules.
_PAIR_IMAGES = f"""
SELECT {_LIVE_COLUMNS}, {_POLICY_RULES}
FROM unnest($1::bigint[], $2::text[]) AS w(policy_id, instance_id)
JOIN policies p ON p.id = w.policy_id
JOIN images i ON i.policy_id = w.policy_id AND i.instance_id = w.instance_id
             AND i.account = p.account AND i.region = p.region AND i.deleted_at IS NULL
"""

Pair = tuple[int, str]  # (policy id, instance id)


def _keep_rows(images: Sequence[LiveImage], decisions: Sequence[Decision]) -> list[EventRow]:
    by_id = {i.image_id: i for i in images}
    rows: list[EventRow] = []
    for d in decisions:
        if d.keep:
            reason = "; ".join(d.reasons)
            rows.append(("retention.kept", by_id[d.image_id], reason, {}))
            log.debug("retention.kept", image_id=d.image_id, reason=reason)
    return rows


async def sweep_quiet(ctx: EngineContext, pairs: Iterable[Pair]) -> list[Pair]:
    """Record the keeps of pairs retention provably leaves alone; the pairs needing a sweep."""
    # Most sweeps after a backup delete nothing; those need no region lock and no statement
    # per pair. A picture read without the lock is enough to know nothing goes: an image
    # added later triggers its own sweep, and one deleted meanwhile only means less to delete.
    wanted = sorted(set(pairs))
    rows = await ctx.pool.fetch(_PAIR_IMAGES, [p for p, _ in wanted], [i for _, i in wanted])
    groups = _per_instance(rows)
    keeps: list[EventRow] = []
    loud: list[Pair] = []
    for group in groups:
        images = [LiveImage.from_record(r) for r in group]
        decisions = _decide(group[0], images)
        pending = any(i.delete_requested_at is not None for i in images)
        if pending or retention.deletions(decisions):
            loud.append((group[0]["policy_id"], group[0]["instance_id"]))
        else:
            keeps.extend(_keep_rows(images, decisions))
    async with ctx.pool.acquire() as conn:
        await record_events(conn, keeps)
        # New NORMAL images make their older siblings evictable: a full region may have room.
        for account, region in sorted({(r["account"], r["region"]) for r in rows}):
            await quota_gate.nudge(conn, account, region)
    return sorted(loud)


# -- quota rotation ---------------------------------------------------------------------------


def _newest_normal(images: Iterable[LiveImage]) -> LiveImage | None:
    normal = [i for i in images if i.state == retention.NORMAL]
    return max(normal, key=lambda i: (i.created_at, i.image_id), default=None)


# (image, reason, optional): optional evictions happen only while more room is needed.
Eviction = tuple[LiveImage, str, bool]


def _by_age(items: Iterable[Eviction]) -> list[Eviction]:
    return sorted(items, key=lambda item: (item[0].created_at, item[0].image_id))


def _per_instance(rows: Sequence[Any]) -> list[list[Any]]:
    groups: dict[tuple[int, str], list[Any]] = defaultdict(list)
    for row in rows:
        groups[(row["policy_id"], row["instance_id"])].append(row)
    return list(groups.values())


def _released(policy: Any, images: Sequence[LiveImage]) -> list[Eviction]:
    """What retention lets go in one (policy, instance)."""
    by_id = {i.image_id: i for i in images}
    deletions = retention.deletions(_decide(policy, images))
    return [(by_id[d.image_id], f"retention: {d.reasons[0]}", False) for d in deletions]


def _failed_and_older(images: Sequence[LiveImage]) -> tuple[list[Eviction], list[Eviction]]:
    """CREATEFAILED images, and NORMAL ones with a newer NORMAL, of one (policy, instance)."""
    settled = [i for i in images if i.delete_requested_at is None]
    newest = _newest_normal(settled)
    failed = [(i, "quota: CREATEFAILED image", False) for i in settled if i.state == CREATEFAILED]
    older = [
        (i, "quota: oldest with a newer NORMAL image", True)
        for i in settled
        if i.state == retention.NORMAL and newest is not None and i is not newest
    ]
    return failed, older


def eviction_order(rows: Sequence[Any]) -> list[Eviction]:
    """Our images of a region in eviction order, each with its reason.

    (a) our CREATEFAILED images, (b) what retention already lets go, (c) the oldest NORMAL
    images that have a newer NORMAL image of the same (policy, instance). Never the newest
    NORMAL image of a (policy, instance); never an image with a pending intent (already going).
    """
    failed: list[Eviction] = []
    released: list[Eviction] = []
    older: list[Eviction] = []
    for group in _per_instance(rows):
        images = [LiveImage.from_record(r) for r in group]
        released += _released(group[0], images)
        more_failed, more_older = _failed_and_older(images)
        failed += more_failed
        older += more_older
    taken = {image.image_id for image, _, _ in released}
    older = [e for e in older if e[0].image_id not in taken]
    return _by_age(failed) + _by_age(released) + _by_age(older)


async def _evict(
    ctx: EngineContext, conn: Conn, rows: Sequence[Any], need: int, freed: list[str]
) -> None:
    for image, reason, optional in eviction_order(rows):
        if optional and len(freed) >= need:
            return
        if await delete_image(ctx, conn, "rotation", image, reason):
            freed.append(image.image_id)


async def _nothing_freed(conn: Conn, account: str, region: str) -> RotationResult:
    if await conn.fetchval(_IN_FLIGHT, account, region):
        log.info("rotation.waiting", account=account, region=region)
        return RotationResult(wait=True)
    log.error("quota.exhausted", account=account, region=region)
    await conn.execute(
        "INSERT INTO events (kind, account, region, reason) VALUES ('quota.exhausted', $1, $2, $3)",
        account,
        region,
        "no image of ours is eligible for eviction and none is being built",
    )
    return RotationResult(exhausted=True)


async def rotate_for_quota(
    ctx: EngineContext, account: str, region: str, *, need: int = 1
) -> RotationResult:
    """Free image quota in (account, region); one rotation at a time per region."""
    async with region_lock(ctx, account, region) as conn:
        rows = await conn.fetch(_REGION_IMAGES, account, region)
        images = [LiveImage.from_record(r) for r in rows]
        freed = await _finish_pending(ctx, conn, "rotation", images)
        await _evict(ctx, conn, rows, need, freed)
        if freed:
            return RotationResult(freed=len(freed), deleted=tuple(freed))
        return await _nothing_freed(conn, account, region)
