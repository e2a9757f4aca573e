"""Running the demo: database, simulator, policies, two slots through the real engine, summary.

Each slot is what a daemon does when a slot comes due: a scheduling pass (`Scheduler.pass_once`
at the slot's time) and then `Engine(once=True)`, the code of `cvm-backup run --once`, until
every job is terminal. Slot 1 is the current hour's; slot 2 is the next hour's, reached by
handing the scheduler that time instead of waiting an hour.

Everything the demo starts is stopped in `finally` blocks, in reverse order: engine tasks,
HTTP session, pool, simulator, embedded Postgres, temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import asyncpg
import structlog

from orchestrator import daemon, logs
from orchestrator.config import RetrySettings, Settings
from orchestrator.context import EngineContext
from orchestrator.db import migrate, pool
from orchestrator.db import policies as policy_rows
from orchestrator.demo import report
from orchestrator.demo.progress import WATCHED_ACTION, LiveView
from orchestrator.demo.scenario import FULL, REGION, Scale, Scenario, build
from orchestrator.demo.workspace import Workspace, default_log_path, open_log, workspace
from orchestrator.errors import UsageError
from orchestrator.limiter import Limiters
from orchestrator.policies import Policy, latest_slot_at_or_before, next_slot_after
from orchestrator.scheduler import Scheduler
from orchestrator.simulator.runner import Simulator, run_simulator
from orchestrator.tencent.client import CvmClient
from orchestrator.tencent.credentials import Credentials, StaticCredentials

ACCOUNT = "default"
SLOTS = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What the command line chose."""

    scale: Scale = FULL
    database_url: str | None = None
    log_file: Path | None = None
    json_file: Path | None = None


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> int:
    """The whole demo, start to clean-up; 0 when every invariant held."""
    started = time.monotonic()
    log_path = open_log(options.log_file or default_log_path())
    scenario = build(options.scale)
    if not options.database_url:
        _say(out, "cvm-backup demo: starting an embedded Postgres in a temporary directory ...")
    with _daemon_log(log_path), workspace(options.database_url) as ws:
        demo = Demo(scenario, ws, out, log_path, options.json_file)
        code = asyncio.run(demo.run())
    cleaned = "embedded Postgres stopped, temporary directory removed, " if ws.temporary else ""
    _say(
        out,
        f"\nDemo finished in {time.monotonic() - started:.0f} s ({cleaned}simulator stopped)."
        f"\nDaemon log (JSON lines): {log_path}",
    )
    return code


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


@contextmanager
def _daemon_log(path: Path) -> Iterator[None]:
    """Send every structured log event to `path`, so the live view stays readable."""
    with path.open("a", encoding="utf-8") as stream:
        logs.configure("json", "info", stream=stream)
        try:
            yield
        finally:
            structlog.reset_defaults()


def demo_settings(scale: Scale, dsn: str, endpoint: str) -> Settings:
    """Daemon settings tuned to the simulator's short builds and busy periods."""
    low, high = scale.build_seconds
    return Settings(
        database_url=dsn,
        endpoint=endpoint,
        request_timeout=5.0,
        max_in_flight=32,
        lease_seconds=10.0,
        poll_interval=1.0,
        tracker_min_interval=max(low / 4, 0.05),
        tracker_max_interval=max(high / 2, 0.2),
        shutdown_grace=3.0,
        log_format="json",
        retry=RetrySettings(
            transient_base=0.3,
            busy_base=max(scale.busy_seconds / 2, 0.1),
            max_delay=3.0,
            max_transient_attempts=8,
            throttle_delay=0.2,
        ),
    )


async def prepare_database(ws: Workspace, policies: Sequence[Policy]) -> None:
    """Migrate and apply the policies; tune a throwaway server; refuse a database in use."""
    conn = await pool.connect_dsn(ws.dsn)
    try:
        if ws.temporary:
            # Durability buys nothing for a database deleted in two minutes.
            await conn.execute("ALTER SYSTEM SET fsync = off")
            await conn.execute("ALTER SYSTEM SET synchronous_commit = off")
            await conn.execute("SELECT pg_reload_conf()")
        await migrate.migrate(conn)
        if not ws.temporary:
            await _require_empty(conn)
        await policy_rows.apply(conn, policies)
    finally:
        await conn.close()


