"""The tracker: follows each image of ours from CREATING to NORMAL or CREATEFAILED.

What it tracks: jobs in `waiting_image` (their image id is known) and images recorded as
CREATING whose job has already ended (expired, say): a finished build still matters for
retention and quota. It asks DescribeImages by ImageIds, up to 100 per call, per
(account, region), at an interval that adapts to how many images are in flight; once it has
seen builds finish it also times polls to just after the next images are expected to, so an
image is recorded soon after it is ready, not up to a whole interval later (`next_poll`).

- NORMAL: the image is ready (ready_at, size), its job succeeds, then retention runs for that
  (policy, instance).
- CREATEFAILED: the job fails with `ImageCreateFailed`, and the image is deleted (intent first)
  since it holds a unit of image quota.
- Not returned at all: not listed *yet*, while its job waits. The real API can leave a new
  image out of DescribeImages for a while after CreateImage answered, so the job waits until
  its completion window closes, then expires (`window_closed`) and its images row (CREATING)
  goes on following the image. A jobless image still not listed LISTING_GRACE after it was
  recorded has vanished (VANISHED, nothing to delete).
- DescribeImages failing: the batch stays in flight and its jobs past their window expire all
  the same; that (account, region) is not asked again before `tracker_min_interval`. An
  account-class answer pauses the account (or the region, for a CAM denial) instead: the
  tracker leaves it alone until the prober resumes it (orchestrator.pauses).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from orchestrator import jobs as job_rows
from orchestrator import logs, pauses, retention, rotation, sweep, waits
from orchestrator.config import DEFAULT_LIMITS, Settings
from orchestrator.context import EngineContext
from orchestrator.db.resilience import DB_ERRORS, DbWatch
from orchestrator.rotation import Conn, LiveImage
from orchestrator.tencent.errors import ErrorClass, TencentError
from orchestrator.tencent.models import Image

log = logs.get("tracker")

BATCH = 100  # DescribeImages takes at most 100 ImageIds
POLL_CONCURRENCY = 4  # DescribeImages batches of one round in flight at once
# A new image can be missing from DescribeImages for a while after CreateImage answered;
# Terraform's tencentcloud provider retries such an empty answer for up to an hour. Only a
# jobless image not listed this long after it was recorded is taken for vanished.
LISTING_GRACE = timedelta(hours=1)
FAILED_CODE = "ImageCreateFailed"
# How many recent builds the estimate of a build's length looks at, and the quantile it takes.
BUILD_SAMPLES = 200
BUILD_QUANTILE = 0.05
# The accounts whose lease this replica holds; None: every account (a single daemon, tests).
Held = Callable[[], Collection[str]] | None
# What one DescribeImages batch covers: (account, region).
Pair = tuple[str, str]

_TRACKED = """
SELECT j.image_id, j.account, j.region, j.policy_id, j.instance_id, j.id AS job_id,
       j.image_name AS name, j.slot, coalesce(i.created_at, j.updated_at) AS recorded_at,
       j.deadline, i.state, j.source_image_id
FROM jobs j LEFT JOIN images i ON i.image_id = j.image_id
WHERE j.state = 'waiting_image'
  -- A paused account's API is left alone until it resumes (orchestrator.pauses); a pause
  -- covers the whole account (scope_region NULL) or one region (a CAM denial).
  AND NOT EXISTS (SELECT 1 FROM account_pauses ap WHERE ap.account = j.account
                  AND (ap.scope_region IS NULL OR ap.scope_region = j.region))
UNION ALL
SELECT i.image_id, i.account, i.region, i.policy_id, i.instance_id, NULL, i.name, i.slot,
       i.created_at, NULL, i.state, i.source_image_id
FROM images i
WHERE i.state IN ('CREATING', 'SYNCING') AND i.deleted_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.image_id = i.image_id AND j.state = 'waiting_image')
  AND NOT EXISTS (SELECT 1 FROM account_pauses ap WHERE ap.account = i.account
                  AND (ap.scope_region IS NULL OR ap.scope_region = i.region))
"""

# The dispatcher records the image row with the job; the upsert also covers a job that reached
# waiting_image without one, so an image we made is never left out of our table.
_UPSERT_IMAGE = """
INSERT INTO images (image_id, name, account, region, instance_id, policy_id, slot, job_id,
                    state, size_gb, ready_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, CASE WHEN $9 = 'NORMAL' THEN now() END)
