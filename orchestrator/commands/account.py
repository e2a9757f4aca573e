"""`cvm-backup account list [--json]` and `account resume NAME [--region R]`: pauses by hand.

An account-class error pauses the account, or for a CAM denial only its region, in Postgres
(orchestrator.pauses); the replica driving it probes it and resumes it by itself. These commands
show the pauses and lift them at once, for an operator who just fixed the account and does not
want to wait for the next probe. Both only touch the database: a running daemon picks the lift
up within one poll interval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from orchestrator import config
from orchestrator.errors import UsageError

EXIT_OK = 0


def register(subparsers: Any) -> None:
    """Add `account list` and `account resume`."""
    account = subparsers.add_parser("account", help="paused accounts: list them, resume one")
    actions = account.add_subparsers(dest="account_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="paused accounts: why, since when, next probe")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=run_list)
    resume = actions.add_parser(
        "resume", help="lift an account's pause now (after fixing balance, keys or permissions)"
    )
    resume.add_argument("name", metavar="NAME", help="account name ([[accounts]] name)")
    resume.add_argument(
        "--region",
        metavar="REGION",
        help="lift only the pause of this region (a CAM denial); default: every pause of NAME",
    )
    resume.set_defaults(handler=run_resume)


def run_list(args: argparse.Namespace) -> int:
    """Print the paused accounts (none: a line saying so)."""
    from orchestrator import status

    entries = asyncio.run(_list(config.load()))
    if args.json:
        json.dump(entries, sys.stdout, indent=2)
        print()
    elif entries:
        print(status.render_pauses(entries))
    else:
        print("no account is paused")
    return EXIT_OK


def run_resume(args: argparse.Namespace) -> int:
    """Lift the pauses of NAME (of one region with --region); exit 2 when none matched."""
    lifted = asyncio.run(_resume(config.load(), args.name, args.region))
    if not lifted:
        where = "" if args.region is None else f" in region {args.region!r}"
        raise UsageError(
            f"account {args.name!r} is not paused{where} (see `cvm-backup account list`)"
        )
    for pause in lifted:
        scope = "" if pause["scope_region"] is None else f" in region {pause['scope_region']}"
        print(
            f"account {args.name!r} resumed{scope} (paused since {pause['since']} for"
            f" {pause['code']}); a running daemon claims its jobs again within one poll interval"
        )
    return EXIT_OK


async def _list(settings: config.Settings) -> list[dict[str, Any]]:
    from orchestrator import pauses

    conn = await _connect(settings)
    try:
        return [p.to_json() for p in await pauses.listed(conn)]
    finally:
        await conn.close()


async def _resume(settings: config.Settings, name: str, region: str | None) -> list[dict[str, Any]]:
    from orchestrator import pauses

    conn = await _connect(settings)
    try:
        # The events ledger records who lifted it (kind account.resumed, reason 'operator').
        if region is None:
            lifted = await pauses.resume_all(conn, name, "operator")
        else:
            one = await pauses.resume(conn, name, "operator", scope_region=region)
            lifted = [] if one is None else [one]
    finally:
        await conn.close()
    return [p.to_json() for p in lifted]


async def _connect(settings: config.Settings) -> Any:
    from orchestrator.db import migrate, pool

    conn = await pool.connect(settings)
    try:
        await migrate.ensure_current(conn)
    except BaseException:
        await conn.close()
        raise
    return conn
