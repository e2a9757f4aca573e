"""The dispatcher: claim due jobs, call the API for each, record the outcome.

One job is three steps, each in its own module: `claim` (here: one SQL statement, `jobs.claim`,
under a lease the heartbeat renews), `call` (orchestrator/call.py: resolve a possible earlier
image by name, then CreateImage or SyncImages) and `record` (orchestrator/outcomes.py: the
outcome table, and one transaction per outcome: the job's new state plus a ledger row). The rate
is bounded by the client's limiter; how many calls are in flight at once is bounded separately by
`max_in_flight` slots (orchestrator/slots.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta

import structlog

from orchestrator import jobs, logs, pauses, waits
from orchestrator.call import Call
from orchestrator.context import EngineContext
from orchestrator.db.resilience import DbWatch, is_connection_error
from orchestrator.fence import Fence
from orchestrator.jobs import Job
from orchestrator.outcomes import Known, Outcomes, Recorder
from orchestrator.pauses import ProbeTimings
from orchestrator.slots import Slots

log = logs.get("dispatcher")

# Claims wait until this fraction of the in-flight slots is free, then take every free one:
# refilling one slot at a time would cost a claim statement per job once the engine is busy.
REFILL_FRACTION = 4


def _now() -> datetime:
    return datetime.now(UTC)


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
        self.probe = probe or ProbeTimings()
        self.wake = asyncio.Event()
        # When the idle loop looks again (None: not idle); a retry due sooner wakes it.
        self._idle_until: datetime | None = None
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        # When each job's lease was last surely ours: no CreateImage goes out past it.
        self.fence = Fence(ctx.settings.lease_seconds, ctx.settings.request_timeout)
        self._slots = Slots(ctx.settings.max_in_flight)
        self._refill = max(1, ctx.settings.max_in_flight // REFILL_FRACTION)
        self._known = Known()
        self._record = Recorder(ctx, self._due_at)
        outcomes = Outcomes(ctx, self._record, self._known, self.probe)
        self._call = Call(ctx, self.fence, self._known, outcomes, self._drives)

    @property
    def paused(self) -> set[pauses.Scope]:
        """The pauses of our accounts this process knows of (see `Known.paused`)."""
        return self._known.paused

    @property
    def on_paused(self) -> Callable[[pauses.Scope], None] | None:
        """Told of each pause this dispatcher records (the daemon hands it to the prober)."""
        return self._known.on_paused

    @on_paused.setter
    def on_paused(self, notify: Callable[[pauses.Scope], None] | None) -> None:
        self._known.on_paused = notify

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
        if self._known.is_paused(account, region):
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
            await waits.pause(stop, interval)
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
        await self._call.aclose()
        await self._record.aclose()
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
                await self._call.run(job)
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

    def pause_changed(self, account: str, paused: bool, region: str | None = None) -> None:
        """The prober saw a pause of `account` (of `region`, or account-wide) come or go.

        A lift claims the jobs it held back at once.
        """
        if paused:
            self._known.paused.add((account, region))
            return
        self._known.paused.discard((account, region))
        self.wake.set()


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)
