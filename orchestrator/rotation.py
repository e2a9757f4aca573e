"""Deleting images: retention sweeps and quota eviction, each deletion in three steps in a ledger.

A deletion is (1) an intent committed to `images` (delete_requested_at, delete_reason) and to
`events`, then (2) DeleteImages (delete_sent_at once it answered), then (3) the confirmation
(deleted_at, another event) once DescribeImages no longer lists the image. On the real API a deleted
image stays listed as DELETING for a while, holding its quota and its name
(docs/design.md#delete-delay), so an answer to DeleteImages frees nothing yet (`confirm_deletions`).
A crash between (1) and (2) leaves an intent the next sweep or rotation of that region re-issues
(InvalidImageId.NotFound then means "already gone": confirmed); a sent deletion is never sent again,
only followed.

Every deleting path holds the region's delete lock: an asyncio lock within the process plus a
Postgres session advisory lock across replicas, so only one rotation or sweep per
(account, region) decides at a time, from a consistent picture of what is live.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from orchestrator import logs, quota_gate, retention
from orchestrator.context import EngineContext
from orchestrator.db.pool import keeps_session_state
from orchestrator.retention import Candidate, Decision, Rules
from orchestrator.tencent.errors import ErrorClass, TencentError
from orchestrator.tencent.models import Filter, Image

log = logs.get("rotation")

NOT_FOUND = "InvalidImageId.NotFound"
# DeleteImages on an image that is already DELETING (or otherwise not deletable right now).
INCORRECT_STATE = "InvalidImageId.IncorrectState"
DELETING = "DELETING"
# A sent deletion whose image is still listed in a state other than DELETING this long after
# the call is withdrawn, to be judged afresh: the listing had time to catch up.
RESEND_AFTER = 120.0
BATCH = 100  # DescribeImages takes at most 100 ImageIds
CREATEFAILED = retention.CREATEFAILED
DELETABLE_STATES = (retention.NORMAL, CREATEFAILED)
# Advisory-lock namespace ("CVBR"): the two-int form keeps us apart from single-bigint locks.
LOCK_NAMESPACE = 0x43564252

Conn = Any  # an asyncpg connection (pool proxies included)

# `syncing`: a copy of the image into another region is still running (its copy job has not
# ended). Such a source is never deleted, by retention or by quota rotation: DeleteImages
# refuses it while the sync runs, and deleting it could lose the copy.
_LIVE_COLUMNS = """
    i.image_id, i.account, i.region, i.policy_id, i.instance_id, i.job_id, i.state,
    i.created_at, i.delete_requested_at, i.delete_reason, i.delete_sent_at, i.delete_kind,
    i.source_image_id,
    EXISTS (SELECT 1 FROM jobs cj WHERE cj.kind = 'copy' AND cj.source_image_id = i.image_id
            AND cj.finished_at IS NULL) AS syncing
"""

# The policy's own rules: for its backups, in its own region.
_POLICY_RULES = """
    p.timezone, p.keep_last, p.keep_daily, p.keep_weekly, p.keep_monthly, p.keep_yearly,
    p.max_age_days, p.on_quota, true AS has_rules
