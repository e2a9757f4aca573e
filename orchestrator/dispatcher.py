"""The dispatcher: claim due jobs, call CreateImage, classify the answer, record the outcome.

One job is three steps, each readable on its own: `claim` (one SQL statement, `jobs.claim`), `call`
(resolve a possible earlier image by name, then CreateImage) and `record` (one transaction: the
job's new state plus a ledger row). The rate is bounded by the client's limiter; how many calls are
in flight at once is bounded separately by `max_in_flight` slots (orchestrator/slots.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog

from orchestrator import backoff, jobs, logs, naming, pauses, quota_gate
from orchestrator.context import EngineContext
from orchestrator.db.batch import GroupWriter
from orchestrator.db.resilience import DbWatch, is_connection_error
from orchestrator.fence import Fence
from orchestrator.jobs import ImageRecord, Job
from orchestrator.pauses import ProbeTimings
from orchestrator.slots import Slots
from orchestrator.tencent.client import CallWithheld
from orchestrator.tencent.errors import ErrorClass, TencentError
from orchestrator.tencent.models import CreateImageResult, Image

log = logs.get("dispatcher")

# A success without ImageId (docs/design.md#the-older-createimage-answer) is looked up by name;
# the image may take a moment to show.
_LEGACY_LOOKUPS = 3
_LEGACY_LOOKUP_DELAY = 0.5
# Claims wait until this fraction of the in-flight slots is free, then take every free one:
# refilling one slot at a time would cost a claim statement per job once the engine is busy.
REFILL_FRACTION = 4
# Connection-level database failures a loop survives (and logs); anything else is a bug.
DB_BLIPS = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)


# A job whose exact name belongs to an image that is not provably ours ends with this code.
NAME_TAKEN = "ImageNameTaken"
# CreateImage's answer when the name is taken; ours, if no look-up lists it: listed late.
DUPLICATE = "InvalidImageName.Duplicate"
# How long past its window a job whose name the API said was taken keeps looking for its
# image: DescribeImages can list a new image late (Terraform retries an empty answer for up
# to an hour). After that the job expires; the reconciliation adopts the image if it shows.
LISTING_GRACE = timedelta(hours=1)


class NameTaken(TencentError):
    """An image with the job's exact name exists without this deployment's and policy's tags."""

    def __init__(self, image: Image) -> None:
        super().__init__(NAME_TAKEN, f"name taken by {image.image_id}")
        self.image = image


def _now() -> datetime:
    return datetime.now(UTC)


def _untagged_copy(job: Job, image: Image) -> bool:
    """Whether `image` can be the copy `job` made: whether SyncImages carries tags over is not
    documented, so a copy is known by its exact name in the destination and by carrying no
    tags at all; one with someone else's tags is never taken for ours."""
    return job.kind == "copy" and not image.tags


def _error(exc: TencentError) -> tuple[str, str, str | None]:
    return exc.code, exc.message, exc.request_id