ON CONFLICT (image_id) DO UPDATE
SET state = EXCLUDED.state,
    size_gb = coalesce(EXCLUDED.size_gb, images.size_gb),
    ready_at = coalesce(images.ready_at, EXCLUDED.ready_at)
RETURNING image_id, account, region, policy_id, instance_id, job_id, state, created_at,
          delete_requested_at, delete_reason
"""

# Every image of a poll that became NORMAL, in one statement.
_UPSERT_READY = """
INSERT INTO images (image_id, name, account, region, instance_id, policy_id, slot, job_id,
                    state, size_gb, ready_at, source_image_id)
SELECT u.image_id, u.name, u.account, u.region, u.instance_id, u.policy_id, u.slot, u.job_id,
       'NORMAL', u.size_gb, now(), (SELECT j.source_image_id FROM jobs j WHERE j.id = u.job_id)
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
            $7::timestamptz[], $8::bigint[], $9::integer[])
     AS u(image_id, name, account, region, instance_id, policy_id, slot, job_id, size_gb)
ON CONFLICT (image_id) DO UPDATE
SET state = EXCLUDED.state,
    size_gb = coalesce(EXCLUDED.size_gb, images.size_gb),
    ready_at = coalesce(images.ready_at, EXCLUDED.ready_at)
RETURNING image_id, account, region, policy_id, instance_id, job_id, state, created_at,
          delete_requested_at, delete_reason
"""

_SUCCEED_JOBS = """
UPDATE jobs SET state = 'succeeded', reason = 'image_ready', finished_at = now(),
                updated_at = now(), lease_owner = NULL, lease_expires_at = NULL
WHERE id = ANY($1::bigint[]) AND state = 'waiting_image'
RETURNING id
"""

# The completion window closed while the image was still being built. The image stays
# tracked through its images row (state CREATING), for retention and quota.
_EXPIRE_JOB = """
UPDATE jobs SET state = 'expired', reason = 'window_closed', finished_at = now(),
                updated_at = now(), lease_owner = NULL, lease_expires_at = NULL
WHERE id = $1 AND state = 'waiting_image'
"""

# The window closed and the image was not seen (not listed yet, or DescribeImages failing): the
# row keeps following it, as CREATING, what CreateImage left it in. A row already there stays
# (no conflict target: the job's own row, under whichever unique key, is that row).
_RECORD_UNSEEN = """
INSERT INTO images (image_id, name, account, region, instance_id, policy_id, slot, job_id,
                    state, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'CREATING', $9)
ON CONFLICT DO NOTHING
"""

_FAIL_JOB = """
UPDATE jobs SET state = 'failed', reason = $2, last_error_code = $3, last_error_message = $4,
                finished_at = now(), updated_at = now(), lease_owner = NULL,
                lease_expires_at = NULL
WHERE id = $1 AND state = 'waiting_image'
"""

# A vanished image is gone from our point of view too: intent and confirmation at once, so the
# row satisfies the two-phase CHECKs and is never a candidate again.
_VANISHED = """
UPDATE images SET state = 'VANISHED', delete_requested_at = coalesce(delete_requested_at, now()),
                  delete_reason = coalesce(delete_reason, $2), deleted_at = now()