async def _require_empty(conn: asyncpg.Connection) -> None:
    used = await conn.fetchval(
        "SELECT (SELECT count(*) FROM policies) + (SELECT count(*) FROM runs)"
    )
    if used:
        raise UsageError(
            "demo: --database-url points at a database that already holds policies or runs; "
            "give the demo an empty scratch database"
        )


@asynccontextmanager
async def demo_context(
    settings: Settings, db_pool: asyncpg.Pool, scenario: Scenario, limiters: Limiters
) -> AsyncIterator[EngineContext]:
    """The engine's context, with the simulator's keys given directly (never the environment)."""
    keys = Credentials(scenario.secret_id, scenario.secret_key, source="demo")
    client = CvmClient(
        credentials=StaticCredentials(keys),
        endpoint=settings.endpoint,
        limiter=limiters,
        account=ACCOUNT,
        timeout=settings.request_timeout,
    )
    async with client:
        yield EngineContext(db_pool, {ACCOUNT: client}, settings, daemon.worker_id())


class Interrupts:
    """Ctrl-C or SIGTERM: stop the engine gracefully, skip what is left, still clean up."""

    def __init__(self) -> None:
        self.requested = False
        self.engine: daemon.Signals | None = None

    def received(self) -> None:
        """Signal handler body: only sets flags and events."""
        self.requested = True
        if self.engine is not None:
            self.engine.stop.set()

    def install(self) -> None:
        """Handle SIGINT and SIGTERM in the running loop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.received)

    def uninstall(self) -> None:
        """Restore default handling."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


