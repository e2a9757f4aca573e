"""`cvm-backup reconcile [--dry-run] [--json]`: rebuild and correct image rows from the cloud.

After losing the database (or restoring an old dump), the images we made are unknown to the
new one: retention never deletes them and rotation never evicts them. This lists the private
images of every region our policies or image rows use and adopts the ones carrying this
deployment's tags, marks rows whose image is gone as deleted outside, and refreshes the state
of NORMAL rows. The daemon runs the same pass at start and every `reconcile_interval`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from orchestrator import config, logs

EXIT_OK = 0


def register(subparsers: Any) -> None:
    """Add `reconcile`."""
    parser = subparsers.add_parser(
        "reconcile",
        help="adopt this deployment's images the database does not know; mark vanished ones",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="show what would change; write nothing"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run_reconcile)


def run_reconcile(args: argparse.Namespace) -> int:
    """Reconcile every configured account; print what was adopted, marked gone, left alone."""
    settings = config.load()
    logs.configure(settings.log_format, settings.log_level)
    report = asyncio.run(_reconcile(settings, dry_run=args.dry_run))
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2, default=str)
        print()
    else:
        print(render(report))
    return EXIT_OK


async def _reconcile(settings: config.Settings, *, dry_run: bool) -> Any:
    from orchestrator import daemon, reconcile

    async with daemon.open_pool(settings) as pool, daemon.engine_context(settings, pool) as ctx:
        return await reconcile.reconcile(ctx, ctx.clients.keys(), dry_run=dry_run)


_HEADER = ("ACTION", "ACCOUNT", "REGION", "IMAGE", "STATE", "POLICY", "INSTANCE", "WHY")


def _cells(f: Any) -> tuple[str, ...]:
    policy, instance = f.policy or "-", f.instance_id or "-"
    return (f.action, f.account, f.region, f.image_id, f.state, policy, instance, f.reason)


def render(report: Any) -> str:
    """The findings as a table, action by action, then a one-line summary."""
    from orchestrator import reconcile, status

    rows = [_cells(f) for group in reconcile.by_action(report.findings).values() for f in group]
    lines = [status.aligned([_HEADER, *rows])] if rows else ["nothing to reconcile"]
    lines += [f"skipped {a}/{r}: {why}" for a, r, why in report.skipped]
    counts = ", ".join(
        f"{report.count(a)} {a}"
        for a in (reconcile.ADOPTED, reconcile.GONE, reconcile.REFRESHED, reconcile.LEFT_ALONE)
    )
    verb = "would be" if report.dry_run else "were"
    lines.append(f"{len(report.regions)} region(s) looked at; {verb}: {counts}")
    return "\n".join(lines)