WHERE image_id = $1 AND deleted_at IS NULL
"""


@dataclass(frozen=True, slots=True)
class Tracked:
    """An image being built, and the job waiting on it (None when the job already ended)."""

    image_id: str
    account: str
    region: str
    policy_id: int
    instance_id: str
    job_id: int | None
    name: str
    slot: datetime
    recorded_at: datetime
    deadline: datetime | None
    state: str | None  # as recorded in our images table; None when there is no row yet
    source_image_id: str | None = None  # a copy's source; None for a backup

    def live(self, state: str) -> LiveImage:
        """As a live image row in `state` (for ledger rows before the images row exists)."""
        return LiveImage(
            self.image_id,
            self.account,
            self.region,
            self.policy_id,
            self.instance_id,
            self.job_id,
            state,
            self.recorded_at,
            None,
            None,
        )


# -- outcomes ---------------------------------------------------------------------------------


def _state(image: Image) -> str:
    # An answer without ImageState is recorded as such: unknown, so never deletable.
    return image.state or "UNKNOWN"


async def _upsert(conn: Conn, t: Tracked, image: Image) -> LiveImage:
    row = await conn.fetchrow(
        _UPSERT_IMAGE,
        t.image_id,
        t.name,
        t.account,
        t.region,
        t.instance_id,
        t.policy_id,
        t.slot,
        t.job_id,
        _state(image),
        image.size_gib,
    )
    return LiveImage.from_record(row)


async def _finish_job(conn: Conn, t: Tracked, sql: str, *args: Any) -> bool:
    if t.job_id is None:
        return False
    return bool(await conn.execute(sql, t.job_id, *args) == "UPDATE 1")


def _ready_columns(ready: Sequence[tuple[Tracked, Image]]) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(9)]
    for t, image in ready:
        values = (t.image_id, t.name, t.account, t.region, t.instance_id, t.policy_id, t.slot)
        for column, value in zip(columns, (*values, t.job_id, image.size_gib), strict=True):
            column.append(value)
    return columns


async def _ready(ctx: EngineContext, ready: Sequence[tuple[Tracked, Image]]) -> None:
    """Record images that became NORMAL and succeed their jobs: one transaction for them all."""
    if not ready:
        return
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_UPSERT_READY, *_ready_columns(ready))
        lives = {r["image_id"]: LiveImage.from_record(r) for r in rows}
        jobs = [t.job_id for t, _ in ready if t.job_id is not None]
        succeeded = {r["id"] for r in await conn.fetch(_SUCCEED_JOBS, jobs)}
        copies = await job_rows.schedule_copies(conn, sorted(succeeded))
        ledger: list[rotation.EventRow] = []
        for t, image in ready:
            live = lives[t.image_id]
            ledger.append(("image.ready", live, None, {"size_gb": image.size_gib}))
            if t.job_id in succeeded:
                ledger.append(("job.succeeded", live, "image_ready", {}))
        await rotation.record_events(conn, ledger)
    for t, image in ready:
        _log_ready(t, image, t.job_id in succeeded)
    for copy in copies:
        log.info(
            "copy.scheduled",
            job=copy["id"],
            region=copy["region"],
            source_image_id=copy["source_image_id"],
        )


def _bound(t: Tracked) -> contextlib.AbstractContextManager[None]:
    """Log lines inside name the image's policy, instance and job."""
    return structlog.contextvars.bound_contextvars(
        policy_id=t.policy_id, instance_id=t.instance_id, job_id=t.job_id
    )


def _log_ready(t: Tracked, image: Image, succeeded: bool) -> None:
    with _bound(t):
        log.info("image.ready", image_id=t.image_id, size_gb=image.size_gib)
        if succeeded:
            log.info("job.succeeded", image_id=t.image_id)


async def _failed(ctx: EngineContext, t: Tracked, image: Image) -> None:
    message = f"image {t.image_id} ended in CREATEFAILED"
    async with ctx.pool.acquire() as conn, conn.transaction():
        live = await _upsert(conn, t, image)
        await rotation.record_event(conn, "image.failed", live, message)
        failed = await _finish_job(conn, t, _FAIL_JOB, "image_failed", FAILED_CODE, message)
        if failed:
            await rotation.record_event(conn, "job.failed", live, message, code=FAILED_CODE)
        # The intent commits with the failure: a crash right after still frees the quota.
        pending = await rotation.request_delete(conn, "image", live, "CREATEFAILED: frees quota")
    log.warning("image.failed", image_id=t.image_id)
    if failed:
        log.warning("job.failed", image_id=t.image_id, code=FAILED_CODE, message=message)
    if pending is not None:
        async with rotation.region_lock(ctx, t.account, t.region) as conn:
            if await rotation.delete_image(
                ctx, conn, "image", pending, "CREATEFAILED: frees quota"
            ):
                await rotation.confirm_soon(ctx, conn, t.account, t.region, [t.image_id])


async def _vanished(ctx: EngineContext, t: Tracked) -> None:
    # Only jobless images get here: a waiting job expires first (`_unlisted`).
    message = f"image {t.image_id} is not returned by DescribeImages"
    async with ctx.pool.acquire() as conn, conn.transaction():
        await conn.execute(_VANISHED, t.image_id, "vanished")
        await rotation.record_event(conn, "image.vanished", t.live("VANISHED"), message)
    log.warning("image.vanished", image_id=t.image_id, recorded_at=t.recorded_at.isoformat())


