"""`cvm-backup plan POLICY [--json]`: what a run would do, proven with DryRuns."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from orchestrator import config, logs

EXIT_OK = 0
EXIT_DRY_RUN_FAILED = 1


def register(subparsers: Any) -> None:
    """Add the operator commands."""
    plan = subparsers.add_parser(
        "plan",
        help="what a run of a policy would do now: instances, retention deletes, DryRuns",
    )
    plan.add_argument("policy", metavar="POLICY", help="policy name")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; exit 0 when every DryRun is ok, 1 otherwise, 2 for an unknown policy."""
    settings = config.load()
    logs.configure(settings.log_format, settings.log_level)
    return asyncio.run(_plan(settings, args.policy, as_json=args.json))


async def _plan(settings: config.Settings, name: str, *, as_json: bool) -> int:
    from orchestrator import daemon, plan

    async with daemon.open_pool(settings) as pool, daemon.engine_context(settings, pool) as ctx:
        try:
            result = await plan.make_plan(ctx, name)
        except plan.Unresolved as exc:
            # Listing the instances failed: there is nothing to DryRun, and that is the answer.
            print(exc)
            return EXIT_DRY_RUN_FAILED
    if as_json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        print()
    else:
        print(plan.render(result))
    return EXIT_OK if result.ok else EXIT_DRY_RUN_FAILED
