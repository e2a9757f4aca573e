"""The `cvm-backup` command: argument parsing and dispatch only.

Each command lives in the module that owns its concept and registers itself through a
`register(subparsers)` function; handlers import their heavy dependencies lazily.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from orchestrator import __version__
from orchestrator.errors import UsageError

Handler = Callable[[argparse.Namespace], int]

# Modules that add subcommands; each defines `register(subparsers) -> None` and sets
# `handler=` on its parsers with `set_defaults`.
COMMAND_MODULES = (
    "orchestrator.commands.demo",
    "orchestrator.commands.engine",
    "orchestrator.commands.database",
    "orchestrator.commands.policy",
    "orchestrator.commands.operator",
    "orchestrator.commands.account",
    "orchestrator.commands.reconcile",
    "orchestrator.simulator.command",
    "orchestrator.commands.bench",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every available command registered."""
    parser = argparse.ArgumentParser(
        prog="cvm-backup",
        description="Batch image backups for Tencent Cloud CVM.",
    )
    parser.add_argument("--version", action="version", version=f"cvm-backup {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, dispatch, and map errors to exit codes."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except UsageError as exc:
        print(f"cvm-backup: error: {exc}", file=sys.stderr)
        return UsageError.exit_code
    except KeyboardInterrupt:
        return 130
