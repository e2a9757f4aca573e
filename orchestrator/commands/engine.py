"""`cvm-backup run [--once]`, `backup-now POLICY [--wait]` and `status [--json]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

from orchestrator import config, logs

if TYPE_CHECKING:
    from orchestrator.daemon import Engine


def register(subparsers: Any) -> None:
    """Add the engine commands."""
    run = subparsers.add_parser("run", help="the backup daemon")
    run.add_argument(
        "--once",
        action="store_true",
        help="one scheduling pass, drain every due job to a terminal state, exit",
    )
    run.set_defaults(handler=run_daemon)
    now = subparsers.add_parser("backup-now", help="a run for the current minute's slot")
    now.add_argument("policy", metavar="POLICY", help="policy name")
    now.add_argument(
        "--wait",
        action="store_true",
        help="drive the run here, show progress, return when every job is terminal",
    )
    now.set_defaults(handler=run_backup_now)
    status = subparsers.add_parser("status", help="last job and latest good image per instance")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=run_status)


def _settings() -> config.Settings:
    settings = config.load()
    logs.configure(settings.log_format, settings.log_level)
    return settings


def run_daemon(args: argparse.Namespace) -> int:
    """The daemon; exit 0 after SIGTERM, 1 when a --once job failed or a task died."""
    from orchestrator import daemon

    settings = _settings()
    return asyncio.run(daemon.run(settings, once=args.once))


def run_backup_now(args: argparse.Namespace) -> int:
    """Create (or find) the run of the current minute; with --wait, drive it to the end."""
    return asyncio.run(_backup_now(_settings(), args.policy, wait=args.wait))


async def _backup_now(settings: config.Settings, policy: str, *, wait: bool) -> int:
    from orchestrator import daemon, scheduler

    signals = daemon.Signals()
    signals.install()
    try:
        async with daemon.open_pool(settings) as pool, daemon.engine_context(settings, pool) as ctx:
            scheduled = await scheduler.backup_now(ctx, policy)
            verb = "created" if scheduled.created else "exists"
            print(
                f"run {scheduled.run_id} {verb}: policy {policy}, slot "
                f"{scheduled.slot.isoformat()}",
                flush=True,
            )
            if not wait:
                return 0
            engine = await daemon.leased_engine(ctx, signals, once=True, run_id=scheduled.run_id)
            return await _drive(engine, pool, scheduled.run_id, signals.stop)
    finally:
        signals.uninstall()


async def _drive(engine: Engine, pool: Any, run_id: int, stop: asyncio.Event) -> int:
    from orchestrator import status

    reporter = status.ProgressReporter(sys.stdout, run_id)
    progress = asyncio.create_task(status.follow(pool, reporter, stop))
    try:
        return await engine.run()
    finally:
        progress.cancel()
        await asyncio.gather(progress, return_exceptions=True)
        reporter.finish(await status.tally(pool, run_id))


def run_status(args: argparse.Namespace) -> int:
    """Per policy and instance: last job, its state and error, latest good image and its age."""
    from orchestrator import status

    rows = asyncio.run(_status_rows(config.load()))
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        print(status.render_table(rows))
    return 0


async def _status_rows(settings: config.Settings) -> list[dict[str, Any]]:
    from orchestrator import status
    from orchestrator.db import migrate, pool

    conn = await pool.connect(settings)
    try:
        await migrate.ensure_current(conn)
        return await status.fetch_rows(conn)
    finally:
        await conn.close()