"""

# The rules of each image row: a backup keeps by its policy's rules, a copy (source_image_id
# set) by its destination's entry in policies.copies. A copy whose destination is no longer in
# the policy has no rules (has_rules false): retention skips it, so it is kept, never wiped.
_IMAGE_RULES = """
    p.timezone, p.on_quota,
    i.source_image_id IS NULL
        OR p.copies @> jsonb_build_array(jsonb_build_object('region', i.region)) AS has_rules,
    CASE WHEN i.source_image_id IS NULL THEN p.keep_last
         ELSE cvm_backup_copy_rule(p.copies, i.region, 'keep_last') END AS keep_last,
    CASE WHEN i.source_image_id IS NULL THEN p.keep_daily
         ELSE cvm_backup_copy_rule(p.copies, i.region, 'keep_daily') END AS keep_daily,
    CASE WHEN i.source_image_id IS NULL THEN p.keep_weekly
         ELSE cvm_backup_copy_rule(p.copies, i.region, 'keep_weekly') END AS keep_weekly,
    CASE WHEN i.source_image_id IS NULL THEN p.keep_monthly
         ELSE cvm_backup_copy_rule(p.copies, i.region, 'keep_monthly') END AS keep_monthly,
    CASE WHEN i.source_image_id IS NULL THEN p.keep_yearly
         ELSE cvm_backup_copy_rule(p.copies, i.region, 'keep_yearly') END AS keep_yearly,
    CASE WHEN i.source_image_id IS NULL THEN p.max_age_days
         ELSE cvm_backup_copy_rule(p.copies, i.region, 'max_age_days') END AS max_age_days
"""

_INSTANCE_IMAGES = f"""
SELECT {_LIVE_COLUMNS} FROM images i
WHERE i.policy_id = $1 AND i.instance_id = $2 AND i.account = $3 AND i.region = $4
  AND i.deleted_at IS NULL
"""

REGION_IMAGES = f"""
SELECT {_LIVE_COLUMNS}, {_IMAGE_RULES} FROM images i JOIN policies p ON p.id = i.policy_id
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

_SENT = """
UPDATE images SET delete_sent_at = now(), delete_kind = $2
WHERE image_id = $1 AND deleted_at IS NULL AND delete_sent_at IS NULL
"""

_WITHDRAW = """
UPDATE images SET delete_requested_at = NULL, delete_reason = NULL, delete_sent_at = NULL,
                  delete_kind = NULL
WHERE image_id = $1 AND deleted_at IS NULL
"""

# Deletions sent and not yet confirmed, per region: what `confirm_deletions` follows.
_SENT_ROWS = f"""
SELECT {_LIVE_COLUMNS}, now() - i.delete_sent_at AS sent_ago FROM images i
WHERE i.account = $1 AND i.region = $2 AND i.delete_sent_at IS NOT NULL AND i.deleted_at IS NULL
ORDER BY i.image_id
"""

_SENT_REGIONS = """
SELECT DISTINCT account, region FROM images
WHERE delete_sent_at IS NOT NULL AND deleted_at IS NULL
ORDER BY account, region
"""