def _overdue(t: Tracked, now: datetime) -> bool:
    """Whether the image's job still waits though its completion window has closed."""
    return t.job_id is not None and t.deadline is not None and now > t.deadline


def _log_expired(t: Tracked) -> None:
    log.warning("job.expired", image_id=t.image_id, reason="window_closed")


async def _expire_unseen(ctx: EngineContext, t: Tracked) -> None:
    """Expire the job of an image not seen this poll; its row (CREATING) follows it on."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            _RECORD_UNSEEN,
            t.image_id,
            t.name,
            t.account,
            t.region,
            t.instance_id,
            t.policy_id,
            t.slot,
            t.job_id,
            t.recorded_at,
        )
        closed = await _finish_job(conn, t, _EXPIRE_JOB)
        if closed:
            await rotation.record_event(conn, "job.expired", t.live("CREATING"), "window_closed")
    if closed:
        _log_expired(t)


async def _unlisted(ctx: EngineContext, t: Tracked, now: datetime) -> bool:
    """An image DescribeImages did not return; True while it is still followed."""
    if t.job_id is not None:
        # Not listed yet, most likely (listing lag): the job waits out its window.
        if _overdue(t, now):
            await _expire_unseen(ctx, t)
        return True
    if now - t.recorded_at < LISTING_GRACE:
        return True
    await _vanished(ctx, t)
    return False


async def _still_building(ctx: EngineContext, t: Tracked, image: Image, now: datetime) -> None:
    expired = _overdue(t, now)
    if _state(image) == t.state and not expired:
        return  # the common case: nothing to write
    async with ctx.pool.acquire() as conn, conn.transaction():
        # Records a state change too (CREATING -> SYNCING, or a state we do not know).
        live = await _upsert(conn, t, image)
        closed = expired and await _finish_job(conn, t, _EXPIRE_JOB)
        if closed:
            await rotation.record_event(conn, "job.expired", live, "window_closed")
    if closed:
        _log_expired(t)


# -- one poll ---------------------------------------------------------------------------------


async def _describe(ctx: EngineContext, account: str, region: str, ids: list[str]) -> list[Image]:
    return await ctx.client(account).images_by_ids(region, ids)


async def _settle(ctx: EngineContext, t: Tracked, image: Image | None, now: datetime) -> bool:
    """Record what became of one image not NORMAL (see `_ready`); True while still in flight."""
    with _bound(t):
        if image is None:
            return await _unlisted(ctx, t, now)
        if image.state == retention.CREATEFAILED:
            await _failed(ctx, t, image)
            return False
        await _still_building(ctx, t, image, now)
        return True


class BuildClock:
    """How long builds take here: learned from images this process saw become NORMAL."""

    def __init__(self, samples: int = BUILD_SAMPLES, quantile: float = BUILD_QUANTILE) -> None:
        self._ages: deque[float] = deque(maxlen=samples)
        self._quantile = quantile

    def observe(self, age: float) -> None:
        """An image was seen NORMAL by a call sent `age` seconds after it was recorded."""
        if age >= 0:
            self._ages.append(age)

    def estimate(self) -> float | None:
        """Seconds after its record that an image is expected NORMAL; None before any sample."""
        if not self._ages:
            return None
        # A low quantile: the poll at that age finds most builds done, yet the few odd fast
        # ones (an image adopted already NORMAL) do not drag it down.
        ordered = sorted(self._ages)
        return ordered[int(self._quantile * (len(ordered) - 1))]


def _observe(clock: BuildClock | None, asked: datetime, ready: Iterable[Tracked]) -> None:
    if clock is not None:
        for t in ready:
            clock.observe((asked - t.recorded_at).total_seconds())


async def _poll_batch(
    ctx: EngineContext, batch: Sequence[Tracked], clock: BuildClock | None = None
) -> tuple[list[Tracked], set[Tracked]]:
    """(still in flight, became NORMAL) for up to 100 images of one account and region."""
    first = batch[0]
    # Ages count from when the call was sent: what a poll timed by them can rely on.
    asked = datetime.now(UTC)
    found = await _describe(ctx, first.account, first.region, [t.image_id for t in batch])
    by_id = {image.image_id: image for image in found}
    now = datetime.now(UTC)
    in_flight: list[Tracked] = []
    ready: list[tuple[Tracked, Image]] = []
    for t in batch:
        image = by_id.get(t.image_id)
        if image is not None and image.state == retention.NORMAL:
            ready.append((t, image))  # the common outcome: recorded together below
        elif await _settle(ctx, t, image, now):
            in_flight.append(t)
    await _ready(ctx, ready)
    _observe(clock, asked, (t for t, _ in ready))
    return in_flight, {t for t, _ in ready}


def _pair(t: Tracked) -> Pair:
    return (t.account, t.region)


def _batches(tracked: Iterable[Tracked]) -> list[list[Tracked]]:
    groups: dict[tuple[str, str], list[Tracked]] = defaultdict(list)
    for t in tracked:
        groups[_pair(t)].append(t)
    return [g[i : i + BATCH] for g in groups.values() for i in range(0, len(g), BATCH)]


async def _tracked(ctx: EngineContext, held: Held = None) -> list[Tracked]:
    rows = await ctx.pool.fetch(_TRACKED)
    found = [Tracked(**dict(row)) for row in rows]
    if held is None:
        return found
    # Only the replica holding an account's lease calls its API (orchestrator.accounts).
    accounts = held()
    return [t for t in found if t.account in accounts]


async def _sweep_destinations(ctx: EngineContext, regions: Iterable[tuple[str, str]]) -> None:
    for account, region in sorted(regions):
        try:
            await sweep.sweep_region(ctx, account, region)
        except TencentError as exc:
            # The retention sweep passes over the region again on its own schedule.
            log.warning("retention.failed", account=account, region=region, code=exc.code)


async def _apply_retention(ctx: EngineContext, ready: Iterable[Tracked]) -> None:
    ready = list(ready)
    # A copy that is done unpins its source (retention at home may now let it go) and makes
    # older copies in its destination go by that destination's rules.
    await _sweep_destinations(ctx, {(t.account, t.region) for t in ready if t.source_image_id})
    # Pairs where nothing can go only get their keeps recorded, all at once.
    loud = await rotation.sweep_quiet(ctx, {(t.policy_id, t.instance_id) for t in ready})
    for policy_id, instance_id in loud:
        try:
            await rotation.apply_retention(ctx, policy_id, instance_id)
        except TencentError as exc:
            # Retention runs again after the next backup; a failed sweep loses nothing.
            log.warning(
                "retention.failed",
                policy_id=policy_id,
                instance_id=instance_id,
                code=exc.code,
                message=exc.message,
            )


async def poll_once(ctx: EngineContext, held: Held = None) -> int:
    """Poll every image in flight once (of `held` accounts); how many are still in flight."""
    return len((await _poll(ctx, await _tracked(ctx, held))).in_flight)


@dataclass(frozen=True, slots=True)
class _Polled:
    """One batch's poll: still in flight, became NORMAL, whether DescribeImages failed."""

    in_flight: list[Tracked]
    ready: set[Tracked]
    failed: bool = False


