"""Outcomes: what each answer of the API does to a job, and the transaction that records it.

`Outcomes` is the outcome table: one handler per error class, the success paths (an image made,
an image adopted) and the terminal decisions (window closed, name taken). `Recorder` writes each
outcome as one transaction, the job's new state plus a ledger row, and schedules retries with
durable backoff. `Known` is what this process has learnt about its accounts and regions between
calls (paused scopes, full quotas): the parts of the dispatcher share it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from orchestrator import backoff, jobs, logs, naming, pauses, quota_gate
from orchestrator.context import EngineContext
from orchestrator.db.batch import GroupWriter
from orchestrator.jobs import ImageRecord, Job
from orchestrator.lookup import NAME_TAKEN, NameTaken, lookup
from orchestrator.pauses import ProbeTimings
from orchestrator.tencent.errors import ErrorClass, TencentError
from orchestrator.tencent.models import CreateImageResult, Image

# The dispatcher's events, whichever of its modules logs them.
log = logs.get("dispatcher")

# A success without ImageId (docs/design.md#the-older-createimage-answer) is looked up by name;
# the image may take a moment to show.
_LEGACY_LOOKUPS = 3
_LEGACY_LOOKUP_DELAY = 0.5
# CreateImage's answer when the name is taken; ours, if no look-up lists it: listed late.
DUPLICATE = "InvalidImageName.Duplicate"
# How long past its window a job whose name the API said was taken keeps looking for its
# image: DescribeImages can list a new image late (Terraform retries an empty answer for up
# to an hour). After that the job expires; the reconciliation adopts the image if it shows.
LISTING_GRACE = timedelta(hours=1)


@dataclass(slots=True)
class Known:
    """What this process knows of its accounts and regions, ahead of the tables it caches."""

    # A cache of the account_pauses rows of our accounts (the claim reads the table itself):
    # kept by `Outcomes` and the prober (`Dispatcher.pause_changed`), it stops a job claimed
    # just before its account or region was paused from calling the API. Keys are
    # (account, None) for an account-wide pause, (account, region) for a regional one.
    paused: set[pauses.Scope] = field(default_factory=set)
    # Told of each pause this process records (the daemon hands it to the prober).
    on_paused: Callable[[pauses.Scope], None] | None = None
    # (account, region) -> until when this process knows its image quota to be full.
    full: dict[tuple[str, str], datetime] = field(default_factory=dict)

    def is_paused(self, account: str, region: str | None) -> bool:
        """Whether `account` is paused account-wide or in `region`."""
        return (account, None) in self.paused or (account, region) in self.paused

    def room_may_exist(self, job: Job) -> bool:
        """False while this process knows the job's region to be full (its gate's backoff)."""
        key = (job.account, job.region)
        until = self.full.get(key)
        if until is not None and _now() >= until:
            del self.full[key]
            until = None
        return until is None


class Recorder:
    """Writes outcomes: the job's new state and its ledger row, in one transaction each."""

    def __init__(self, ctx: EngineContext, due_at: Callable[[datetime], None]) -> None:
        self.ctx = ctx
        self._due_at = due_at  # a retry due sooner than the idle loop looks wakes it
        # Every job records its image after the call: the writes go out grouped across jobs.
        self._records = GroupWriter(self._write_records, key=lambda record: record.job_id)

    async def aclose(self) -> None:
        """Wait for the image records already submitted (shutdown)."""
        await self._records.aclose()

    async def _write_records(self, records: Sequence[ImageRecord]) -> set[int]:
        return await jobs.record_images(self.ctx.pool, self.ctx.worker_id, records)

    async def adopt(self, job: Job, image: Image, *, how: str) -> None:
        """Take an image found by name as the job's."""
        log.info("image.adopted", image_id=image.image_id, image_state=image.state, how=how)
        await self.record_image(job, image.image_id, image.state, None, how)

    async def record_image(
        self, job: Job, image_id: str, state: str, request_id: str | None, outcome: str
    ) -> None:
        """The job's image is known: the job waits for it from now on."""
        attempt = {"outcome": outcome, "attempt": job.attempts + 1, "request_id": request_id}
        ok = await self._records.submit(ImageRecord(job.id, image_id, state, request_id, attempt))
        if not ok:
            log.warning("job.lease_lost", step="record_image", image_id=image_id)
        elif outcome != "resolved_by_name":
            log.info("image.created", image_id=image_id, request_id=request_id, outcome=outcome)

    async def backoff(
        self,
        job: Job,
        exc: TencentError | None,
        error_class: ErrorClass,
        state: str,
        outcome: str = "retry",
    ) -> None:
        """Retry after the error class's backoff; the attempt counts."""
        when = self.after(job, backoff.base_for(error_class, self.ctx.settings.retry))
        await self.retry(job, when, state, count=True, error=exc, outcome=outcome)

    def after(self, job: Job, base: float, attempt: int | None = None) -> datetime:
        """When to try again: backoff capped by the window, or real backoff once it closed."""
        cap = self.ctx.settings.retry.max_delay
        n = job.attempts + 1 if attempt is None else attempt
        now = _now()
        if now < job.deadline:
            return backoff.next_attempt(now, n, base, cap, job.deadline)
        # Past the window only look-ups remain (a job that may have made an image): never a
        # spin, and the delay grows with the attempts.
        return now + _seconds(max(base, backoff.delay(n, base, cap)))

    def capped(self, job: Job, when: datetime) -> datetime:
        """`when`, but no later than the window's end while it is open."""
        return min(when, job.deadline) if _now() < job.deadline else when

    async def retry(
        self,
        job: Job,
        when: datetime,
        state: str,
        *,
        count: bool,
        error: TencentError | None,
        outcome: str = "retry",
        request_id: str | None = None,
    ) -> None:
        """Put the job back in the queue, due at `when`, in `state`."""
        err = _error(error) if error else None
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            ok = await jobs.retry_later(
                conn,
                job,
                self.ctx.worker_id,
                when=when,
                state=state,
                count_attempt=count,
                error=err,
            )
            if ok:
                await self._ledger(conn, job, outcome, error, request_id, counted=count)
        if ok:
            self._due_at(when)
            log.info(
                "job.retry_scheduled",
                next_attempt_at=when.isoformat(),
                state=state,
                code=error.code if error else None,
                outcome=outcome,
                counted=count,
                delay=round((when - _now()).total_seconds(), 3),
            )
        else:
            log.warning("job.lease_lost", step="retry")

    async def finish(
        self,
        job: Job,
        state: str,
        *,
        reason: str,
        error: TencentError | None = None,
        count: bool = False,
    ) -> None:
        """End the job in the terminal `state`, with its reason."""
        err = _error(error) if error else None
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            ok = await jobs.finish(
                conn, job, self.ctx.worker_id, state, reason=reason, error=err, count_attempt=count
            )
            if ok:
                kind = "job.attempt" if error else f"job.{state}"
                await self._ledger(
                    conn, job, state, error, None, counted=count, reason=reason, kind=kind
                )
        if not ok:
            log.warning("job.lease_lost", step="finish")
            return
        level = log.error if state == "failed" else log.warning if state == "expired" else log.info
        level(
            f"job.{state}",
            reason=reason,
            code=error.code if error else None,
            message=error.message if error else None,
            request_id=error.request_id if error else None,
        )

    async def _ledger(
        self,
        conn: object,
        job: Job,
        outcome: str,
        error: TencentError | None,
        request_id: str | None,
        *,
        counted: bool,
        reason: str | None = None,
        kind: str = "job.attempt",
    ) -> None:
        await jobs.event(
            conn,
            kind,
            job,
            outcome=outcome,
            reason=reason,
            attempt=job.attempts + 1,
            counted=counted,
            code=error.code if error else None,
            message=error.message if error else None,
            error_class=str(error.error_class) if error else None,
            request_id=(error.request_id if error else None) or request_id,
        )


