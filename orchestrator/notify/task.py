"""The notifier: the daemon task that turns recorded events into webhook messages and sends them.

Every tick it files new events into messages, seals the groups that are ready and starts, per
target, a sender that posts that target's due messages one at a time. Senders run beside the
tick, so a receiver that hangs holds up only its own messages, never another target, the
gathering, or anything on a job's path (the engine never waits for the notifier at all).

A failed attempt (no connection, a timeout, a 5xx, a refusal in the body) is retried with full
jitter from 1 s doubling to 5 min, durably (`next_attempt_at`); once the next try would come
after the target's `give_up_after`, or at once for a permanent answer (most 4xx), the message
is given up and `notify.gave_up` says so. Delivery is at least once: a replica that dies after
a POST but before recording it lets its claim lapse, and the message goes again.

On stop the notifier seals what should go now (everything after `run --once`; otherwise what
is not a run's, such as a dead task, and the run `backup-now --wait` waited for) and spends at
most `FINAL_FLUSH` seconds sending it; what is left waits in the outbox for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg

from orchestrator import backoff, logs
from orchestrator.config import NotifySettings
from orchestrator.context import EngineContext
from orchestrator.db.dsn import redact_text
from orchestrator.db.resilience import DbWatch, is_connection_error
from orchestrator.notify import deliver, outbox, render, urls

log = logs.get("notify")

TICK = 1.0
IDLE_TICK = 5.0  # with no target configured, events are only cleared away
# Messages one sender posts to its target per tick: chat robots take about 20 a minute.
PER_TICK = 5
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
# A claim outlasts the attempt's timeout by this much before another replica may take it.
LEASE_MARGIN = 10.0
FINAL_FLUSH = 5.0
RECORD_TIMEOUT = 2.0
ORPHAN_INTERVAL = 60.0


class Notifier:
    """Files, seals and sends notifications for one engine."""

    def __init__(
        self, ctx: EngineContext, *, once: bool = False, run_id: int | None = None
    ) -> None:
        self.ctx = ctx
        self.once = once
        # `run --once` seals everything when it ends; `backup-now --wait` (once, one run) only
        # its own run's message, leaving a daemon's gathering ones alone.
        self.run_id = run_id
        self.targets = {target.key: target for target in ctx.settings.notify}
        self._urls = [target.url for target in self.targets.values()]
        self._senders: dict[str, asyncio.Task[None]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`; then a last, bounded flush."""
        watch = DbWatch("notify", stop)
        loop = asyncio.get_running_loop()
        orphans_at = loop.time()
        async with aiohttp.ClientSession() as session:
            try:
                while not stop.is_set():
                    self._reap()
                    async with watch:
                        await self._gather(stopping=False)
                        if loop.time() >= orphans_at:
                            await self._drop_orphans()
                            orphans_at = loop.time() + ORPHAN_INTERVAL
                        self._start_senders(session)
                    with contextlib.suppress(TimeoutError):
                        tick = TICK if self.targets else IDLE_TICK
                        await asyncio.wait_for(stop.wait(), timeout=tick)
                await self._final(session)
            finally:
                for sender in self._senders.values():
                    sender.cancel()
                await asyncio.gather(*self._senders.values(), return_exceptions=True)

    async def task_failed(self, task: str, error: str) -> None:
        """Record a dead daemon task for the webhooks; a database that is away is only logged."""
        if not any("daemon.task_failed" in t.events for t in self.targets.values()):
            return
        details = {
            "task": task,
            "error": redact_text(urls.scrub(error, self._urls))[:300],
            "worker": self.ctx.worker_id,
        }
        try:
            async with asyncio.timeout(RECORD_TIMEOUT):
                await outbox.record(
                    self.ctx.pool, "daemon.task_failed", reason=task, details=details
                )
        except Exception as exc:
            # The database may be what failed: then this line is the only record.
            expected = isinstance(exc, asyncpg.PostgresError | TimeoutError)
            if not (expected or is_connection_error(exc)):
                raise
            log.warning("notify.record_failed", kind="daemon.task_failed", error=repr(exc))

    async def _gather(self, *, stopping: bool) -> None:
        targets = list(self.targets.values())
        while await outbox.file_events(self.ctx.pool, targets) == outbox.BATCH:
            pass
        everything = stopping and self.once and self.run_id is None
        await outbox.seal(
            self.ctx.pool, stopping=stopping, everything=everything, run_id=self.run_id
        )

    async def _drop_orphans(self) -> None:
        for row in await outbox.drop_orphans(self.ctx.pool, self.targets):
            log.error(
                "notify.gave_up",
                target=row["target"],
                message=row["id"],
                attempts=row["attempts"],
                reason="not_configured",
            )

    def _start_senders(self, session: aiohttp.ClientSession) -> None:
        for key, target in self.targets.items():
            if key not in self._senders:
                self._senders[key] = asyncio.create_task(
                    self._send_due(session, target), name=f"notify:{key}"
                )

    def _reap(self) -> None:
        """Forget finished senders; a sender's bug surfaces here and stops the daemon."""
        for key, sender in list(self._senders.items()):
            if sender.done():
                del self._senders[key]
                sender.result()

    async def _final(self, session: aiohttp.ClientSession) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FINAL_FLUSH):
                # Senders under way finish first: a claimed message is not claimed twice.
                if self._senders:
                    await asyncio.wait(self._senders.values())
                self._reap()
                try:
                    await self._gather(stopping=True)
                except Exception as exc:
                    if not is_connection_error(exc):
                        raise
                    return  # the outbox keeps everything for the next start
                await asyncio.gather(*(self._send_due(session, t) for t in self.targets.values()))

    async def _send_due(self, session: aiohttp.ClientSession, target: NotifySettings) -> None:
        try:
            for _ in range(PER_TICK):
                claimed = await outbox.claim(
                    self.ctx.pool, target.key, target.timeout + LEASE_MARGIN
                )
                if claimed is None:
                    return
                await self._attempt(session, target, claimed)
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            # The loop's DbWatch reports the outage; claims lapse and are taken again.

    async def _attempt(
        self, session: aiohttp.ClientSession, target: NotifySettings, claimed: outbox.Claimed
    ) -> None:
        message = await self._message(claimed)
        try:
            body = render.body(target.format, message)
        except Exception as exc:  # noqa: BLE001 - one odd message must not stop the daemon
            outcome = deliver.Outcome(ok=False, error=f"cannot render the message: {exc!r}")
        else:
            outcome = await deliver.post(session, target.url, target.format, body, target.timeout)
        if outcome.ok:
            await outbox.delivered(self.ctx.pool, claimed.id)
            log.info(
                "notify.sent",
                target=target.key,
                host=urls.host(target.url),
                message=claimed.id,
                group=_group(claimed),
                events=claimed.total,
                attempt=claimed.attempts,
                status=outcome.status,
            )
            return
        await self._failed(target, claimed, outcome)

    async def _message(self, claimed: outbox.Claimed) -> render.Message:
        tally, completed = (None, False)
        if claimed.run_id is not None:
            tally, completed = await outbox.tally(self.ctx.pool, claimed.run_id)
        return render.Message(
            id=claimed.id,
            deployment=self.ctx.settings.deployment,
            items=claimed.items,
            total=claimed.total,
            counts=claimed.counts,
            subject=claimed.subject,
            tally=tally,
            completed=completed,
        )

    async def _failed(
        self, target: NotifySettings, claimed: outbox.Claimed, outcome: deliver.Outcome
    ) -> None:
        error = urls.scrub(outcome.error or "no answer", self._urls)
        delay = backoff.delay(claimed.attempts, BACKOFF_BASE, BACKOFF_CAP)
        fields = {
            "target": target.key,
            "host": urls.host(target.url),
            "message": claimed.id,
            "group": _group(claimed),
            "status": outcome.status,
            "error": error,
        }
        late = datetime.now(UTC) + timedelta(seconds=delay) > claimed.give_up_at
        if outcome.permanent or late:
            await outbox.drop(self.ctx.pool, claimed.id)
            reason = "permanent" if outcome.permanent else "give_up_after"
            log.error("notify.gave_up", attempts=claimed.attempts, reason=reason, **fields)
            return
        await outbox.retry(self.ctx.pool, claimed.id, delay, error)
        log.warning("notify.failed", attempt=claimed.attempts, retry_in=round(delay, 3), **fields)


def _group(claimed: outbox.Claimed) -> str:
    return f"run {claimed.run_id}" if claimed.run_id is not None else "events"