@dataclass(frozen=True, slots=True)
class _Round:
    """One poll of every batch: the images still in flight, the pairs whose call failed."""

    in_flight: list[Tracked]
    failed: set[Pair]


async def _poll(
    ctx: EngineContext, tracked: Iterable[Tracked], clock: BuildClock | None = None
) -> _Round:
    """Poll every image of `tracked` once."""
    # A few batches at a time: a round over thousands of images otherwise takes as many round
    # trips in a row, and its last images wait for all the others. The limiter still paces.
    gate = asyncio.Semaphore(POLL_CONCURRENCY)

    async def one(batch: list[Tracked]) -> _Polled:
        async with gate:
            return await _poll_or_keep(ctx, batch, clock)

    batches = _batches(tracked)
    results = await asyncio.gather(*(one(batch) for batch in batches))
    await _apply_retention(ctx, {t for r in results for t in r.ready})
    failed = {_pair(b[0]) for b, r in zip(batches, results, strict=True) if r.failed}
    return _Round([t for r in results for t in r.in_flight], failed)


async def _poll_or_keep(
    ctx: EngineContext, batch: list[Tracked], clock: BuildClock | None
) -> _Polled:
    """One batch polled; a failed DescribeImages keeps the batch in flight (or pauses it)."""
    try:
        in_flight, ready = await _poll_batch(ctx, batch, clock)
    except TencentError as exc:
        return await _poll_failed(ctx, batch, exc)
    return _Polled(in_flight, ready)