class Outcomes:
    """The outcome table: what an answer (an error of each class, a success) does to a job."""

    def __init__(
        self, ctx: EngineContext, record: Recorder, known: Known, probe: ProbeTimings
    ) -> None:
        self.ctx = ctx
        self.record = record
        self.known = known
        self.probe = probe

    async def on_error(
        self, job: Job, exc: TencentError, *, maybe_created: bool, action: str
    ) -> None:
        """An API error of `action`; `maybe_created` when the call may have made an image."""
        error_class = exc.error_class
        log.info(
            "job.api_error",
            action=action,
            code=exc.code,
            error_class=str(error_class),
            request_id=exc.request_id,
        )
        handler = {
            ErrorClass.THROTTLED: self._on_throttled,
            ErrorClass.BUSY: self._on_busy,
            ErrorClass.TRANSIENT: self._on_transient,
            ErrorClass.QUOTA: self._on_quota,
            ErrorClass.ALREADY_DONE: self._on_duplicate,
            ErrorClass.ACCOUNT: self._on_account,
            ErrorClass.GONE: self._on_gone,
            ErrorClass.PERMANENT: self._on_permanent,
        }[error_class]
        await handler(job, exc, maybe_created)

    async def on_created(self, job: Job, result: CreateImageResult) -> None:
        """CreateImage or SyncImages succeeded: record the image, found by name if need be."""
        # An image was made: the region had room after all (freed meanwhile, or a token).
        self.known.full.pop((job.account, job.region), None)
        if result.image_id is not None:
            await self.record.record_image(
                job, result.image_id, "CREATING", result.request_id, "created"
            )
            return
        # The older API answers without ImageId: the name says which image it made.
        for attempt in range(_LEGACY_LOOKUPS):
            try:
                found = await lookup(self.ctx, job)
            except NameTaken as taken:
                # Cannot be ours: the call that just succeeded made an image with our tags.
                await self.name_taken(job, taken)
                return
            except TencentError as exc:
                # Unanswered: the job stays 'creating' below, with this success's request id.
                log.info("job.lookup_failed", code=exc.code, request_id=exc.request_id)
                break
            if found is not None:
                await self.record.record_image(
                    job, found.image_id, found.state, result.request_id, "created_no_id"
                )
                return
            await asyncio.sleep(_LEGACY_LOOKUP_DELAY * (attempt + 1))
        when = self.record.after(job, self.ctx.settings.retry.transient_base, attempt=1)
        await self.record.retry(
            job,
            when,
            "creating",
            count=False,
            error=None,
            outcome="created_not_visible",
            request_id=result.request_id,
        )

    async def name_taken(self, job: Job, taken: NameTaken) -> None:
        """The job's exact name belongs to an image that is not ours: the job fails."""
        # Nothing is adopted or deleted: the image is someone else's. The next slot has its own
        # name and proceeds normally.
        error = TencentError(
            NAME_TAKEN,
            f"an image named {job.image_name!r} exists ({taken.image.image_id}) without this"
            f" deployment's tags ({naming.TAG_DEPLOYMENT}, {naming.TAG_POLICY}); it is not ours",
        )
        log.error("image.name_taken", image_id=taken.image.image_id, image_name=job.image_name)
        await self.record.finish(job, "failed", reason="name_taken", error=error, count=True)

    async def past_window(self, job: Job) -> None:
        """The window closed: expire, unless a name the API said was taken may be listed late."""
        taken = job.state == "creating" and job.last_error_code == DUPLICATE
        if taken and _now() < job.deadline + LISTING_GRACE:
            # A look-up just answered "no such name", yet CreateImage said it is taken: the
            # image exists and is not listed yet. Look again; never make another.
            await self.record.backoff(
                job, None, ErrorClass.TRANSIENT, "creating", "duplicate_unseen"
            )
            return
        await self.record.finish(job, "expired", reason="window_closed")

    async def release_paused(self, job: Job) -> None:
        """The job's account or region is paused, or its lease gone: back in the queue."""
        await self.record.retry(
            job,
            _now() + _seconds(self.ctx.settings.poll_interval),
            "creating" if job.state == "creating" else "pending",
            count=False,
            error=None,
            outcome="account_paused",
        )

    async def _on_throttled(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        # The limiter already slowed down; a throttled call was not executed: not an attempt.
        state = state_after(job, maybe_created)
        delay = _seconds(self.ctx.settings.retry.throttle_delay)
        when = self.record.capped(job, _now() + delay)
        await self.record.retry(job, when, state, count=False, error=exc)

    async def _on_busy(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        await self.record.backoff(job, exc, ErrorClass.BUSY, state_after(job, False))

    async def _on_transient(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        state = state_after(job, maybe_created)
        failures = await self._transient_failures(job) + 1
        if failures < self.ctx.settings.retry.max_transient_attempts:
            await self.record.backoff(job, exc, ErrorClass.TRANSIENT, state)
            return
        if state == "creating":
            await self._last_lookup(job, exc)
            return
        await self.record.finish(job, "failed", reason="retries_exhausted", error=exc, count=True)

    async def _last_lookup(self, job: Job, exc: TencentError) -> None:
        """Out of budget, and a call may have made an image: terminal once a look-up answered."""
        try:
            found = await lookup(self.ctx, job)
        except NameTaken as taken:
            await self.name_taken(job, taken)
            return
        except TencentError as unanswered:
            # No answer: the image may exist. Keep looking, with real backoff, past the
            # window if need be; the look-ups' own failures grow the delay.
            await self.record.backoff(
                job, unanswered, ErrorClass.TRANSIENT, "creating", "lookup_unanswered"
            )
            return
        if found is not None:
            await self.record.adopt(job, found, how="resolved_by_name")
            return
        await self.record.finish(job, "failed", reason="retries_exhausted", error=exc, count=True)

    async def _on_quota(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        if job.on_quota != "rotate":
            await self.record.finish(job, "failed", reason="quota_full", error=exc, count=True)
            return
        room = await quota_gate.make_room(self.ctx, job)
        key = (job.account, job.region)
        state = state_after(job, False)
        if room.freed > 0:
            self.known.full.pop(key, None)
            await self.record.retry(job, _now(), state, count=False, error=exc, outcome="rotated")
        elif room.exhausted and await self._exhaustion_confirmed(job):
            await self.record.finish(job, "failed", reason="quota_exhausted", error=exc, count=True)
        elif room.exhausted:
            outcome = "quota_exhausted_unconfirmed"
            await self.record.backoff(job, exc, ErrorClass.TRANSIENT, state, outcome)
        else:
            # Our images still being built will make older ones evictable: wait behind the
            # region's closed gate (a settled image or the gate's backoff reopens it).
            when = self.record.capped(job, room.reopen_at or _now())
            self.known.full[key] = when
            await self.record.retry(job, when, state, count=True, error=exc, outcome="quota_wait")

    async def _exhaustion_confirmed(self, job: Job) -> bool:
        """Fail on exhaustion only when nothing is in flight and it was seen once before."""
        # The rotation's picture is taken under its lock; jobs move meanwhile (a call answered,
        # an image adopted), so one more look and one more try close the race cheaply.
        found = await self.ctx.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE account = $1 AND region = $2 AND id <> $3"
            "               AND state IN ('creating', 'waiting_image'))"
            " OR EXISTS (SELECT 1 FROM images WHERE account = $1 AND region = $2"
            "            AND deleted_at IS NULL AND state = 'CREATING')"
            " OR NOT EXISTS (SELECT 1 FROM events WHERE job_id = $3 AND kind = 'job.attempt'"
            "                AND details->>'outcome' = 'quota_exhausted_unconfirmed')",
            job.account,
            job.region,
            job.id,
        )
        return not found

    async def _on_duplicate(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        # "Already created": adopt that image, never make another (docs/design.md#invariants, 1).
        if await self._adopt_if_found(job):
            return
        await self.record.backoff(
            job, exc, ErrorClass.TRANSIENT, "creating", outcome="duplicate_unseen"
        )

    async def _adopt_if_found(self, job: Job) -> bool:
        try:
            found = await lookup(self.ctx, job)
        except NameTaken as taken:
            await self.name_taken(job, taken)
            return True
        except TencentError:
            return False  # unanswered: the caller keeps the job 'creating'
        if found is None:
            return False
        await self.record.adopt(job, found, how="resolved_by_name")
        return True

    async def _on_account(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        if maybe_created:
            # The look-up was refused, so nothing is known of the image: wait for the resume.
            await self.record.retry(
                job, _now(), "creating", count=False, error=exc, outcome="paused"
            )
        else:
            await self.record.finish(job, "failed", reason="account_error", error=exc, count=True)
        # Durable first, so this cache never holds a pause the table (and the prober) lacks.
        # A CAM denial pauses only the job's region (errors.pause_scope); others the account.
        paused = await pauses.pause(
            self.ctx.pool,
            job.account,
            exc,
            region=job.region,
            instance_id=job.instance_id,
            first_probe=self.probe.base,
            policy=job.policy_name,
        )
        scope = (job.account, pauses.scope_of(exc, job.region))
        self.known.paused.add(scope)
        if self.known.on_paused is not None:
            self.known.on_paused(scope)
        if paused is not None:
            pauses.log_paused(log, paused, exc, default_action="CreateImage")

    async def _on_gone(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        await self.record.finish(job, "skipped", reason="instance_gone", error=exc)

    async def _on_permanent(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        await self.record.finish(job, "failed", reason="permanent_error", error=exc, count=True)

    async def _transient_failures(self, job: Job) -> int:
        value = await self.ctx.pool.fetchval(
            "SELECT count(*) FROM events WHERE job_id = $1 AND kind = 'job.attempt'"
            " AND details->>'error_class' = 'transient'",
            job.id,
        )
        return int(value or 0)


def state_after(job: Job, maybe_created: bool) -> str:
    """The state a retried job keeps: 'creating' once any call of it may have made an image."""
    # A refusal made no image, but an earlier call of a 'creating' job may have: it stays
    # 'creating', so it is looked up by name again and never expires without a look-up.
    return "creating" if maybe_created or job.state == "creating" else "pending"


def _error(exc: TencentError) -> tuple[str, str, str | None]:
    return exc.code, exc.message, exc.request_id


def _now() -> datetime:
    return datetime.now(UTC)


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)