class Demo:
    """One demo run inside the workspace."""

    def __init__(
        self, scenario: Scenario, ws: Workspace, out: TextIO, log: Path, json_file: Path | None
    ) -> None:
        self.scenario = scenario
        self.ws = ws
        self.out = out
        self.log = log
        self.json_file = json_file
        self.interrupts = Interrupts()

    async def run(self) -> int:
        """Set up, drive both slots, report; the exit code."""
        await prepare_database(self.ws, self.scenario.policies())
        async with run_simulator(self.scenario.sim) as sim:
            settings = demo_settings(self.scenario.scale, self.ws.dsn, sim.url)
            limiters = Limiters.from_settings(settings)
            async with (
                daemon.open_pool(settings) as db_pool,
                demo_context(settings, db_pool, self.scenario, limiters) as ctx,
            ):
                self._intro(sim)
                self.interrupts.install()
                view = LiveView(self.out, db_pool, limiters, settings.limits[WATCHED_ACTION])
                try:
                    slots = await self._drive(ctx, sim, view)
                finally:
                    self.interrupts.uninstall()
                return await self._finish(db_pool, sim, slots)

    async def _drive(
        self, ctx: EngineContext, sim: Simulator, view: LiveView
    ) -> list[report.DrivenSlot]:
        policy = self.scenario.policies()[0]
        done: list[report.DrivenSlot] = []
        for number in range(1, SLOTS + 1):
            if self.interrupts.requested:
                break
            if number == 1:
                slot = latest_slot_at_or_before(policy, datetime.now(UTC))
            else:
                slot = next_slot_after(policy, done[-1][0])
            self._make_busy(sim)
            done.append((slot, await self._slot(ctx, view, number, slot)))
        return done

    def _make_busy(self, sim: Simulator) -> None:
        # Busy from now, not from the simulator's start: each slot's first calls meet it.
        for instance_id in self.scenario.busy_ids:
            sim.set_busy(instance_id, self.scenario.scale.busy_seconds)

    async def _slot(
        self, ctx: EngineContext, view: LiveView, number: int, slot: datetime
    ) -> tuple[int, int]:
        """Schedule `slot` and drain it with the engine; the ledger id range of its drive."""
        why = "the current hour" if number == 1 else "the next hour: the scheduler is told the time"
        _say(self.out, f"\nSlot {number} of {SLOTS}: {slot:%Y-%m-%d %H:%M} UTC ({why})")
        before = await report.event_watermark(ctx.pool)
        started = time.monotonic()
        await Scheduler(ctx).pass_once(slot)
        signals = daemon.Signals()
        self.interrupts.engine = signals
        if self.interrupts.requested:  # arrived while scheduling: drain nothing more
            signals.stop.set()
        stop_view = asyncio.Event()
        follow = asyncio.create_task(view.follow(f"slot {number}", slot, stop_view))
        try:
            await daemon.Engine(ctx, signals, once=True).run()
        finally:
            stop_view.set()
            await follow
            self.interrupts.engine = None
        _say(self.out, f"Slot {number} drained in {time.monotonic() - started:.1f} s.")
        return before, await report.event_watermark(ctx.pool)

    def _intro(self, sim: Simulator) -> None:
        policies = self.scenario.policies()
        for line in intro_lines(self.scenario, self.ws, sim, policies, self.log):
            _say(self.out, line)

    async def _finish(
        self,
        db_pool: asyncpg.Pool,
        sim: Simulator,
        slots: Sequence[report.DrivenSlot],
    ) -> int:
        if not slots:
            _say(self.out, "\nInterrupted before the first slot.")
            return EXIT_INTERRUPTED
        foreign = [seed.image_id for seed in self.scenario.foreign]
        expected = self.scenario.jobs_per_slot
        result = await report.build_report(db_pool, sim, slots, foreign, expected)
        _say(self.out, "\n" + report.render(result))
        if self.json_file is not None:
            self.json_file.write_text(json.dumps(report.as_json(result), indent=2) + "\n")
        if self.interrupts.requested:
            _say(
                self.out,
                "\nInterrupted: the summary covers what ran; jobs in flight were released, "
                "as `cvm-backup run` does on SIGTERM.",
            )
            return EXIT_INTERRUPTED
        return 0 if result.ok else 1


def _targets(policy: Policy) -> str:
    parts = [f"tag {k}={v}" for k, v in policy.instance_tags.items()]
    if policy.instance_ids:
        parts.append(f"{len(policy.instance_ids)} explicit ids")
    return " + ".join(parts)


def intro_lines(
    scenario: Scenario, ws: Workspace, sim: Simulator, policies: Sequence[Policy], log: Path
) -> list[str]:
    """What the demo set up, in a few lines."""
    s = scenario.scale
    where = (
        f"embedded Postgres in {ws.home} (deleted at the end)"
        if ws.temporary
        else "the one given with --database-url (its data is kept)"
    )
    lines = [
        f"  database    {where}",
        f"  simulator   CVM API at {sim.url}, region {REGION}, image quota {scenario.quota}",
        f"  fleet       {s.instances} instances: {len(scenario.busy_ids)} busy for "
        f"{s.busy_seconds:g} s, {len(scenario.failing_ids)} whose images end CREATEFAILED,",
        f"              {len(scenario.legacy_ids)} answering CreateImage without ImageId (older "
        f"API), {len(scenario.foreign)} images that are not ours,",
        f"              ~{s.fault_rate:.0%} of CreateImage calls fail transiently, image builds "
        f"take {s.build_seconds[0]:g}-{s.build_seconds[1]:g} s",
    ]
    for n, p in enumerate(policies):
        label = "policies" if n == 0 else ""
        lines.append(
            f"  {label:<11} {p.name}: {_targets(p)}, schedule '{p.schedule}', "
            f"keep_last {p.retention.keep_last}, on_quota {p.on_quota}"
        )
    lines.append(f"  limits      {WATCHED_ACTION} {sim.config.limit(WATCHED_ACTION)}/s (enforced)")
    lines.append(f"  daemon log  {log}")
    return lines
