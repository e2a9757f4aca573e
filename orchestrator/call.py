"""The call: one claimed job taken up to its outcome.

First the checks that need no call (paused account, disabled policy, closed window), then the
look-up of a possible earlier image by name, then CreateImage (SyncImages for a copy job) behind
two guards asked the moment the limiter grants the call: the fence (the lease is surely still
ours) and the quota gate (the region is not known to be full). Every answer goes to the outcome
table (orchestrator/outcomes.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from orchestrator import jobs, logs, naming, quota_gate
from orchestrator.context import EngineContext
from orchestrator.db.batch import GroupWriter
from orchestrator.fence import Fence
from orchestrator.jobs import Job
from orchestrator.lookup import NameTaken, lookup
from orchestrator.outcomes import Known, Outcomes, state_after
from orchestrator.tencent.client import CallWithheld
from orchestrator.tencent.errors import ErrorClass, TencentError
from orchestrator.tencent.models import CreateImageResult

# The dispatcher's events, whichever of its modules logs them.
log = logs.get("dispatcher")

# Whether this replica may call an account's API (in a region) now.
Drives = Callable[[str, str | None], bool]


class Call:
    """Calls the API for claimed jobs; `run` takes one job up to its recorded outcome."""

    def __init__(
        self, ctx: EngineContext, fence: Fence, known: Known, outcomes: Outcomes, drives: Drives
    ) -> None:
        self.ctx = ctx
        self.fence = fence
        self.known = known
        self.outcomes = outcomes
        self.record = outcomes.record
        self._drives = drives
        # Every job marks itself 'creating' before its call: the writes go out grouped.
        self._marks = GroupWriter(self._write_marks, key=int)

    async def aclose(self) -> None:
        """Wait for the marks already submitted (shutdown)."""
        await self._marks.aclose()

    async def run(self, job: Job) -> None:
        """Take `job` from its claim to a recorded outcome."""
        log.info("job.claimed", state=job.state, region=job.region, account=job.account)
        if not self._drives(job.account, job.region):
            # Paused, or the account's lease was lost between the claim and now.
            await self.outcomes.release_paused(job)
            return
        if not job.enabled:
            await self.record.finish(job, "skipped", reason="policy_disabled")
            return
        if job.state == "creating" and not await self._resolve_earlier(job):
            return
        if _now() >= job.deadline:
            await self.outcomes.past_window(job)
            return
        await self._create(job)

    async def _resolve_earlier(self, job: Job) -> bool:
        """A call may have been made before: look the name up first; True to go on creating."""
        try:
            found = await lookup(self.ctx, job)
        except NameTaken as taken:
            await self.outcomes.name_taken(job, taken)
            return False
        except TencentError as exc:
            await self.outcomes.on_error(job, exc, maybe_created=True, action="DescribeImages")
            return False
        if found is not None:
            await self.record.adopt(job, found, how="resolved_by_name")
            return False
        return True

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
            await self.outcomes.on_error(job, exc, maybe_created=False, action="DescribeInstances")
            return
        if disks is None:
            await self.record.finish(job, "skipped", reason="instance_gone")
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
            await self.outcomes.on_error(job, exc, maybe_created=transient, action="CreateImage")
            return
        await self.outcomes.on_created(job, result)

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
            await self.outcomes.on_error(job, exc, maybe_created=transient, action="SyncImages")
            return
        await self.outcomes.on_created(
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

    async def _write_marks(self, ids: Sequence[int]) -> set[int]:
        return await jobs.mark_creating(self.ctx.pool, self.ctx.worker_id, ids)

    def _may_send(self, job: Job) -> bool:
        """Asked at the limiter's grant, the moment before CreateImage goes out."""
        # The fence first: a job whose lease may have ended sends nothing. Then a job the
        # gate let through (a token, the probe) goes; the others are asked again whether
        # their region filled in the seconds they queued.
        return self.fence.open(job.id) and (job.gated or self.known.room_may_exist(job))

    async def _withheld(self, job: Job) -> None:
        if not self.fence.open(job.id):
            self._fenced(job)
            return
        # The region filled while the job queued at the limiter: park it behind the gate, as
        # if it had been claimed after the gate closed. No call was made: not an attempt.
        full_until = self.known.full.get((job.account, job.region), _now())
        when = self.record.capped(job, full_until)
        state = state_after(job, False)
        await self.record.retry(job, when, state, count=False, error=None, outcome="quota_gated")

    def _fenced(self, job: Job) -> None:
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
        when = self.record.capped(job, verdict.until)
        # No call was made: not an attempt. A job that may have made an image stays
        # 'creating', so its name is looked up again (an image listed late shows then).
        state = state_after(job, False)
        await self.record.retry(job, when, state, count=False, error=None, outcome="quota_gated")
        return True


def _now() -> datetime:
    return datetime.now(UTC)
