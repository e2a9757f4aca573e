"""`cvm-backup bench`: measure a fleet run against the simulator, print a table, write JSON."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError

SCENARIO_NAMES = (
    "baseline",
    "fleet",
    "faults",
    "quota",
    "copies",
    "ceiling",
    "memory",
    "history",
)
# Bounds against typos: the history scenario writes ~30 rows per instance and day (3,000
# instances for 365 days is about 10 GB). Its span leaves the pruning pass days to prune
# (history_days is at least 32).
MAX_HISTORY_INSTANCES = 100_000
MIN_HISTORY_SPAN, MAX_HISTORY_SPAN = 40, 3650


def _range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        pair = (float(low), float(high if sep else low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX seconds, not {text!r}") from None
    if pair[0] < 0 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, not {text!r}")
    return pair


def register(subparsers: Any) -> None:
    """Add the `bench` command."""
    from orchestrator.bench.options import DEFAULT_OUT, SLOT_NEXT_MINUTE, SLOT_NOW

    parser = subparsers.add_parser(
        "bench",
        help="measure cvm-backup against the simulator (and the naive SDK loop)",
        description="Runs the daemon against a local simulator on 127.0.0.1 and a fresh "
        "embedded Postgres (or CVM_BACKUP_DATABASE_URL, which needs CREATEDB), prints the "
        "measured figures next to their targets and writes them as JSON.",
    )
    add = parser.add_argument
    add("--instances", type=int, help="fleet size at the real limit (default 300)")
    add("--quick", action="store_true", help="small sizes and short delays (CI smoke run)")
    add("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    add("--build-delay", type=float, help="seconds an image stays CREATING (default 3)")
    add("--latency", type=_range, help="MIN:MAX seconds of API latency (default 0.03:0.08)")
    add("--ceiling-jobs", type=int, help="jobs in the limits-lifted run (default 3000)")
    add("--memory-jobs", type=int, help="jobs materialized for the memory run (default 100000)")
    add("--memory-seconds", type=float, help="seconds of dispatching in the memory run")
    add("--fault-rate", type=float, help="InternalError probability per call (default 0.2)")
    add(
        "--history-instances",
        type=int,
        help="instances with a history in the history scenario (default 3000)",
    )
    add("--history-span", type=int, help="days of history in the history scenario (default 365)")
    add("--busy-share", type=float, help="share of busy instances (default 0.1)")
    add(
        "--delete-delay",
        type=float,
        help="seconds a deleted image stays DELETING in the quota scenario (default 3)",
    )
    add(
        "--slot",
        choices=(SLOT_NEXT_MINUTE, SLOT_NOW),
        help="time the first call from the "
        "next whole minute's slot, or from the daemon's start (--quick)",
    )
    add("--only", action="append", choices=SCENARIO_NAMES, help="run only these (repeatable)")
    add("--no-baseline", action="store_true", help="skip the official-SDK baseline")
    add("--seed", type=int, help="fleet and fault seed")
    add("--logs", type=Path, help="keep the daemons' logs and configs in this directory")
    add(
        "--daemon-setting",
        action="append",
        type=_setting,
        metavar="KEY=VALUE",
        help="a daemon setting beyond the defaults, e.g. limiter_jitter=0.005 (repeatable; "
        "checked like the config file)",
    )
    parser.set_defaults(handler=run_bench)


_OVERRIDES = (
    "instances",
    "build_delay",
    "latency",
    "ceiling_jobs",
    "memory_jobs",
    "memory_seconds",
    "fault_rate",
    "busy_share",
    "delete_delay",
    "history_instances",
    "history_span",
    "slot",
    "seed",
)


def options_from(args: argparse.Namespace) -> Any:
    """Options from the command line: defaults (or --quick), then each flag given."""
    from orchestrator.bench.options import Options, quick_options

    options = quick_options(Options()) if args.quick else Options()
    given = {name: getattr(args, name) for name in _OVERRIDES if getattr(args, name) is not None}
    options = replace(options, **given, out=args.out, baseline=not args.no_baseline)
    if args.only:
        options = replace(options, scenarios=tuple(dict.fromkeys(args.only)))
    if args.daemon_setting:
        options = replace(
            options, daemon_settings={**options.daemon_settings, **dict(args.daemon_setting)}
        )
    _check(options)
    return options


def _setting(text: str) -> tuple[str, float]:
    """KEY=NUMBER for a numeric daemon setting (the daemon's config loader checks the rest)."""
    key, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not sep or not key.strip() or not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected KEY=NUMBER, not {text!r}")
    return key.strip(), int(number) if value.strip().isdigit() else number


def _check(options: Any) -> None:
    if min(options.instances, options.ceiling_jobs, options.memory_jobs) < 1:
        raise UsageError("bench: --instances, --ceiling-jobs and --memory-jobs must be >= 1")
    for name in ("fault_rate", "busy_share"):
        if not 0 <= getattr(options, name) <= 1:
            raise UsageError(f"bench: --{name.replace('_', '-')} must be between 0 and 1")
    if not 1 <= options.history_instances <= MAX_HISTORY_INSTANCES:
        raise UsageError(f"bench: --history-instances must be 1 to {MAX_HISTORY_INSTANCES}")
    if not MIN_HISTORY_SPAN <= options.history_span <= MAX_HISTORY_SPAN:
        raise UsageError(
            f"bench: --history-span must be {MIN_HISTORY_SPAN} to {MAX_HISTORY_SPAN} days"
        )
    if min(options.build_delay, options.memory_seconds, options.delete_delay) < 0:
        raise UsageError("bench: --build-delay, --memory-seconds and --delete-delay must be >= 0")
    _check_daemon_settings(options.daemon_settings)


def _check_daemon_settings(settings: dict[str, float]) -> None:
    """Refuse what the daemon's own config loader would refuse, before any scenario starts."""
    from orchestrator import config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "daemon.toml")
        path.write_text("".join(f"{key} = {value!r}\n" for key, value in settings.items()))
        try:
            config.load({"CVM_BACKUP_CONFIG": str(path)})
        except UsageError as exc:
            raise UsageError(str(exc).replace(str(path), "bench: --daemon-setting")) from None


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; exit 1 only when a scenario could not be measured."""
    from orchestrator import logs
    from orchestrator.bench import runner

    options = options_from(args)
    # The bench's own output is the table; the simulator and pool only speak up on trouble.
    logs.configure("console", "warning")
    url = os.environ.get("CVM_BACKUP_DATABASE_URL") or os.environ.get("DATABASE_URL")
    return asyncio.run(runner.run(options, database_url=url, logs_dir=args.logs))
