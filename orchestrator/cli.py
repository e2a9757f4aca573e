"""The `cvm-backup` command: argument parsing and dispatch only.

Each command lives in the module that owns its concept and registers itself through a
`register(subparsers)` function; handlers import their heavy dependencies lazily.

Every parser is a `CommandParser`: its `--help` has a description (the command's one-line help
when it sets none) and ends with the environment variables the command reads (`ENVIRONMENT`),
and every command that reads the config file takes `--config PATH`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

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

CONFIG_VARIABLE = "CVM_BACKUP_CONFIG"
EPILOG_WIDTH = 79

# What each variable means, as the help shows it (the README's table says more).
VARIABLES: dict[str, str] = {
    CONFIG_VARIABLE: "the config file; --config beats it; neither: "
    "/etc/cvm-backup/cvm-backup.toml if it exists",
    "CVM_BACKUP_DATABASE_URL": "Postgres DSN (else DATABASE_URL); neither: the embedded "
    "database in CVM_BACKUP_HOME",
    "DATABASE_URL": "Postgres DSN when CVM_BACKUP_DATABASE_URL is not set",
    "CVM_BACKUP_HOME": "state directory; default /var/lib/cvm-backup for root, else "
    "$XDG_DATA_HOME/cvm-backup or ~/.local/share/cvm-backup",
    "XDG_DATA_HOME": "where a non-root user's default home goes (see CVM_BACKUP_HOME)",
    "CVM_BACKUP_ENDPOINT": "API endpoint URL; default https://cvm.tencentcloudapi.com",
    "CVM_BACKUP_DEPLOYMENT": "this installation's name, tagged on every image it makes",
    "CVM_BACKUP_LOG_FORMAT": "auto, json or console",
    "TENCENTCLOUD_SECRET_ID": "API key id; an [[accounts]] entry may name another variable",
    "TENCENTCLOUD_SECRET_KEY": "API key; without both: the credentials file, CVM role, TKE role",
    "TENCENTCLOUD_SESSION_TOKEN": "session token of temporary keys",
    "CVM_BACKUP_METADATA_URL": "metadata service address for the CVM role credentials",
    "TKE_REGION": "on TKE: the region of the pod's OIDC role (with the three below)",
    "TKE_PROVIDER_ID": "on TKE: the OIDC provider id",
    "TKE_WEB_IDENTITY_TOKEN_FILE": "on TKE: the pod's web identity token file",
    "TKE_ROLE_ARN": "on TKE: the CAM role to assume",
    "CVM_BACKUP_STS_URL": "STS endpoint for the TKE role; default https://sts.tencentcloudapi.com",
}
_DATABASE = (
    CONFIG_VARIABLE,
    "CVM_BACKUP_DATABASE_URL",
    "DATABASE_URL",
    "CVM_BACKUP_HOME",
    "XDG_DATA_HOME",
)
_CREDENTIALS = (
    "TENCENTCLOUD_SECRET_ID",
    "TENCENTCLOUD_SECRET_KEY",
    "TENCENTCLOUD_SESSION_TOKEN",
    "CVM_BACKUP_METADATA_URL",
    "TKE_REGION",
    "TKE_PROVIDER_ID",
    "TKE_WEB_IDENTITY_TOKEN_FILE",
    "TKE_ROLE_ARN",
    "CVM_BACKUP_STS_URL",
)
_API = (
    *_DATABASE,
    "CVM_BACKUP_ENDPOINT",
    "CVM_BACKUP_DEPLOYMENT",
    "CVM_BACKUP_LOG_FORMAT",
    *_CREDENTIALS,
)
# The variables each command reads ("" is `cvm-backup` itself); --config comes with
# CVM_BACKUP_CONFIG. A command missing here has no environment section (a test checks).
ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "": tuple(VARIABLES),
    "demo": ("CVM_BACKUP_HOME", "XDG_DATA_HOME"),
    "run": _API,
    "backup-now": _API,
    "status": _DATABASE,
    "migrate": _DATABASE,
    "check": (*_DATABASE, *_CREDENTIALS),
    "policy": _DATABASE,
    "policy apply": _DATABASE,
    "policy list": _DATABASE,
    "plan": _API,
    "account": _DATABASE,
    "account list": _DATABASE,
    "account resume": _DATABASE,
    "reconcile": _API,
    "simulator": ("TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY"),
    "bench": ("CVM_BACKUP_DATABASE_URL", "DATABASE_URL"),
}


def command_of(prog: str) -> str:
    """The command path of a parser's prog: "cvm-backup policy apply" -> "policy apply"."""
    return prog.partition(" ")[2]