class Dispatcher:
    """Claims and runs jobs for one process; `run` is the loop, `shutdown` the graceful stop."""

    def __init__(
        self,
        ctx: EngineContext,
        *,
        run_id: int | None = None,
        held: Callable[[], Collection[str]] | None = None,
        probe: ProbeTimings | None = None,
    ) -> None:
        self.ctx = ctx
        self.run_id = run_id  # restrict to one run (backup-now --wait); None: every run
        # The accounts whose lease this replica holds (orchestrator.accounts); None: all of them.
        self.held = held
        # A cache of the account_pauses rows of our accounts (the claim reads the table
        # itself): kept by `_on_account` and the prober (`pause_changed`), it stops a job
        # claimed just before its account or region was paused from calling the API. Keys are
        # (account, None) for an account-wide pause, (account, region) for a regional one.
        self.paused: set[pauses.Scope] = set()
        self.on_paused: Callable[[pauses.Scope], None] | None = None
        self.probe = probe or ProbeTimings()
        self.wake = asyncio.Event()
        # When the idle loop looks again (None: not idle); a retry due sooner wakes it.
        self._idle_until: datetime | None = None
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        # When each job's lease was last surely ours: no CreateImage goes out past it.
        self.fence = Fence(ctx.settings.lease_seconds, ctx.settings.request_timeout)
        self._slots = Slots(ctx.settings.max_in_flight)
        # (account, region) -> until when this process knows its image quota to be full.
        self._full: dict[tuple[str, str], datetime] = {}
        self._refill = max(1, ctx.settings.max_in_flight // REFILL_FRACTION)
        # The two writes every job makes around its call go out grouped across jobs.
        self._marks = GroupWriter(self._write_marks, key=int)
        self._records = GroupWriter(self._write_records, key=lambda record: record.job_id)

    @property
    def in_flight(self) -> Sequence[int]:
        """Ids of the jobs this process is working on right now."""
        return list(self._in_flight)

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and start due jobs until `stop` is set."""
        watch = DbWatch("dispatcher", stop)
        while not stop.is_set():
            # The database away (a restart): claim again after a backoff. Bugs propagate.
            async with watch:
                started = await self.dispatch_once(stop)
                if started == 0 and not stop.is_set():
                    await self._idle(stop)

    async def dispatch_once(self, stop: asyncio.Event) -> int:
        """Claim as many due jobs as there are free slots and start them; how many started."""
        wanted = await self._slots.take(self._refill, stop)
        if wanted == 0:
            return 0
        claimed: list[Job] = []
        sent = self.fence.now()
        try:
            claimed = await jobs.claim(
                self.ctx.pool,
                self.ctx.worker_id,
                wanted,
                self.ctx.settings.lease_seconds,
                run_id=self.run_id,
                accounts=self._accounts(),
                busy=self._in_flight.keys(),
            )
        finally:
            # A failed claim (the database away) must give its slots back, or they leak for good.
            self._slots.give_back(wanted - len(claimed))
        self.fence.leased((job.id for job in claimed), sent)
        for job in claimed:
            task = asyncio.create_task(self._guarded(job), name=f"job-{job.id}")
            self._in_flight[job.id] = task
        return len(claimed)

    def _accounts(self) -> Collection[str] | None:
        return None if self.held is None else self.held()

    def _drives(self, account: str, region: str | None = None) -> bool:
        """Whether this replica may call the account's API (in `region`) now.

        Not when the account is paused account-wide or that region is, nor without its lease.
        """
        held = self._accounts()
        if (account, None) in self.paused or (account, region) in self.paused:
            return False
        return held is None or account in held

    async def _idle(self, stop: asyncio.Event) -> None:
        # Sleep until the next job is due, a poll interval passes, or someone wakes us.
        self.wake.clear()  # before the query, so a wake-up during it is not lost
        # Idle from here: a retry written while the query runs may be missing from its answer.
        self._idle_until = _now() + _seconds(self.ctx.settings.poll_interval)
        try:
            timeout = await self._idle_timeout()
            self._idle_until = _now() + _seconds(timeout)
            waiters = {asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())}
            _, pending = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in pending:
                waiter.cancel()
        finally:
            self._idle_until = None

    async def _idle_timeout(self) -> float:
        """Seconds until the next job is due, at most one poll interval."""
        due = await jobs.next_due(self.ctx.pool, self._accounts())
        timeout = self.ctx.settings.poll_interval
        if due is not None:
            timeout = min(timeout, max((due - _now()).total_seconds(), 0.01))
        return timeout

    def _due_at(self, when: datetime) -> None:
        """A job of ours becomes due at `when`: wake the idle loop if it would sleep past it."""
        if self._idle_until is not None and when < self._idle_until:
            self.wake.set()

    async def heartbeat(self, stop: asyncio.Event) -> None:
        """Renew the leases of jobs in flight in one batched UPDATE, three times per lease."""
        interval = self.ctx.settings.lease_seconds / 3
        # Leases are three beats long: one missed beat loses nothing, so no extra backoff.
        watch = DbWatch("heartbeat", stop, first=0.0)
        while not stop.is_set():
            await _pause(stop, interval)
            async with watch:
                await self.renew()

    async def renew(self) -> None:
        """One heartbeat beat."""
        if self._in_flight:
            ids = list(self._in_flight)
            lease = self.ctx.settings.lease_seconds
            sent = self.fence.now()
            renewed = await jobs.renew(self.ctx.pool, self.ctx.worker_id, ids, lease)
            self.fence.leased(renewed, sent)

    async def shutdown(self, grace: float) -> list[int]:
        """Let in-flight jobs finish within `grace`, cancel the rest and release their leases."""
        tasks = list(self._in_flight.values())
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        unfinished = [job_id for job_id, task in self._in_flight.items() if not task.done()]
        for job_id in unfinished:
            self._in_flight[job_id].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._marks.aclose()
        await self._records.aclose()
        if unfinished:
            await jobs.release(self.ctx.pool, self.ctx.worker_id, unfinished)
            log.warning("job.released", jobs=unfinished, reason="shutdown")
        return unfinished

    def cancel_all(self) -> None:
        """Cancel every job task at once (the engine itself was cancelled)."""
        for task in self._in_flight.values():
            task.cancel()

    async def _guarded(self, job: Job) -> None:
        try:
            with structlog.contextvars.bound_contextvars(
                policy=job.policy_name,
                instance=job.instance_id,
                job=job.id,
                attempt=job.attempts + 1,
            ):
                await self._process(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one broken job must not stop the others
            if is_connection_error(exc):
                # Its outcome may be unrecorded: the lease lapses and a reclaim resolves it by name.
                log.warning("job.db_unavailable", job=job.id, error=repr(exc))
                return
            # The lease lapses and the job is reclaimed; a 'creating' one is resolved by name.
            log.exception("job.error", job=job.id)
        finally:
            if self._in_flight.get(job.id) is asyncio.current_task():
                del self._in_flight[job.id]
            self.fence.forget(job.id)
            self._slots.give_back()

    # -- call --------------------------------------------------------------------------------

    async def _process(self, job: Job) -> None:
        log.info("job.claimed", state=job.state, region=job.region, account=job.account)
        if not self._drives(job.account, job.region):
            # Paused, or the account's lease was lost between the claim and now.
            await self._release_paused(job)
            return
        if not job.enabled:
            await self._finish(job, "skipped", reason="policy_disabled")
            return
        if job.state == "creating" and not await self._resolve_earlier(job):
            return
        if _now() >= job.deadline:
            await self._past_window(job)
            return
        await self._create(job)

    async def _past_window(self, job: Job) -> None:
        """The window closed: expire, unless a name the API said was taken may be listed late."""
        taken = job.state == "creating" and job.last_error_code == DUPLICATE
        if taken and _now() < job.deadline + LISTING_GRACE:
            # A look-up just answered "no such name", yet CreateImage said it is taken: the
            # image exists and is not listed yet. Look again; never make another.
            await self._backoff(job, None, ErrorClass.TRANSIENT, "creating", "duplicate_unseen")
            return
        await self._finish(job, "expired", reason="window_closed")

    async def _resolve_earlier(self, job: Job) -> bool:
        """A call may have been made before: look the name up first; True to go on creating."""
        try:
            found = await self._lookup(job)
        except NameTaken as taken:
            await self._name_taken(job, taken)
            return False
        except TencentError as exc:
            await self._on_error(job, exc, maybe_created=True, action="DescribeImages")
            return False
        if found is not None:
            await self._adopt(job, found, how="resolved_by_name")
            return False
        return True

    async def _lookup(self, job: Job) -> Image | None:
        """The job's image by exact name, if it is provably ours; NameTaken when it is not."""
        images = await self.ctx.client(job.account).find_images_by_name(job.region, job.image_name)
        # Names are unique per region, so at most one. Only tags naming this deployment and the
        # job's policy prove the image is ours: a copy made by hand, another installation or a
        # cross-region copy can carry the exact name, and adopting it would later delete it.
        for image in images:
            if naming.is_ours(
                image.tags,
                self.ctx.settings.deployment,
                job.policy_name,
                instance_id=job.instance_id,
                slot=job.slot,
            ) or _untagged_copy(job, image):
                return image
        if images:
            raise NameTaken(images[0])
        return None

    async def _name_taken(self, job: Job, taken: NameTaken) -> None:
        # Nothing is adopted or deleted: the image is someone else's. The next slot has its own
        # name and proceeds normally.
        error = TencentError(
            NAME_TAKEN,
            f"an image named {job.image_name!r} exists ({taken.image.image_id}) without this"
            f" deployment's tags ({naming.TAG_DEPLOYMENT}, {naming.TAG_POLICY}); it is not ours",
        )
        log.error("image.name_taken", image_id=taken.image.image_id, image_name=job.image_name)
        await self._finish(job, "failed", reason="name_taken", error=error, count=True)

    async def _create(self, job: Job) -> None:
        if job.gated and await self._quota_gated(job):
            return
        await (self._copy(job) if job.kind == "copy" else self._backup(job))

    async def _backup(self, job: Job) -> None:
        """CreateImage of the job's instance, named and tagged as ours."""
        guard = functools.partial(self._may_send, job)
        client = self.ctx.client(job.account)
        try:
            disks = await self._data_disks(job)
        except TencentError as exc:
            await self._on_error(job, exc, maybe_created=False, action="DescribeInstances")
            return
        if disks is None:
            await self._finish(job, "skipped", reason="instance_gone")
            return
        if not await self._mark_creating(job):
            return
        log.info("job.dispatched", image_name=job.image_name)
        try:
            result = await client.create_image(
                job.region,
                instance_id=job.instance_id,
                name=job.image_name,
                description=naming.description(job.policy_name, job.instance_id, job.slot),
                force_poweroff=job.force_poweroff,
                sysprep=job.sysprep,
                data_disk_ids=disks,
                tags=naming.ours_tags(self.ctx.settings.deployment, job.policy_name),
                guard=guard,
            )
        except CallWithheld:
            await self._withheld(job)
            return
        except TencentError as exc:
            # Only a transient failure leaves the outcome unknown; any other answer is a refusal.
            transient = exc.error_class is ErrorClass.TRANSIENT
            await self._on_error(job, exc, maybe_created=transient, action="CreateImage")
            return
        await self._on_created(job, result)

    async def _copy(self, job: Job) -> None:
        """SyncImages of the job's backup to its region, the copy named like its source.

        SyncImages has no client token either: the name, recorded before the call, is how a
        lost answer or a crash is resolved (`_resolve_earlier` looks it up in the destination).
        """
        assert job.source_image_id is not None
        assert job.source_region is not None
        if not await self._mark_creating(job):
            return
        log.info("job.dispatched", image_name=job.image_name, source=job.source_image_id)
        try:
            result = await self.ctx.client(job.account).sync_images(
                job.source_region,
                job.source_image_id,
                [job.region],
                image_name=job.image_name,
                guard=functools.partial(self._may_send, job),
            )
        except CallWithheld:
            await self._withheld(job)
            return
        except TencentError as exc:
            transient = exc.error_class is ErrorClass.TRANSIENT
            await self._on_error(job, exc, maybe_created=transient, action="SyncImages")
            return
        await self._on_created(
            job, CreateImageResult(result.image_id(job.region), result.request_id)
        )

    async def _data_disks(self, job: Job) -> tuple[str, ...] | None:
        """DataDiskIds for a whole-machine image; None when the instance no longer exists."""
        if not job.include_data_disks:
            return ()
        client = self.ctx.client(job.account)
        found = [i async for i in client.iter_instances(job.region, instance_ids=[job.instance_id])]
        return found[0].data_disk_ids if found else None

    async def _mark_creating(self, job: Job) -> bool:
        ok = await self._marks.submit(job.id)
        if not ok:
            log.warning("job.lease_lost", step="mark_creating")
        return ok

    # -- record ------------------------------------------------------------------------------

    async def _write_marks(self, ids: Sequence[int]) -> set[int]:
        return await jobs.mark_creating(self.ctx.pool, self.ctx.worker_id, ids)

    async def _write_records(self, records: Sequence[ImageRecord]) -> set[int]:
        return await jobs.record_images(self.ctx.pool, self.ctx.worker_id, records)

    async def _on_created(self, job: Job, result: CreateImageResult) -> None:
        # An image was made: the region had room after all (freed meanwhile, or a token).
        self._full.pop((job.account, job.region), None)
        if result.image_id is not None:
            await self._record_image(job, result.image_id, "CREATING", result.request_id, "created")
            return
        # The older API answers without ImageId: the name says which image it made.
        for attempt in range(_LEGACY_LOOKUPS):
            try:
                found = await self._lookup(job)
            except NameTaken as taken:
                # Cannot be ours: the call that just succeeded made an image with our tags.
                await self._name_taken(job, taken)
                return
            except TencentError as exc:
                # Unanswered: the job stays 'creating' below, with this success's request id.
                log.info("job.lookup_failed", code=exc.code, request_id=exc.request_id)
                break
            if found is not None:
                await self._record_image(
                    job, found.image_id, found.state, result.request_id, "created_no_id"
                )
                return
            await asyncio.sleep(_LEGACY_LOOKUP_DELAY * (attempt + 1))
        when = self._after(job, self.ctx.settings.retry.transient_base, attempt=1)
        await self._retry(
            job,
            when,
            "creating",
            count=False,
            error=None,
            outcome="created_not_visible",
            request_id=result.request_id,
        )

    async def _adopt(self, job: Job, image: Image, *, how: str) -> None:
        log.info("image.adopted", image_id=image.image_id, image_state=image.state, how=how)
        await self._record_image(job, image.image_id, image.state, None, how)

    async def _record_image(
        self, job: Job, image_id: str, state: str, request_id: str | None, outcome: str
    ) -> None:
        attempt = {"outcome": outcome, "attempt": job.attempts + 1, "request_id": request_id}
        ok = await self._records.submit(ImageRecord(job.id, image_id, state, request_id, attempt))
        if not ok:
            log.warning("job.lease_lost", step="record_image", image_id=image_id)
        elif outcome != "resolved_by_name":
            log.info("image.created", image_id=image_id, request_id=request_id, outcome=outcome)

    async def _on_error(
        self, job: Job, exc: TencentError, *, maybe_created: bool, action: str
    ) -> None:
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

    async def _on_throttled(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        # The limiter already slowed down; a throttled call was not executed: not an attempt.
        state = _state(job, maybe_created)
        when = self._capped(job, _now() + _seconds(self.ctx.settings.retry.throttle_delay))
        await self._retry(job, when, state, count=False, error=exc)

    async def _on_busy(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        await self._backoff(job, exc, ErrorClass.BUSY, _state(job, False))

    async def _on_transient(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        state = _state(job, maybe_created)
        failures = await self._transient_failures(job) + 1
        if failures < self.ctx.settings.retry.max_transient_attempts:
            await self._backoff(job, exc, ErrorClass.TRANSIENT, state)
            return
        if state == "creating":
            await self._last_lookup(job, exc)
            return
        await self._finish(job, "failed", reason="retries_exhausted", error=exc, count=True)

    async def _last_lookup(self, job: Job, exc: TencentError) -> None:
        """Out of budget, and a call may have made an image: terminal once a look-up answered."""
        try:
            found = await self._lookup(job)
        except NameTaken as taken:
            await self._name_taken(job, taken)
            return
        except TencentError as lookup:
            # No answer: the image may exist. Keep looking, with real backoff, past the
            # window if need be; the look-ups' own failures grow the delay.
            await self._backoff(job, lookup, ErrorClass.TRANSIENT, "creating", "lookup_unanswered")
            return
        if found is not None:
            await self._adopt(job, found, how="resolved_by_name")
            return
        await self._finish(job, "failed", reason="retries_exhausted", error=exc, count=True)

    async def _on_quota(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        if job.on_quota != "rotate":
            await self._finish(job, "failed", reason="quota_full", error=exc, count=True)
            return
        room = await quota_gate.make_room(self.ctx, job)
        key = (job.account, job.region)
        if room.freed > 0:
            self._full.pop(key, None)
            state = _state(job, False)
            await self._retry(job, _now(), state, count=False, error=exc, outcome="rotated")
        elif room.exhausted and await self._exhaustion_confirmed(job):
            await self._finish(job, "failed", reason="quota_exhausted", error=exc, count=True)
        elif room.exhausted:
            outcome = "quota_exhausted_unconfirmed"
            await self._backoff(job, exc, ErrorClass.TRANSIENT, _state(job, False), outcome)
        else:
            # Our images still being built will make older ones evictable: wait behind the
            # region's closed gate (a settled image or the gate's backoff reopens it).
            when = self._capped(job, room.reopen_at or _now())
            self._full[key] = when
            state = _state(job, False)
            await self._retry(job, when, state, count=True, error=exc, outcome="quota_wait")

    def _room_may_exist(self, job: Job) -> bool:
        """False while this process knows the job's region to be full (its gate's backoff)."""
        key = (job.account, job.region)
        until = self._full.get(key)
        if until is not None and _now() >= until:
            del self._full[key]
            until = None
        return until is None

    def _may_send(self, job: Job) -> bool:
        """Asked at the limiter's grant, the moment before CreateImage goes out."""
        # The fence first: a job whose lease may have ended sends nothing. Then a job the
        # gate let through (a token, the probe) goes; the others are asked again whether
        # their region filled in the seconds they queued.
        return self.fence.open(job.id) and (job.gated or self._room_may_exist(job))

    async def _withheld(self, job: Job) -> None:
        if not self.fence.open(job.id):
            await self._fenced(job)
            return
        # The region filled while the job queued at the limiter: park it behind the gate, as
        # if it had been claimed after the gate closed. No call was made: not an attempt.
        when = self._capped(job, self._full.get((job.account, job.region), _now()))
        state = _state(job, False)
        await self._retry(job, when, state, count=False, error=None, outcome="quota_gated")

    async def _fenced(self, job: Job) -> None:
        # Its lease may be another worker's by now: write nothing (the lease guard would
        # refuse it anyway) and let the lease lapse; the next owner resolves the name first.
        age = self.fence.age(job.id)
        log.warning(
            "job.fenced",
            action="CreateImage",
            lease_age=None if age is None else round(age, 3),
            lease_seconds=self.ctx.settings.lease_seconds,
        )

    async def _quota_gated(self, job: Job) -> bool:
        """Park the job, durably, while its region's quota is known full; True when parked."""
        verdict = await quota_gate.admit(self.ctx, job)
        if verdict.until is None:
            return False
        when = self._capped(job, verdict.until)
        # No call was made: not an attempt. A job that may have made an image stays
        # 'creating', so its name is looked up again (an image listed late shows then).
        state = _state(job, False)
        await self._retry(job, when, state, count=False, error=None, outcome="quota_gated")
        return True

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
        await self._backoff(job, exc, ErrorClass.TRANSIENT, "creating", outcome="duplicate_unseen")

    async def _on_account(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        if maybe_created:
            # The look-up was refused, so nothing is known of the image: wait for the resume.
            await self._retry(job, _now(), "creating", count=False, error=exc, outcome="paused")
        else:
            await self._finish(job, "failed", reason="account_error", error=exc, count=True)
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
        self.paused.add(scope)
        if self.on_paused is not None:
            self.on_paused(scope)
        if paused is not None:
            pauses.log_paused(log, paused, exc, default_action="CreateImage")

    def pause_changed(self, account: str, paused: bool, region: str | None = None) -> None:
        """The prober saw a pause of `account` (of `region`, or account-wide) come or go.

        A lift claims the jobs it held back at once.
        """
        if paused:
            self.paused.add((account, region))
            return
        self.paused.discard((account, region))
        self.wake.set()

    async def _on_gone(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        await self._finish(job, "skipped", reason="instance_gone", error=exc)

    async def _on_permanent(self, job: Job, exc: TencentError, maybe_created: bool) -> None:
        await self._finish(job, "failed", reason="permanent_error", error=exc, count=True)

    async def _adopt_if_found(self, job: Job) -> bool:
        try:
            found = await self._lookup(job)
        except NameTaken as taken:
            await self._name_taken(job, taken)
            return True
        except TencentError:
            return False  # unanswered: the caller keeps the job 'creating'
        if found is None:
            return False
        await self._adopt(job, found, how="resolved_by_name")
        return True

    async def _transient_failures(self, job: Job) -> int:
        value = await self.ctx.pool.fetchval(
            "SELECT count(*) FROM events WHERE job_id = $1 AND kind = 'job.attempt'"
            " AND details->>'error_class' = 'transient'",
            job.id,
        )
        return int(value or 0)

    async def _backoff(
        self,
        job: Job,
        exc: TencentError | None,
        error_class: ErrorClass,
        state: str,
        outcome: str = "retry",
    ) -> None:
        when = self._after(job, backoff.base_for(error_class, self.ctx.settings.retry))
        await self._retry(job, when, state, count=True, error=exc, outcome=outcome)

    def _after(self, job: Job, base: float, attempt: int | None = None) -> datetime:
        """When to try again: backoff capped by the window, or real backoff once it closed."""
        cap = self.ctx.settings.retry.max_delay
        n = job.attempts + 1 if attempt is None else attempt
        now = _now()
        if now < job.deadline:
            return backoff.next_attempt(now, n, base, cap, job.deadline)
        # Past the window only look-ups remain (a job that may have made an image): never a
        # spin, and the delay grows with the attempts.
        return now + _seconds(max(base, backoff.delay(n, base, cap)))

    def _capped(self, job: Job, when: datetime) -> datetime:
        """`when`, but no later than the window's end while it is open."""
        return min(when, job.deadline) if _now() < job.deadline else when

    async def _retry(
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

    async def _finish(
        self,
        job: Job,
        state: str,
        *,
        reason: str,
        error: TencentError | None = None,
        count: bool = False,
    ) -> None:
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

    async def _release_paused(self, job: Job) -> None:
        await self._retry(
            job,
            _now() + _seconds(self.ctx.settings.poll_interval),
            "creating" if job.state == "creating" else "pending",
            count=False,
            error=None,
            outcome="account_paused",
        )


def _state(job: Job, maybe_created: bool) -> str:
    """The state a retried job keeps: 'creating' once any call of it may have made an image."""
    # A refusal made no image, but an earlier call of a 'creating' job may have: it stays
    # 'creating', so it is looked up by name again and never expires without a look-up.
    return "creating" if maybe_created or job.state == "creating" else "pending"


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)
