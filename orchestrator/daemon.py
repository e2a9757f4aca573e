"""The daemon: wires scheduler, dispatcher, heartbeat and tracker; signals; graceful stop; --once.

Signal handlers only set events; the loops do the work. The first SIGTERM/SIGINT stops claiming,
gives in-flight calls `shutdown_grace` seconds, releases the leases of whatever did not finish and
exits 0; a second one exits at once (leases then lapse and the jobs are reclaimed, which is exactly
what a crash does). Every background task is supervised: one that dies stops the daemon with a clear
error instead of leaving it hanging half-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg

from orchestrator import jobs, logs, pauses, reconcile, sweep
from orchestrator.accounts import AccountLeases
from orchestrator.config import Settings
from orchestrator.context import EngineContext
from orchestrator.db.resilience import DB_ERRORS, DbWatch
from orchestrator.dispatcher import Dispatcher
from orchestrator.limiter import Limiters
from orchestrator.notify.task import Notifier
from orchestrator.pauses import ProbeTimings
from orchestrator.prober import Prober
from orchestrator.scheduler import Scheduler

log = logs.get("daemon")

EXIT_OK = 0
EXIT_JOBS_FAILED = 1  # docs/design.md#exit-codes: some job ended failed or expired
EXIT_TASK_DIED = 1  # a background task died: non-zero, with daemon.task_failed logged
EXIT_FORCED = 128 + signal.SIGTERM
# How often --once checks whether everything is drained, and completed runs are swept.
_SWEEP_INTERVAL = 0.2
# How often unclaimed jobs past their window are expired (a scan of the live jobs).
_EXPIRE_INTERVAL = 5.0


def worker_id() -> str:
    """A lease owner unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@asynccontextmanager