def environment_epilog(command: str) -> str | None:
    """The help's closing list of the variables `command` reads."""
    names = ENVIRONMENT.get(command)
    if not names:
        return None
    width = max(map(len, names)) + 4
    lines = [
        textwrap.fill(
            VARIABLES[name],
            EPILOG_WIDTH,
            initial_indent=f"  {name}".ljust(width),
            subsequent_indent=" " * width,
            break_on_hyphens=False,
        )
        for name in names
    ]
    return "environment:\n" + "\n".join(lines)


def _config_path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path to a TOML file, not an empty string")
    return Path(text).expanduser()


class HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs as usual, but keeps indented blocks (the variable list) as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        filled = []
        for paragraph in re.split(r"\n\s*\n", text.strip("\n")):
            if paragraph.splitlines()[-1].startswith("  "):
                filled.append(paragraph)
            else:
                filled.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(filled)


class CommandSubparsers(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Subcommands whose description defaults to their one-line help."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """As argparse's, with `description` taken from `help` when not given."""
        summary = kwargs.get("help")
        if kwargs.get("description") is None and summary:
            kwargs["description"] = summary[0].upper() + summary[1:] + "."
        return super().add_parser(name, **kwargs)  # type: ignore[no-any-return]


class CommandParser(argparse.ArgumentParser):
    """A parser for `cvm-backup` and each of its commands (argparse makes nested ones alike)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", CommandSubparsers)
        command = command_of(self.prog)
        if self.epilog is None:
            self.epilog = environment_epilog(command)
        # The innermost parser's value wins, so a handler knows its own command.
        self.set_defaults(command_path=command)
        if command == "" or CONFIG_VARIABLE in ENVIRONMENT.get(command, ()):
            self.add_argument(
                "--config",
                type=_config_path,
                metavar="PATH",
                # SUPPRESS: a subcommand that is not given it must not reset the global one.
                default=argparse.SUPPRESS,
                help=f"the config file (beats {CONFIG_VARIABLE}; see below)",
            )


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every available command registered."""
    parser = CommandParser(
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


@contextlib.contextmanager
def _config_override(args: argparse.Namespace) -> Iterator[None]:
    """--config for the length of the command, as CVM_BACKUP_CONFIG (which it beats).

    Through the variable because every settings reader (`config.load()`) reads it; restored
    afterwards so an in-process caller (tests) keeps its own environment.
    """
    path: Path | None = getattr(args, "config", None)
    if path is None:
        yield
        return
    if CONFIG_VARIABLE not in ENVIRONMENT.get(args.command_path, ()):
        raise UsageError(f"--config: `cvm-backup {args.command_path}` reads no config file")
    before = os.environ.get(CONFIG_VARIABLE)
    os.environ[CONFIG_VARIABLE] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CONFIG_VARIABLE, None)
        else:
            os.environ[CONFIG_VARIABLE] = before


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, dispatch, and map errors to exit codes."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        with _config_override(args):
            return handler(args)
    except UsageError as exc:
        print(f"cvm-backup: error: {exc}", file=sys.stderr)
        return UsageError.exit_code
    except KeyboardInterrupt:
        return 130