async def _poll_failed(ctx: EngineContext, batch: list[Tracked], exc: TencentError) -> _Polled:
    # The window holds without an answer too: a job must not wait forever on an API that fails.
    await _expire_overdue(ctx, batch, datetime.now(UTC))
    if exc.error_class is ErrorClass.ACCOUNT:
        # Asking again would only be refused again: the prober finds out when it is fixed.
        await _pause(ctx, batch[0], exc)
        return _Polled([], set(), failed=True)
    _log_poll_failed(batch[0], exc)
    return _Polled(batch, set(), failed=True)


async def _expire_overdue(ctx: EngineContext, batch: Iterable[Tracked], now: datetime) -> None:
    for t in batch:
        if _overdue(t, now):
            with _bound(t):
                await _expire_unseen(ctx, t)


def _log_poll_failed(t: Tracked, exc: TencentError) -> None:
    log.warning(
        "tracker.poll_failed",
        account=t.account,
        region=t.region,
        code=exc.code,
        message=exc.message,
        request_id=exc.request_id,
    )


async def _pause(ctx: EngineContext, t: Tracked, exc: TencentError) -> None:
    """Pause the account (or region) that refused DescribeImages for an account reason."""
    policy = await ctx.pool.fetchval("SELECT name FROM policies WHERE id = $1", t.policy_id)
    paused = await pauses.pause(
        ctx.pool,
        t.account,
        exc,
        region=t.region,
        instance_id=t.instance_id,
        first_probe=pauses.ProbeTimings().base,
        policy=policy,
    )
    if paused is not None:  # None: already paused, and said so by whoever paused it
        pauses.log_paused(log, paused, exc, default_action="DescribeImages")


# -- the loop ---------------------------------------------------------------------------------


# The share of DescribeImages' per-second limit the tracker's polls may use; the rest stays
# for the dispatcher's lookups by name and for other work on the same account.
POLL_SHARE = 0.25
# A poll timed to an expected finish is sent this long after it (clock reads and rounding).
_AFTER_FINISH = 0.01
# An image still building this long past its expected finish is looked at again as soon as the
# budget allows (when no later finish is due first): the estimate is a little off at times.
RECHECK = 0.5
# The shortest pause of the loop, so a failing statement cannot make it spin.
_MIN_PAUSE = 0.01
# Sent deletions are looked at this many ticks apart: a DELETING image takes seconds to
# minutes to go, and each look is one DescribeImages per region.
CONFIRM_TICKS = 4


def poll_gap(in_flight: int, settings: Settings) -> float:
    """The least seconds between polls that keeps them within POLL_SHARE of the call budget."""
    calls = math.ceil(in_flight / BATCH)
    return calls / (
        POLL_SHARE * settings.limits.get("DescribeImages", DEFAULT_LIMITS["DescribeImages"])
    )


def next_interval(in_flight: int, settings: Settings) -> float:
    """Seconds until the next poll: the max when idle, else the min within a call budget."""
    low, high = settings.tracker_min_interval, settings.tracker_max_interval
    if in_flight == 0:
        return high  # new images still wake the loop at once (it looks for them every tick)
    # Any image in flight may finish at any moment, so look as often as the min allows, unless
    # a poll (one call per 100 images) would spend more than our share of the call budget.
    return max(low, poll_gap(in_flight, settings))


def next_poll(sent: float, finishes: Iterable[float], *, regular: float, earliest: float) -> float:
    """When to poll: after the latest finish expected before `regular`, else at `regular`."""
    # A build expected to end before the regular poll is looked at just after it ends, so its
    # job is not recorded up to a whole interval late; the latest such finish, so a stream of
    # builds ending one after another costs no more polls than the regular cadence. One that
    # was expected by the poll just `sent` and is not done yet is looked at again as soon as
    # the call budget allows (`earliest`), never sooner.
    timed = [max(f, earliest) for f in finishes if sent - RECHECK < f <= regular]
    return max(timed, default=regular)


@dataclass(slots=True)
class _Cadence:
    """When the loop polls next (`due`), and before when it must not poll (`earliest`)."""

    due: float
    earliest: float

    def wants(self, now: float, new_images: bool) -> bool:
        """Whether to poll now: new images or the due time, within the call budget."""
        # A timer may fire a hair early; that must not cost a whole tick.
        now += _AFTER_FINISH / 2
        return now >= self.earliest and (new_images or now >= self.due)

    def pause(self, now: float, tick: float) -> float:
        """How long to sleep: until the due time, looking for new images every `tick`."""
        wake = max(min(now + tick, self.due), self.earliest)
        return max(wake - now, _MIN_PAUSE)