# Images still being built in the region, or deletions not yet confirmed: either will free or
# make room soon, so a quota-blocked job should wait rather than fail. A released 'creating'
# job counts too: its last CreateImage may have made an image we do not know the id of yet.
# Jobs holding a lease (the caller among them) do not: two quota-blocked jobs would otherwise
# wait on each other until their windows closed.
_IN_FLIGHT = """
SELECT EXISTS (SELECT 1 FROM images WHERE account = $1 AND region = $2 AND deleted_at IS NULL
                 AND (state IN ('CREATING', 'SYNCING') OR delete_requested_at IS NOT NULL))
    OR EXISTS (SELECT 1 FROM jobs WHERE account = $1 AND region = $2 AND finished_at IS NULL
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
    delete_sent_at: datetime | None = None
    delete_kind: str | None = None
    source_image_id: str | None = None  # set for a copy: the backup it was made from
    syncing: bool = False  # a copy of it into another region is still running

    @classmethod
    def from_record(cls, row: Any) -> LiveImage:
        """From a row carrying at least the live columns (the deletion's progress optional)."""
        keys = set(row.keys())
        return cls(**{name: row[name] for name in cls.__dataclass_fields__ if name in keys})

    @property
    def deleting(self) -> bool:
        """Whether a deletion of it is under way (intent written, maybe sent)."""
        return self.delete_requested_at is not None

    @property
    def candidate(self) -> Candidate:
        """As a retention candidate (every image in our table is ours)."""
        pinned = "a copy of it into another region is still running" if self.syncing else None
        return Candidate(self.image_id, self.created_at, self.state, ours=True, pinned=pinned)


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


async def _sent(conn: Conn, kind: str, image: LiveImage, reason: str, **details: Any) -> None:
    async with conn.transaction():
        await conn.execute(_SENT, image.image_id, kind)
        await record_event(conn, f"{kind}.delete_sent", image, reason, **details)
    log.info(
        f"{kind}.delete_sent",
        image_id=image.image_id,
        policy_id=image.policy_id,
        instance_id=image.instance_id,
        region=image.region,
        reason=reason,
        **details,
    )


async def delete_image(
    ctx: EngineContext, conn: Conn, kind: str, image: LiveImage, reason: str
) -> bool:
    """Intent, then DeleteImages; True once the call went out or the image was found gone.

    The row is `deleted` only when DescribeImages no longer lists the image
    (`confirm_deletions`). `kind` names the events. A deletion already sent is not sent again.
    """
    if image.delete_sent_at is not None:
        return True
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
        return await _refused(ctx, conn, kind, image, reason=reason, exc=exc)
    await _sent(conn, kind, image, reason, request_id=request_id, delete_binded_snap=snap)
    return True


async def _refused(
    ctx: EngineContext, conn: Conn, kind: str, image: LiveImage, *, reason: str, exc: TencentError
) -> bool:
    if exc.code == NOT_FOUND:
        await _confirm(conn, kind, image, reason, already_gone=True, request_id=exc.request_id)
        return True
    if exc.code == INCORRECT_STATE and await _listed_deleting(ctx, image):
        # Already DELETING (a send whose answer was lost, or someone else's): follow it like
        # one of ours. Any other state (still being built there, say) withdraws the intent.
        await _sent(conn, kind, image, reason, request_id=exc.request_id, already_deleting=True)
        return True
    await _failed(conn, kind, image, reason, exc)
    return False


async def _listed_deleting(ctx: EngineContext, image: LiveImage) -> bool:
    try:
        listed = await _listed(ctx, image.account, image.region, [image.image_id])
    except TencentError:
        return False  # cannot tell: the intent is withdrawn and judged afresh next time
    found = listed.get(image.image_id)
    return found is not None and found.state == DELETING


async def finish_pending(
    ctx: EngineContext, conn: Conn, kind: str, images: Iterable[LiveImage]
) -> list[str]:
    """Re-issue intents a crash or a transient error left unsent; sent ones are only followed."""
    done = []
    for image in images:
        if image.delete_requested_at is None or image.delete_sent_at is not None:
            continue
        reason = image.delete_reason or "pending intent"
        if await delete_image(ctx, conn, kind, image, reason):
            done.append(image.image_id)
    return done


# -- confirming deletions ---------------------------------------------------------------------


async def _listed(
    ctx: EngineContext, account: str, region: str, ids: Sequence[str]
) -> dict[str, Image]:
    """The images of `ids` DescribeImages still lists, by id."""
    client = ctx.client(account)
    found: dict[str, Image] = {}
    for start in range(0, len(ids), BATCH):
        chunk = list(ids[start : start + BATCH])
        page = await client.describe_images(region, image_ids=chunk, limit=BATCH)
        found.update((i.image_id, i) for i in page.images)
    return found


async def confirm_deletions(
    ctx: EngineContext, conn: Conn, account: str, region: str, only: Collection[str] = ()
) -> list[str]:
    """Confirm the sent deletions (of `only`, when given) whose image is no longer listed.

    A DELETING image is not yet gone; one listed in another state long after the call is
    withdrawn so the next pass judges it afresh. The ids confirmed.
    """
    rows = await conn.fetch(_SENT_ROWS, account, region)
    rows = [r for r in rows if not only or r["image_id"] in only]
    if not rows:
        return []
    listed = await _listed(ctx, account, region, [r["image_id"] for r in rows])
    gone = []
    for row in rows:
        image = LiveImage.from_record(row)
        kind = image.delete_kind or "rotation"
        reason = image.delete_reason or "pending intent"
        seen = listed.get(image.image_id)
        if seen is None:
            await _confirm(conn, kind, image, reason, delete_sent_at=image.delete_sent_at)
            gone.append(image.image_id)
        elif seen.state != DELETING and row["sent_ago"].total_seconds() >= RESEND_AFTER:
            await _still_listed(conn, kind, image, reason, seen.state)
    return gone


async def _still_listed(conn: Conn, kind: str, image: LiveImage, reason: str, state: str) -> None:
    async with conn.transaction():
        await conn.execute(_WITHDRAW, image.image_id)
        await record_event(conn, f"{kind}.delete_failed", image, reason, listed_state=state)
    log.warning(
        f"{kind}.delete_failed",
        image_id=image.image_id,
        region=image.region,
        listed_state=state,
        retry=True,
        hint="DeleteImages answered but the image is still listed: it is judged afresh",
    )


async def confirm_everywhere(ctx: EngineContext, accounts: Collection[str]) -> int:
    """One confirmation pass over every region with sent deletions of `accounts`."""
    confirmed = 0
    for row in await ctx.pool.fetch(_SENT_REGIONS):
        account, region = row["account"], row["region"]
        if account not in accounts:
            continue
        try:
            # Under the lock: a rotation measuring meanwhile must see a confirmation either
            # both in the listing and the table or in neither, or it would evict one too many.
            async with region_lock(ctx, account, region) as conn:
                confirmed += len(await confirm_deletions(ctx, conn, account, region))
        except TencentError as exc:
            # Cannot tell now: the deletions stay in flight and the next pass looks again.
            log.warning("rotation.confirm_failed", account=account, region=region, code=exc.code)
    return confirmed


# -- retention after a backup -----------------------------------------------------------------


def rules_of(row: Any) -> Rules:
    """A row's retention rules (the policy's, or a copy destination's)."""
    if not row.get("has_rules", True):
        raise Unevaluable("a copy whose destination is no longer in the policy: kept")
    return Rules(
        keep_last=row["keep_last"] or 0,
        keep_daily=row["keep_daily"] or 0,
        keep_weekly=row["keep_weekly"] or 0,
        keep_monthly=row["keep_monthly"] or 0,
        keep_yearly=row["keep_yearly"] or 0,
        max_age_days=row["max_age_days"],
    )


class Unevaluable(Exception):
    """A policy row whose rules cannot be applied (a timezone zoneinfo does not know)."""


def zone_of(name: str) -> ZoneInfo:
    """The policy's zone; Unevaluable when zoneinfo does not know it (the CHECK sees only form)."""
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise Unevaluable(f"timezone {name!r} is not an IANA zone: {exc!r}") from None


def _decide(row: Any, images: Sequence[LiveImage]) -> list[Decision]:
    """Retention over the images with no pending intent (those are already going)."""
    zone_of(row["timezone"])
    live = [i.candidate for i in images if i.delete_requested_at is None]
    return retention.decide(rules_of(row), row["timezone"], datetime.now(UTC), live)


def decide_or_skip(row: Any, images: Sequence[LiveImage]) -> list[Decision] | None:
    """`_decide`, or None (logged `retention.skipped`) for a row whose rules cannot apply."""
    try:
        return _decide(row, images)
    except Unevaluable as exc:
        first = images[0] if images else None
        log.warning(
            "retention.skipped",
            policy_id=None if first is None else first.policy_id,
            instance_id=None if first is None else first.instance_id,
            reason=str(exc),
        )
        return None


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
            deleted = await finish_pending(ctx, conn, "retention", images)
            decisions = decide_or_skip(policy, images) or []
            await _record_keeps(conn, images, decisions)
            by_id = {i.image_id: i for i in images}
            # Oldest first: a sweep cut short leaves the newer images, not holes in the middle.
            for d in reversed(retention.deletions(decisions)):
                if await delete_image(ctx, conn, "retention", by_id[d.image_id], d.reasons[0]):
                    deleted.append(d.image_id)
            if deleted:
                await confirm_soon(ctx, conn, account, region, deleted)
    return deleted


async def confirm_soon(
    ctx: EngineContext, conn: Conn, account: str, region: str, sent: Collection[str]
) -> int:
    """Confirm what is already gone of `sent` (empty: of every sent deletion in the region).

    What is not gone yet is followed by the tracker (`confirm_everywhere`).
    """
    try:
        return len(await confirm_deletions(ctx, conn, account, region, only=sent))
    except TencentError as exc:
        log.warning("rotation.confirm_failed", account=account, region=region, code=exc.code)
        return 0


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
    groups = per_instance(rows)
    keeps: list[EventRow] = []
    loud: list[Pair] = []
    for group in groups:
        images = [LiveImage.from_record(r) for r in group]
        decisions = decide_or_skip(group[0], images)
        if decisions is None:
            continue
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

# Jobs that may still need a unit of quota: not yet created, or mid-call with no image id yet
# (the caller, whose CreateImage just answered ImageQuotaLimitExceeded, among them). Counted
# once each, whichever replica holds them; `measure` drops those whose image is already there.
_NEED = """
SELECT image_name FROM jobs
WHERE account = $1 AND region = $2 AND finished_at IS NULL
  AND (state IN ('pending', 'claimed') OR (state = 'creating' AND image_id IS NULL) OR id = $3)
"""

_PRIVATE = (Filter("image-type", ("PRIVATE_IMAGE",)),)


def _newest_normal(images: Iterable[LiveImage]) -> LiveImage | None:
    normal = [i for i in images if i.state == retention.NORMAL]
    return max(normal, key=lambda i: (i.created_at, i.image_id), default=None)


# (image, reason): one eviction, in order.
Eviction = tuple[LiveImage, str]
RANK_FAILED = "quota_eviction rank 1: CREATEFAILED image"
RANK_RELEASED = "quota_eviction rank 2: no retention rule keeps it"
RANK_OWN = "quota_eviction rank 3: oldest of the requesting policy with a newer NORMAL image"
RANK_OTHER = "quota_eviction rank 4: oldest of another rotate policy with a newer NORMAL image"


def _by_age(items: Iterable[Eviction]) -> list[Eviction]:
    return sorted(items, key=lambda item: (item[0].created_at, item[0].image_id))


def per_instance(rows: Sequence[Any]) -> list[list[Any]]:
    groups: dict[tuple[int, str], list[Any]] = defaultdict(list)
    for row in rows:
        groups[(row["policy_id"], row["instance_id"])].append(row)
    return list(groups.values())


@dataclass
class _Ranks:
    """The region's evictable images, rank by rank; rank 3 and 4 as (depth, image) pairs."""

    failed: list[Eviction]
    released: list[Eviction]
    own: list[tuple[int, Eviction]]
    other: list[tuple[int, Eviction]]

    def order(self) -> list[Eviction]:
        # Ranks 3 and 4 go round the instances: each loses its oldest image before any loses
        # its second oldest, so no instance is thinned far below the others.
        def spread(items: list[tuple[int, Eviction]]) -> list[Eviction]:
            ordered = sorted(items, key=lambda d: (d[0], d[1][0].created_at, d[1][0].image_id))
            return [e for _, e in ordered]

        return _by_age(self.failed) + _by_age(self.released) + spread(self.own) + spread(self.other)


def _rank_pair(ranks: _Ranks, group: Sequence[Any], requester: int | None) -> None:
    images = [LiveImage.from_record(r) for r in group]
    settled = [
        i for i in images if not i.deleting and not i.syncing and i.state in DELETABLE_STATES
    ]
    ranks.failed += [(i, RANK_FAILED) for i in settled if i.state == CREATEFAILED]
    decisions = decide_or_skip(group[0], images)
    # A pair whose rules cannot be read is never released by them, nor taken when its policy
    # says fail: nothing then tells what its retention keeps.
    kept = {i.image_id for i in settled} if decisions is None else _kept(decisions)
    normal = [i for i in settled if i.state == retention.NORMAL]
    ranks.released += [(i, RANK_RELEASED) for i in normal if i.image_id not in kept]
    newest = _newest_normal(i for i in images if not i.deleting)
    if group[0]["on_quota"] != "rotate" or newest is None:
        return
    older = sorted(
        (i for i in normal if i.image_id in kept and i is not newest),
        key=lambda i: (i.created_at, i.image_id),
    )
    own = group[0]["policy_id"] == requester
    target, reason = (ranks.own, RANK_OWN) if own else (ranks.other, RANK_OTHER)
    target += [(depth, (i, reason)) for depth, i in enumerate(older)]


def _kept(decisions: Iterable[Decision]) -> set[str]:
    return {d.image_id for d in decisions if d.keep}


def eviction_order(rows: Sequence[Any], requester: int | None = None) -> list[Eviction]:
    """Our images of a region in eviction order, each with its reason (the rank).

    (1) our CREATEFAILED images; (2) NORMAL images no retention rule keeps (any policy);
    (3) the requesting policy's oldest image of each instance that has a newer NORMAL one;
    (4) the same for other `rotate` policies. Never the newest NORMAL image of a
    (policy, instance); never an image of an `on_quota = "fail"` policy its retention keeps;
    never an image whose deletion is already under way.
    """
    ranks = _Ranks([], [], [], [])
    for group in per_instance(rows):
        _rank_pair(ranks, group, requester)
    return ranks.order()


@dataclass(frozen=True, slots=True)
class Picture:
    """The region's quota as measured under the lock."""

    quota: int
    occupied: int  # images listed, and ours not (yet) listed, DELETING ones included
    going: int  # ours whose deletion is under way: room once they are gone
    need: int  # jobs that still need a unit of quota
    # Jobs whose image is already there but not yet recorded (an answer lost to a fault): once
    # adopted and NORMAL, their older images become evictable, so room is still coming.
    unrecorded: int = 0

    @property
    def room(self) -> int:
        """Units free right now."""
        return max(self.quota - self.occupied, 0)

    @property
    def deficit(self) -> int:
        """How many more images must go so every job that needs room gets it."""
        return max(self.need - self.room - self.going, 0)


async def _private(ctx: EngineContext, account: str, region: str) -> dict[str, str]:
    """Every private image DescribeImages lists in the region (DELETING included): id -> name."""
    client = ctx.client(account)
    found: dict[str, str] = {}
    offset = 0
    while True:
        page = await client.describe_images(region, filters=_PRIVATE, offset=offset, limit=BATCH)
        found.update((i.image_id, i.name) for i in page.images)
        offset += len(page.images)
        if not page.images or offset >= page.total_count:
            return found


async def measure(
    ctx: EngineContext, conn: Conn, account: str, region: str, job_id: int | None
) -> Picture:
    """Quota, what occupies it, what is going, and what is needed, in one region."""
    quota = await ctx.client(account).describe_image_quota(region)
    listed = await _private(ctx, account, region)
    rows = await conn.fetch(
        "SELECT image_id, name, delete_requested_at FROM images"
        " WHERE account = $1 AND region = $2 AND deleted_at IS NULL",
        account,
        region,
    )
    # A new image may not be listed yet (listing lag) but already holds its unit: the union.
    occupied = set(listed) | {r["image_id"] for r in rows}
    going = sum(1 for r in rows if r["delete_requested_at"] is not None)
    # Read last, so a job that made its image meanwhile errs toward evicting too little (its
    # CreateImage meets the quota again and asks anew), never too much. A job whose image is
    # already there (its answer not yet recorded) holds its unit: it is occupied, not needed.
    made = set(listed.values()) | {r["name"] for r in rows}
    names = [r["image_name"] for r in await conn.fetch(_NEED, account, region, job_id)]
    need = sum(1 for name in names if name not in made)
    unrecorded = len(names) - need
    return Picture(
        quota=quota, occupied=len(occupied), going=going, need=need, unrecorded=unrecorded
    )


@dataclass(frozen=True, slots=True)
class RotationResult:
    """What a quota rotation found and did.

    `room`: units free now (the caller may use them); `deleted`: deletions sent this time;
    `wait`: room is coming (deletions under way, our images being built); `exhausted`: it never
    will by anything we can delete.
    """

    room: int = 0
    wait: bool = False
    exhausted: bool = False
    deleted: tuple[str, ...] = ()
    picture: Picture | None = None

    @property
    def freed(self) -> int:
        """Units usable now (kept for callers that only ask whether room exists)."""
        return self.room


async def _evict(
    ctx: EngineContext, conn: Conn, rows: Sequence[Any], picture: Picture, requester: int | None
) -> list[str]:
    sent: list[str] = []
    for image, reason in eviction_order(rows, requester):
        if len(sent) >= picture.deficit:
            break
        if await delete_image(ctx, conn, "rotation", image, reason):
            sent.append(image.image_id)
    return sent


async def _conclude(
    conn: Conn, account: str, region: str, picture: Picture, *, sent: list[str], gone: int
) -> RotationResult:
    deleted = tuple(sent)
    room = picture.room + gone  # deletions confirmed right away are room already
    if room > 0:
        return RotationResult(room=room, deleted=deleted, picture=picture)
    coming = sent or picture.going or picture.unrecorded
    if coming or await conn.fetchval(_IN_FLIGHT, account, region):
        log.info("rotation.waiting", account=account, region=region, going=picture.going)
        return RotationResult(wait=True, deleted=deleted, picture=picture)
    log.error("quota.exhausted", account=account, region=region)
    await conn.execute(
        "INSERT INTO events (kind, account, region, reason) VALUES ('quota.exhausted', $1, $2, $3)",
        account,
        region,
        "no image of ours is eligible for eviction and none is being built",
    )
    return RotationResult(exhausted=True, picture=picture)


async def rotate_for_quota(
    ctx: EngineContext,
    account: str,
    region: str,
    *,
    job_id: int | None = None,
    policy_id: int | None = None,
) -> RotationResult:
    """Free exactly the quota the region's waiting jobs lack; one rotation at a time per region.

    `job_id`, `policy_id`: the job that met the full quota (counted once among those that need
    room) and its policy (whose images go before other policies').
    """
    async with region_lock(ctx, account, region) as conn:
        await confirm_soon(ctx, conn, account, region, ())
        rows = await conn.fetch(REGION_IMAGES, account, region)
        images = [LiveImage.from_record(r) for r in rows]
        finished = await finish_pending(ctx, conn, "rotation", images)
        rows = await conn.fetch(REGION_IMAGES, account, region)
        try:
            picture = await measure(ctx, conn, account, region, job_id)
        except TencentError as exc:
            # Without a measure nothing is deleted: the gate's backoff brings a new try.
            log.warning("rotation.measure_failed", account=account, region=region, code=exc.code)
            return RotationResult(wait=True)
        sent = finished + await _evict(ctx, conn, rows, picture, policy_id)
        log.info(
            "rotation.measured",
            account=account,
            region=region,
            quota=picture.quota,
            occupied=picture.occupied,
            going=picture.going,
            need=picture.need,
            unrecorded=picture.unrecorded,
            evicted=len(sent),
        )
        gone = await confirm_soon(ctx, conn, account, region, sent) if sent else 0
        return await _conclude(conn, account, region, picture, sent=sent, gone=gone)
