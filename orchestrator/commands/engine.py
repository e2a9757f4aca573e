"""`cvm-backup run [--once]`, `backup-now POLICY [--wait]` and `status [--json]`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from orchestrator import config, logs

_PROGRESS_INTERVAL = 0.5

_STATUS = """
SELECT p.name AS policy, p.enabled, j.instance_id, j.state, j.slot, j.reason,
       j.last_error_code AS error_code, j.last_error_message AS error_message, j.finished_at,
       g.image_id AS latest_image, g.slot AS latest_image_slot
FROM policies p
LEFT JOIN LATERAL (
    -- The latest job of each instance: a backward scan of the (policy, instance, slot) key.
    SELECT DISTINCT ON (instance_id) * FROM jobs
    WHERE policy_id = p.id ORDER BY instance_id, slot DESC, id DESC
) j ON true
LEFT JOIN LATERAL (
    SELECT i.image_id, i.slot FROM images i
    WHERE i.policy_id = p.id AND i.instance_id = j.instance_id AND i.state = 'NORMAL'
      AND i.deleted_at IS NULL
    ORDER BY i.slot DESC LIMIT 1
) g ON true
ORDER BY p.name, j.instance_id
"""


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
            engine = daemon.Engine(ctx, signals, once=True, run_id=scheduled.run_id)
            progress = asyncio.create_task(_progress(pool, scheduled.run_id, signals.stop))
            try:
                return await engine.run()
            finally:
                progress.cancel()
                await asyncio.gather(progress, return_exceptions=True)
                print(
                    _progress_line(scheduled.run_id, await _tally(pool, scheduled.run_id)),
                    flush=True,
                )
    finally:
        signals.uninstall()


async def _tally(pool: Any, run_id: int) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT state, count(*) AS n FROM jobs WHERE run_id = $1 GROUP BY state", run_id
    )
    return {row["state"]: int(row["n"]) for row in rows}


def _progress_line(run_id: int, tally: dict[str, int]) -> str:
    from orchestrator.jobs import TERMINAL_STATES

    done = sum(n for state, n in tally.items() if state in TERMINAL_STATES)
    parts = ", ".join(f"{state} {n}" for state, n in sorted(tally.items()))
    return f"run {run_id}: {done}/{sum(tally.values())} terminal ({parts or 'no jobs'})"


async def _progress(pool: Any, run_id: int, stop: asyncio.Event) -> None:
    last = ""
    while not stop.is_set():
        line = _progress_line(run_id, await _tally(pool, run_id))
        if line != last:
            print(line, flush=True)
            last = line
        await asyncio.sleep(_PROGRESS_INTERVAL)


def run_status(args: argparse.Namespace) -> int:
    """Per policy and instance: last job, its state and error, latest good image."""
    rows = asyncio.run(_status_rows(config.load()))
    if args.json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        print()
    else:
        print(_table(rows))
    return 0


async def _status_rows(settings: config.Settings) -> list[dict[str, Any]]:
    from orchestrator.db import migrate, pool

    conn = await pool.connect(settings)
    try:
        await migrate.ensure_current(conn)
        return [_row(dict(r)) for r in await conn.fetch(_STATUS)]
    finally:
        await conn.close()


def _row(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("slot", "finished_at", "latest_image_slot"):
        if row[key] is not None:
            row[key] = row[key].isoformat()
    return row


def _table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("POLICY", "INSTANCE", "LAST JOB", "SLOT", "ERROR", "LATEST GOOD IMAGE")
    lines = [header]
    for r in rows:
        error = f"{r['error_code']}: {r['error_message']}" if r["state"] == "failed" else ""
        state = r["state"] or "-"
        if r["reason"] and r["state"] in ("skipped", "expired"):
            state = f"{state} ({r['reason']})"
        image = f"{r['latest_image']} ({r['latest_image_slot']})" if r["latest_image"] else "-"
        policy = r["policy"] if r["enabled"] else f"{r['policy']} (disabled)"
        lines.append((policy, r["instance_id"] or "-", state, r["slot"] or "-", error, image))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