class _Holds:
    """Pairs whose DescribeImages just failed, each with the loop time it may be asked again."""

    def __init__(self) -> None:
        self._until: dict[Pair, float] = {}

    def hold(self, pairs: Iterable[Pair], until: float) -> None:
        """Ask nothing of `pairs` before `until`."""
        self._until.update(dict.fromkeys(pairs, until))

    def free(self, tracked: Iterable[Tracked], now: float) -> list[Tracked]:
        """The images of `tracked` that may be polled at `now`; ended holds are dropped."""
        # The allowance `_Cadence.wants` gives a timer that fires a hair early.
        now += _AFTER_FINISH / 2
        self._until = {pair: until for pair, until in self._until.items() if until > now}
        return [t for t in tracked if _pair(t) not in self._until]

    def holds(self, t: Tracked) -> bool:
        """Whether the image's pair is held."""
        return _pair(t) in self._until

    def release(self, regular: float) -> float:
        """`regular`, or when the first hold ends if sooner: held images are polled then."""
        return min([regular, *self._until.values()])


async def _poll_and_plan(
    ctx: EngineContext, tracked: Sequence[Tracked], clock: BuildClock, holds: _Holds
) -> _Cadence:
    """Poll `tracked` once (but held pairs); when to poll next."""
    loop = asyncio.get_running_loop()
    sent, wall = loop.time(), datetime.now(UTC)
    polled = await _poll(ctx, holds.free(tracked, sent), clock)
    done = loop.time()
    # A failed pair waits a whole min interval, whatever wakes the loop sooner (a timed poll, a
    # new image): an API that keeps failing must not be asked many times a second.
    holds.hold(polled.failed, done + ctx.settings.tracker_min_interval)
    pending = polled.in_flight
    earliest = done + poll_gap(len(pending), ctx.settings)
    regular = holds.release(done + next_interval(len(pending), ctx.settings))
    timed = [t for t in pending if not holds.holds(t)]
    build = clock.estimate()
    if build is None or not timed:
        return _Cadence(regular, earliest)
    # Expected finishes on the loop's clock: recorded_at is the database's, but the estimate
    # was learned against the same clocks, so a steady offset between them cancels out.
    offset = sent + build + _AFTER_FINISH
    finishes = (offset + (t.recorded_at - wall).total_seconds() for t in timed)
    return _Cadence(next_poll(sent, finishes, regular=regular, earliest=earliest), earliest)


async def run(ctx: EngineContext, stop: asyncio.Event, held: Held = None) -> None:
    """Poll until `stop`: at once for new images, when images should be ready, else at intervals."""
    loop = asyncio.get_running_loop()
    seen: set[str] = set()
    cadence = _Cadence(loop.time(), loop.time())
    clock = BuildClock()
    holds = _Holds()
    watch = DbWatch("tracker", stop)
    confirm_at = loop.time()
    while not stop.is_set():
        try:
            # The database away: back off and poll again. Other database errors: next tick.
            async with watch:
                tracked = await _tracked(ctx, held)
                ids = {t.image_id for t in tracked}
                if cadence.wants(loop.time(), bool(ids - seen)):
                    cadence = await _poll_and_plan(ctx, tracked, clock, holds)
                    # Held images count as seen too: only new ones wake the loop early.
                    seen = ids
                if loop.time() >= confirm_at:
                    # A deletion is done, and its quota free, once the image is gone.
                    await rotation.confirm_everywhere(ctx, _driven(ctx, held))
                    confirm_at = loop.time() + CONFIRM_TICKS * ctx.settings.tracker_min_interval
        except DB_ERRORS as exc:
            # A statement failed (a deadlock, say); the next tick tries again.
            log.warning("tracker.poll_failed", error=repr(exc))
            cadence.due = max(cadence.due, loop.time() + ctx.settings.tracker_min_interval)
        # Between polls the loop only looks for new images, once a tick: polling is CPU the
        # dispatcher shares (one event loop).
        await waits.pause(stop, cadence.pause(loop.time(), ctx.settings.tracker_min_interval))


def _driven(ctx: EngineContext, held: Held) -> Collection[str]:
    return ctx.clients.keys() if held is None else held()
