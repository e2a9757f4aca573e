"""`cvm-backup policy apply FILE [--dry-run] [--prune]` and `cvm-backup policy list`.

`--prune` removes policies that are stored but not in the file: a policy that never ran is
deleted; one with runs or images is disabled instead, so its images stay recorded as ours and
its history stays queryable (re-adding it to a file enables it again).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator import config
from orchestrator.policies import Change, Policy, PolicyDiff, next_slot_after


def register(subparsers: Any) -> None:
    """Add `policy apply` and `policy list`."""
    policy = subparsers.add_parser("policy", help="manage backup policies")
    commands = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)
    apply = commands.add_parser("apply", help="validate and upsert the policies in a TOML file")
    apply.add_argument("file", type=Path, help="policy file (TOML, see config/)")
    apply.add_argument(
        "--dry-run", action="store_true", help="show what would change, write nothing"
    )
    apply.add_argument(
        "--prune",
        action="store_true",
        help="remove stored policies missing from the file (disable if they ran)",
    )
    apply.add_argument(
        "--yes",
        action="store_true",
        help="confirm --prune of a file with no policies (removes every stored policy)",
    )
    apply.set_defaults(handler=run_apply)
    listing = commands.add_parser("list", help="the policies and their next slot")
    listing.set_defaults(handler=run_list)


def _show(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={v}" for k, v in value.items()) + "}"
    return str(value)


def _change(change: Change) -> str:
    return f"    {change.field}: {_show(change.old)} -> {_show(change.new)}"


def diff_lines(result: PolicyDiff, prune: Any, *, prune_requested: bool) -> Iterator[str]:
    """Human-readable diff: + added, ~ changed (with fields), = unchanged, - pruned."""
    for policy in result.added:
        yield f"+ {policy.name}: added"
    for policy, changes in result.changed:
        yield f"~ {policy.name}: changed {', '.join(c.field for c in changes)}"
        yield from (_change(c) for c in changes)
    for policy in result.unchanged:
        yield f"= {policy.name}: unchanged"
    if prune_requested:
        yield from (f"- {name}: deleted (not in file, never ran)" for name in prune.deleted)
        yield from (f"- {name}: disabled (not in file, has history)" for name in prune.disabled)
    else:
        yield from (
            f"? {p.name}: not in file, left alone (use --prune to remove)" for p in result.missing
        )


async def _apply(args: argparse.Namespace) -> int:
    import asyncpg

    from orchestrator.db import migrate, pool
    from orchestrator.db import policies as queries
    from orchestrator.policies import PolicyError, load_file

    wanted = load_file(args.file)  # validation first: a bad file never touches the database
    settings = config.load()
    _check_accounts(args.file, wanted, settings)
    _check_prune(args, wanted)
    conn = await pool.connect(settings)
    try:
        await migrate.ensure_current(conn)
        result = await queries.apply(conn, wanted, dry_run=args.dry_run, prune_missing=args.prune)
    except asyncpg.IntegrityConstraintViolationError as exc:
        # Validation mirrors the CHECKs, so this means the two drifted apart; still exit 2.
        raise PolicyError(
            f"{args.file}: the database refused the policies "
            f"({exc.constraint_name or exc.sqlstate}): {exc}"
        ) from None
    finally:
        await conn.close()
    for line in diff_lines(result.diff, result.pruned, prune_requested=args.prune):
        print(line)
    print(f"dry run: nothing written ({args.file})" if args.dry_run else f"applied {args.file}")
    return 0


def _check_accounts(path: Path, wanted: list[Policy], settings: config.Settings) -> None:
    """Every policy names a configured account: otherwise it could never run."""
    from orchestrator.policies import PolicyError

    known = [account.name for account in settings.accounts]
    problems = [
        f"{path}: policy #{index} {policy.name!r}: account: {policy.account!r} is not "
        f"configured; expected one of {', '.join(known)} (the [[accounts]] of the config file)"
        for index, policy in enumerate(wanted, start=1)
        if policy.account not in known
    ]
    if problems:
        raise PolicyError(*problems)


def _check_prune(args: argparse.Namespace, wanted: list[Policy]) -> None:
    """An empty file with --prune would remove every policy: only on explicit confirmation."""
    from orchestrator.errors import UsageError

    if args.prune and not wanted and not args.yes:
        raise UsageError(
            f"{args.file}: --prune: the file has no policies, so every stored policy would be "
            "removed; add --yes if that is what you want"
        )


def run_apply(args: argparse.Namespace) -> int:
    """Validate the file and upsert all its policies in one transaction (exit 2 on any error)."""
    return asyncio.run(_apply(args))


def _targets(policy: Policy) -> str:
    parts = list(policy.instance_ids)
    parts += [f"tag:{k}={v}" for k, v in policy.instance_tags.items()]
    return ",".join(parts)


def _next_slot(policy: Policy, now: datetime) -> str:
    if not policy.enabled:
        return "- (disabled)"
    slot = next_slot_after(policy, now).astimezone(policy.zone)
    return slot.strftime("%Y-%m-%d %H:%M %z")


def list_rows(policies: list[Policy], now: datetime) -> list[tuple[str, ...]]:
    """Table rows for `policy list`, header first."""
    header = (
        "NAME",
        "ENABLED",
        "ACCOUNT",
        "REGION",
        "SCHEDULE",
        "TIMEZONE",
        "NEXT SLOT",
        "TARGETS",
    )
    rows: list[tuple[str, ...]] = [header]
    for p in policies:
        rows.append(
            (
                p.name,
                "yes" if p.enabled else "no",
                p.account,
                p.region,
                p.schedule,
                p.timezone,
                _next_slot(p, now),
                _targets(p),
            )
        )
    return rows


def _format(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


async def _list() -> int:
    from orchestrator.db import migrate, pool
    from orchestrator.db import policies as queries

    conn = await pool.connect(config.load())
    try:
        await migrate.ensure_current(conn)
        policies = await queries.fetch_policies(conn)
    finally:
        await conn.close()
    if not policies:
        print("no policies; add some with `cvm-backup policy apply FILE`")
        return 0
    print(_format(list_rows(policies, datetime.now(UTC))))
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Print each policy with its next slot in the policy's own timezone."""
    return asyncio.run(_list())