async def engine_context(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[EngineContext]:
    """One API client per configured account, sharing one limiter; closed on exit."""
    from orchestrator.limiter import Limiters
    from orchestrator.tencent.client import CvmClient
    from orchestrator.tencent.credentials import default_chain

    limiters = Limiters.from_settings(settings)
    async with AsyncExitStack() as stack:
        clients = {}
        for account in settings.accounts:
            client = CvmClient(
                credentials=default_chain(account),
                endpoint=settings.endpoint,
                limiter=limiters,
                account=account.name,
                timeout=settings.request_timeout,
            )
            clients[account.name] = await stack.enter_async_context(client)
        yield EngineContext(pool=pool, clients=clients, settings=settings, worker_id=worker_id())


async def account_leases(
    ctx: EngineContext, on_change: Callable[[str, bool], None]
) -> AccountLeases:
    """Leases for every configured account, after a first try (so claiming starts at once)."""
    from orchestrator.db import pool

    settings = ctx.settings
    leases = AccountLeases(ctx.clients, lambda: pool.connect(settings), on_change=on_change)
    await leases.try_once()
    return leases


@asynccontextmanager
async def open_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """The pool, after checking the schema is exactly current (refuse to start otherwise)."""
    from orchestrator.db import migrate, pool

    conn = await pool.connect(settings)
    try:
        await migrate.ensure_current(conn)
    finally:
        await conn.close()
    # Jobs in flight each hold a connection briefly; the scheduler holds one for LISTEN.
    size = max(10, min(settings.max_in_flight // 4, 40))
    db_pool = await pool.connect_pool(settings, max_size=size)
    try:
        yield db_pool
    finally:
        await db_pool.close()


@dataclass
class Signals:
    """What signal handlers set: `stop` on the first signal, `force` on the second."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    force: asyncio.Event = field(default_factory=asyncio.Event)

    def received(self) -> None:
        """Signal handler body: only sets events."""
        (self.force if self.stop.is_set() else self.stop).set()

    def install(self) -> None:
        """Handle SIGTERM and SIGINT in the running loop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.received)

    def uninstall(self) -> None:
        """Restore default handling."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class Engine:
    """One running engine: its loops, their supervision and the graceful stop."""

    def __init__(
        self,
        ctx: EngineContext,
        signals: Signals,
        *,
        once: bool = False,
        run_id: int | None = None,
        leases: AccountLeases | None = None,
        probe: ProbeTimings | None = None,
    ) -> None:
        self.ctx = ctx
        self.signals = signals
        self.once = once
        self.run_id = run_id
        self.started_at = datetime.now(UTC)
        # None: this engine drives every account (no other replica to share them with).
        self.leases = leases
        held = leases.held if leases is not None else None
        self.dispatcher = Dispatcher(ctx, run_id=run_id, held=held, probe=probe)
        # Paused accounts are probed by the replica driving them (orchestrator.prober).
        self.prober = Prober(
            ctx, held=self._driven, timings=probe, on_change=self.dispatcher.pause_changed
        )
        # Each pause the dispatcher records reaches the prober, whose next round then tells
        # the dispatcher when it is lifted, however soon after.
        self.dispatcher.on_paused = self.prober.noted
        self.scheduler = Scheduler(ctx, on_created=self.dispatcher.wake, driven=self._driven)
        # Webhooks ([[notify]]): fed by triggers from the jobs and events tables, so nothing
        # above ever waits for a receiver.
        self.notifier = Notifier(ctx, once=once, run_id=run_id)
        self._beat_stop = asyncio.Event()
        self._failed: list[str] = []

    async def run(self) -> int:
        """Run until stopped (or drained with `once`); the process exit code."""
        stop = self.signals.stop
        log.info(
            "daemon.started",
            worker=self.ctx.worker_id,
            once=self.once,
            accounts=sorted(self.ctx.clients),
            max_in_flight=self.ctx.settings.max_in_flight,
        )
        if self.once:
            # A due probe goes first, so a fixed account's jobs count in this drain.
            await self.prober.round()
        if self.once and self.run_id is None:
            await self.scheduler.pass_once()
        beat = self._background()
        loops = self._loops(stop)
        force = asyncio.create_task(self._force_exit(), name="force")
        try:
            # Supervised tasks set `stop` themselves when they die, so this is the only wait.
            await stop.wait()
            log.info("daemon.stopping", reason=self._stop_reason())
            await self._wind_down(loops, beat)
        finally:
            # Normally all done by now; when run() itself is cancelled, take every task down too.
            for task in (force, *beat, *loops):
                task.cancel()
            self.dispatcher.cancel_all()
        return await self._exit_code()

    def _background(self) -> list[asyncio.Task[None]]:
        # These outlive the loops: leases and job leases are kept until in-flight calls end.
        made: list[tuple[str, Callable[[asyncio.Event], Awaitable[None]]]] = [
            ("heartbeat", self.dispatcher.heartbeat)
        ]
        if self.leases is not None:
            made.append(("account_leases", self.leases.run))
        return [
            asyncio.create_task(self._supervised(name, fn, self._beat_stop), name=name)
            for name, fn in made
        ]

    def _driven(self) -> Collection[str]:
        """The accounts this engine drives: the leased ones, or every configured one."""
        return self.ctx.clients.keys() if self.leases is None else self.leases.held()

    def lease_changed(self, account: str, gained: bool) -> None:
        """An account lease was gained or lost: fresh limiter on gain, claim at once."""
        if gained:
            limiter = self.ctx.client(account).limiter
            if isinstance(limiter, Limiters):
                # The previous holder may have just used the whole second (invariant 2,
                # docs/design.md#invariants).
                limiter.forget(account)
            self.dispatcher.wake.set()
            self.scheduler.leases_changed()

    def _loops(self, stop: asyncio.Event) -> list[asyncio.Task[None]]:
        from orchestrator import history, tracker

        held = self.leases.held if self.leases is not None else None
        made: list[tuple[str, Callable[[asyncio.Event], Awaitable[None]]]] = [
            ("dispatcher", self.dispatcher.run),
            ("tracker", lambda s: tracker.run(self.ctx, s, held)),
            ("sweeper", self._sweep),
            ("prober", self.prober.run),
            ("notify", self.notifier.run),
        ]
        if not self.once:
            made.append(("scheduler", self.scheduler.run))
            made.append(("retention", lambda s: sweep.run(self.ctx, s, self._driven)))
            made.append(("reconcile", lambda s: reconcile.run(self.ctx, s, self._driven)))
            # Old finished rows go in small batches, only while this replica holds a lease.
            made.append(("history", lambda s: history.run(self.ctx, s, self._driven)))
        from orchestrator import health

        # Served by default (a --once drain only when asked): metrics_address = "off" opts out.
        if health.wanted(self.ctx.settings, once=self.once):
            made.append(("health", self._health))
        return [
            asyncio.create_task(self._supervised(name, fn, stop), name=name) for name, fn in made
        ]

    async def _health(self, stop: asyncio.Event) -> None:
        from orchestrator import health

        def ready() -> bool:
            return not self._failed and not self.signals.stop.is_set()

        # Database numbers only for the accounts this replica drives: replicas do not repeat them.
        await health.run(self.ctx, self.ctx.settings, ready, stop, held=self._driven)

    async def _supervised(
        self, name: str, fn: Callable[[asyncio.Event], Awaitable[None]], until: asyncio.Event
    ) -> None:
        try:
            await fn(until)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed.append(name)
            log.exception("daemon.task_failed", task=name, error=repr(exc))
            await self.notifier.task_failed(name, repr(exc))
            self.signals.stop.set()
            return
        if not until.is_set():
            self._failed.append(name)
            log.error("daemon.task_failed", task=name, error="returned while the daemon ran")
            await self.notifier.task_failed(name, "returned while the daemon ran")
            self.signals.stop.set()

    def _stop_reason(self) -> str:
        if self._failed:
            return f"task failed: {', '.join(self._failed)}"
        return "drained" if self.once else "signal"

    async def _wind_down(
        self, loops: list[asyncio.Task[None]], beat: list[asyncio.Task[None]]
    ) -> None:
        clock = asyncio.get_running_loop()
        deadline = clock.time() + self.ctx.settings.shutdown_grace
        # Loops see `stop` and return at their next await; in-flight calls get what is left of
        # the grace period, then are cancelled and their leases released.
        _, late = await asyncio.wait(loops, timeout=self.ctx.settings.shutdown_grace)
        for task in late:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        released = await self.dispatcher.shutdown(max(deadline - clock.time(), 0.0))
        self._beat_stop.set()
        await asyncio.gather(*beat, return_exceptions=True)
        try:
            await self._complete_runs()
        except DB_ERRORS as exc:
            # The next daemon's sweeper completes them; stopping cleanly matters more.
            log.warning("sweeper.db_error", error=repr(exc))
        log.info("daemon.stopped", released=len(released), failed_tasks=self._failed)

    async def _force_exit(self) -> None:
        await self.signals.force.wait()
        log.error("daemon.killed", reason="second signal: exiting at once")
        sys.stderr.flush()
        os._exit(EXIT_FORCED)

    async def _sweep(self, stop: asyncio.Event) -> None:
        """Complete finished runs; with --once, stop when no live job is left."""
        watch = DbWatch("sweeper", stop)
        loop = asyncio.get_running_loop()
        expire_at = loop.time()
        while not stop.is_set():
            async with watch:
                if loop.time() >= expire_at:
                    await self._expire_overdue()
                    expire_at = loop.time() + _EXPIRE_INTERVAL
                await self._complete_runs()
                if self.once and await self._drained():
                    # The retention sweep of a drain: once, after this run's own retention.
                    await sweep.sweep(self.ctx, self._driven())
                    stop.set()
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=_SWEEP_INTERVAL)

    async def _drained(self) -> bool:
        if self.dispatcher.in_flight:
            return False
        # A paused account's jobs wait for a probe or an operator, not for this drain.
        return await jobs.live_count(self.ctx.pool, run_id=self.run_id) == 0

    async def _expire_overdue(self) -> None:
        for row in await jobs.expire_overdue(self.ctx.pool):
            log.warning(
                "job.expired",
                job=row["id"],
                account=row["account"],
                instance=row["instance_id"],
                reason="window_closed",
                unclaimed=True,
            )

    async def _complete_runs(self) -> None:
        for row in await jobs.complete_runs(self.ctx.pool):
            log.info(
                "run.completed",
                run=row["id"],
                policy_id=row["policy_id"],
                slot=row["slot"].isoformat(),
                jobs=row["tally"] or {},
            )

    async def _exit_code(self) -> int:
        if self._failed:
            return EXIT_TASK_DIED
        if not self.once:
            return EXIT_OK
        # A drained run counts as a whole; a daemon pass counts what finished while it ran.
        bad = await self.ctx.pool.fetchval(
            "SELECT count(*) FROM jobs WHERE state IN ('failed', 'expired')"
            " AND CASE WHEN $2::bigint IS NULL THEN finished_at >= $1 ELSE run_id = $2 END",
            self.started_at,
            self.run_id,
        )
        # Jobs left waiting behind a paused account did not get their backup either.
        stuck = await pauses.held_back(self.ctx.pool, self.run_id) > 0
        return EXIT_JOBS_FAILED if int(bad or 0) or stuck else EXIT_OK


async def leased_engine(
    ctx: EngineContext, signals: Signals, *, once: bool = False, run_id: int | None = None
) -> Engine:
    """An engine that drives only the accounts whose lease it holds (or takes over later).

    Every process that calls the API goes through this, `backup-now --wait` included: with a
    daemon holding an account, the daemon makes the calls and this process only waits.
    """
    engine = Engine(ctx, signals, once=once, run_id=run_id)
    engine.leases = await account_leases(ctx, engine.lease_changed)
    engine.dispatcher.held = engine.leases.held
    return engine


async def run(settings: Settings, *, once: bool = False, run_id: int | None = None) -> int:
    """Run the daemon (or drain once) with real signals; returns the exit code."""
    signals = Signals()
    signals.install()
    try:
        async with open_pool(settings) as pool, engine_context(settings, pool) as ctx:
            engine = await leased_engine(ctx, signals, once=once, run_id=run_id)
            return await engine.run()
    finally:
        signals.uninstall()


def main(make: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """asyncio.run for command handlers."""
    return asyncio.run(make())
