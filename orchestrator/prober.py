"""The prober: resumes a paused account or region by itself once a probe shows it works again.

The replica driving an account (holding its lease, `orchestrator.accounts`) probes each pause
of its accounts (`orchestrator.pauses`) when the row's `probe_at` comes, with one CreateImage
DryRun through the account's shared limiter, in the pause's region and on the instance whose
job was refused: a regional pause (a CAM denial, which can be scoped per region, resource or
tag) is lifted by a probe of its own scope only, and lifts nothing else. A DryRun rather than a
read call because it is checked like the call that failed: a CAM policy may allow Describe* and
refuse CreateImage, and a balance problem shows on CreateImage, so a read call could answer
"fine" and resume an account only to fail its next job. No image is made and no quota is used.

The answer decides: success (or any answer that is not account-wide: the account got past
authentication and authorization) lifts the pause; an account-wide answer pushes the next probe
out with a bounded backoff; no answer (throttled, a timeout, a 5xx) tries again soon.
Each round also re-reads the table, so a pause lifted elsewhere (`cvm-backup account resume`,
another replica) reaches this replica's dispatcher within one round.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Protocol

from orchestrator import logs, pauses
from orchestrator.context import EngineContext
from orchestrator.db.resilience import DbWatch
from orchestrator.pauses import Pause, ProbeTimings, Scope
from orchestrator.tencent.errors import ErrorClass, TencentError

log = logs.get("prober")

# The DryRun's image name: never created, only validated (at most 60 characters).
PROBE_IMAGE_NAME = "cvmbk-account-probe"
# Answers that say nothing about the account: try again after `ProbeTimings.retry`.
_NO_ANSWER = frozenset({ErrorClass.THROTTLED, ErrorClass.TRANSIENT, ErrorClass.BUSY})


class OnChange(Protocol):
    """Told when a pause appears or goes: `region` None for an account-wide one."""

    def __call__(self, account: str, paused: bool, region: str | None = None) -> None: ...


class Prober:
    """Keeps this replica's view of pauses current and probes the due ones."""

    def __init__(
        self,
        ctx: EngineContext,
        *,
        held: Callable[[], Collection[str]] | None = None,
        timings: ProbeTimings | None = None,
        on_change: OnChange | None = None,
    ) -> None:
        self.ctx = ctx
        self.held = held  # the accounts this replica drives; None: every configured one
        self.timings = timings or ProbeTimings()
        self.on_change = on_change
        self.wake = asyncio.Event()
        # Each pause this replica knows of, with when it learnt of it (monotonic): from a
        # round's read of the table, or from its own dispatcher (`noted`) the moment it paused.
        self._seen: dict[Scope, float] = {}

    @property
    def paused(self) -> frozenset[str]:
        """The accounts of this replica with any pause (account-wide or regional), last round."""
        return frozenset(account for account, _ in self._seen)

    @property
    def scopes(self) -> frozenset[Scope]:
        """The pauses of this replica as of the last round: (account, region or None)."""
        return frozenset(self._seen)

    def noted(self, scope: Scope) -> None:
        """This replica's dispatcher just recorded the pause `scope` (the row is committed)."""
        self._seen.setdefault(scope, time.monotonic())

    async def run(self, stop: asyncio.Event) -> None:
        """Probe due pauses until `stop`; a round every poll interval or when woken."""
        watch = DbWatch("prober", stop)
        while not stop.is_set():
            wait = self.ctx.settings.poll_interval
            async with watch:
                wait = min(wait, await self.round())
            await self._sleep(stop, wait)

    async def round(self) -> float:
        """Re-read the pauses, probe the due ones; seconds until the next probe is due."""
        self.wake.clear()
        accounts = self._accounts()
        read_at = time.monotonic()
        current = await pauses.listed(self.ctx.pool, accounts)
        self._sync({p.scope for p in current}, accounts, read_at)
        due = [p for p in current if p.probe_at <= _now()]
        for pause in due:
            await self.probe(pause)
        if due or not current:
            # Probed rows moved on: the next round reads when they are due again.
            return self.ctx.settings.poll_interval
        return _until(min(p.probe_at for p in current))

    async def probe(self, pause: Pause) -> bool:
        """One probe of a pause, in its region; True when the pause was lifted."""
        client = self.ctx.client(pause.account)
        try:
            await client.create_image(
                pause.region, instance_id=pause.instance_id, name=PROBE_IMAGE_NAME, dry_run=True
            )
        except TencentError as exc:
            return await self._answered(pause, exc)
        return await self._lift(pause, probe_code=None)

    async def _answered(self, pause: Pause, exc: TencentError) -> bool:
        if exc.error_class is ErrorClass.ACCOUNT:
            await self._refused(pause, exc)
            return False
        if exc.error_class in _NO_ANSWER:
            await pauses.postpone(
                self.ctx.pool, pause.account, self.timings.retry, scope_region=pause.scope_region
            )
            log.info(
                "account.probe_retry",
                account=pause.account,
                scope_region=pause.scope_region,
                code=exc.code,
                delay=self.timings.retry,
            )
            return False
        # Refused for a reason of the instance or the request: the account itself answers.
        return await self._lift(pause, probe_code=exc.code)

    async def _refused(self, pause: Pause, exc: TencentError) -> None:
        again = await pauses.refused(
            self.ctx.pool, pause.account, exc, self.timings, scope_region=pause.scope_region
        )
        if again is None:
            return  # lifted meanwhile (an operator): the next round notices
        log.warning(
            "account.probe_failed",
            account=pause.account,
            scope_region=pause.scope_region,
            code=exc.code,
            message=again.message,
            request_id=exc.request_id,
            failed_probes=again.failed_probes,
            next_probe_at=again.probe_at.isoformat(),
        )

    async def _lift(self, pause: Pause, *, probe_code: str | None) -> bool:
        lifted = await pauses.resume(
            self.ctx.pool, pause.account, "probe", scope_region=pause.scope_region
        )
        if lifted is None:
            return False
        log.info(
            "account.resumed",
            account=pause.account,
            scope_region=pause.scope_region,
            by="probe",
            probe_code=probe_code,
            paused_code=lifted.code,
            failed_probes=lifted.failed_probes,
        )
        self._forget(pause.scope)
        return True

    def _sync(self, current: set[Scope], accounts: Collection[str], read_at: float) -> None:
        # A pause known before this read began and absent from it was lifted, even one no
        # round saw (paused and resumed between two rounds); one learnt while the read ran
        # may be missing from it only because its row came later: never mistaken for a lift.
        gone = [s for s, known in self._seen.items() if s not in current and known < read_at]
        for scope in sorted(gone, key=_order):
            if scope[0] in accounts:  # else only its lease went: nothing was lifted
                log.info("account.resumed", account=scope[0], scope_region=scope[1], by="elsewhere")
            self._forget(scope)
        for scope in sorted(current - self._seen.keys(), key=_order):
            self._seen[scope] = read_at
            self._notify(scope, paused=True)

    def _forget(self, scope: Scope) -> None:
        self._seen.pop(scope, None)
        self._notify(scope, paused=False)

    def _notify(self, scope: Scope, *, paused: bool) -> None:
        if self.on_change is not None:
            account, region = scope
            self.on_change(account, paused, region)

    def _accounts(self) -> Collection[str]:
        return self.ctx.clients.keys() if self.held is None else self.held()

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.wake.wait())}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*waiters, return_exceptions=True)


def _order(scope: Scope) -> tuple[str, str]:
    return (scope[0], scope[1] or "")


def _now() -> datetime:
    return datetime.now(UTC)


def _until(when: datetime) -> float:
    return max((when - _now()).total_seconds(), 0.0)
