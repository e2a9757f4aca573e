"""`cvm-backup demo`: the whole job on embedded defaults, in about two minutes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

_DESCRIPTION = """\
Starts an embedded Postgres in a temporary directory and the CVM API simulator on 127.0.0.1
with a sample fleet (busy instances, failing images, transient faults, images that are not
ours, a small image quota), applies two sample policies and runs the real daemon code through
two schedule slots, so retries and quota rotation happen. Ends with a summary and the
simulator's invariant checks. Touches no real cloud account and none of your data: a database
URL in the environment is ignored unless --database-url is given.
"""


def register(subparsers: Any) -> None:
    """Add `demo`."""
    demo = subparsers.add_parser(
        "demo",
        help="the whole job against a local simulator, with a live view and a summary",
        description=_DESCRIPTION,
    )
    demo.add_argument(
        "--fast",
        action="store_true",
        help="a 16-instance fleet and sub-second image builds (for tests; ~15 s)",
    )
    demo.add_argument(
        "--database-url",
        metavar="DSN",
        help="use this empty scratch database instead of a temporary embedded one",
    )
    demo.add_argument(
        "--log-file",
        type=Path,
        metavar="PATH",
        help="where the daemon's JSON log goes (default: $CVM_BACKUP_HOME/demo/demo.log)",
    )
    demo.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the summary as JSON to PATH",
    )
    demo.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every invariant held, 1 otherwise, 130 when interrupted."""
    from orchestrator.demo import runner
    from orchestrator.demo.scenario import FAST, FULL

    options = runner.DemoOptions(
        scale=FAST if args.fast else FULL,
        database_url=args.database_url,
        log_file=args.log_file,
        json_file=args.json,
    )
    return runner.run_demo(options)
