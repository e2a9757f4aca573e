"""`cvm-backup simulator`: run the CVM API simulator on loopback until SIGTERM or SIGINT.

The first line on stdout is the URL to use as CVM_BACKUP_ENDPOINT. Credentials come from the
fleet file, else from TENCENTCLOUD_SECRET_ID / TENCENTCLOUD_SECRET_KEY, else the development
pair below; keys are never taken from the command line, where `ps` would show them.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.errors import UsageError
from orchestrator.simulator.config import MAX_DELAY

if TYPE_CHECKING:
    from orchestrator.simulator.config import Faults, SimConfig

DEV_SECRET_ID = "AKIDsimulatordevelopment0000000000"  # noqa: S105
DEV_SECRET_KEY = "simulator-development-key"  # noqa: S105
DEFAULT_PORT = 9000


def register(subparsers: Any) -> None:
    """Add the `simulator` command."""
    parser = subparsers.add_parser(
        "simulator",
        help="run the CVM API simulator on loopback",
        description="Serve a simulated Tencent Cloud CVM API on 127.0.0.1 until stopped.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--fleet", type=Path, help="TOML or JSON fleet file")
    parser.add_argument("--instances", type=int, default=0, help="add N generated instances")
    parser.add_argument("--seed", type=int, help="RNG seed (ids, delays, faults)")
    parser.add_argument("--fault-rate", type=float, help="probability of InternalError")
    parser.add_argument("--drop-rate", type=float, help="probability of a dropped connection")
    parser.add_argument("--http-5xx-rate", type=float, help="probability of an HTTP 502")
    parser.add_argument(
        "--after-create",
        type=float,
        help="share of CreateImage/SyncImages faults applied after the image (copy) was made",
    )
    parser.add_argument("--latency", type=_range, help="MIN:MAX seconds added to each call")
    parser.add_argument("--create-delay", type=_range, help="MIN:MAX seconds CREATING lasts")
    parser.add_argument(
        "--sync-delay", type=_range, help="MIN:MAX seconds a SyncImages copy stays SYNCING"
    )
    parser.add_argument("--quota", type=int, help="custom-image quota of every region")
    parser.add_argument(
        "--delete-delay",
        type=_seconds,
        metavar="SECONDS",
        help="a deleted image stays listed as DELETING this long",
    )
    parser.add_argument(
        "--list-lag",
        type=_seconds,
        metavar="SECONDS",
        help="a new image is missing from DescribeImages this long",
    )
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        type=_limit,
        metavar="ACTION=N",
        help="per-second limit of an action (0 lifts it)",
    )
    parser.add_argument("--no-limits", action="store_true", help="lift every rate limit")
    parser.add_argument("--legacy", action="store_true", help="answer CreateImage without ImageId")
    parser.set_defaults(handler=handle)


def _range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX seconds, got {text!r}") from None
    if not 0 <= low <= high <= MAX_DELAY:
        raise argparse.ArgumentTypeError(
            f"expected 0 <= MIN <= MAX <= {MAX_DELAY:g} seconds, got {text!r}"
        )
    return low, high


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return seconds


def _limit(text: str) -> tuple[str, int | None]:
    action, _, number = text.partition("=")
    if not action or not number.isdigit():
        raise argparse.ArgumentTypeError(f"expected ACTION=N, got {text!r}")
    return action, int(number) or None


def _credentials(config: SimConfig) -> dict[str, str]:
    if config.credentials:
        return dict(config.credentials)
    secret_id = os.environ.get("TENCENTCLOUD_SECRET_ID")
    secret_key = os.environ.get("TENCENTCLOUD_SECRET_KEY")
    if secret_id and secret_key:
        return {secret_id: secret_key}
    return {DEV_SECRET_ID: DEV_SECRET_KEY}


# Probability flags and the Faults field each one sets.
_RATE_FLAGS = {
    "fault_rate": "internal_error_rate",
    "drop_rate": "drop_rate",
    "http_5xx_rate": "http_5xx_rate",
    "after_create": "after_create",
}


def _faults(args: argparse.Namespace, config: SimConfig) -> Faults:
    changes: dict[str, Any] = {}
    for flag, field in _RATE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"--{flag.replace('_', '-')}: expected a probability, got {value}")
        if value is not None:
            changes[field] = value
    if args.latency is not None:
        changes["latency"] = args.latency
    return replace(config.faults, **changes)


def build_config(args: argparse.Namespace) -> SimConfig:
    """The simulator configuration from a fleet file and the flags that override it."""
    from orchestrator.simulator.config import NO_LIMITS, SimConfig
    from orchestrator.simulator.fleet import generate_fleet, load_config

    config = load_config(args.fleet) if args.fleet else SimConfig()
    seed = config.seed if args.seed is None else args.seed
    limits = dict(NO_LIMITS) if args.no_limits else dict(config.limits)
    limits.update(dict(args.limit))
    extra = generate_fleet(args.instances, seed=seed) if args.instances else ()
    return replace(
        config,
        credentials=_credentials(config),
        seed=seed,
        faults=_faults(args, config),
        limits=limits,
        instances=config.instances + extra,
        create_delay=args.create_delay or config.create_delay,
        sync_delay=args.sync_delay or config.sync_delay,
        default_quota=config.default_quota if args.quota is None else args.quota,
        legacy=config.legacy or args.legacy,
        delete_delay=_given(args.delete_delay, config.delete_delay),
        list_lag=_given(args.list_lag, config.list_lag),
    )


def _given(flag: float | None, configured: float) -> float:
    return configured if flag is None else flag


async def serve(config: SimConfig, port: int) -> None:
    """Run a simulator until SIGTERM or SIGINT."""
    import asyncio
    import signal
    import sys

    from orchestrator.simulator.runner import Simulator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sim = Simulator(config)
    try:
        await sim.start(port)
    except OSError as exc:
        raise UsageError(f"--port {port}: cannot listen on 127.0.0.1: {exc.strerror}") from None
    print(sim.url, flush=True)
    print(
        f"cvm-backup simulator: {len(config.instances)} instances, accounts "
        f"{', '.join(config.credentials)}; state at {sim.url}/_sim/state",
        file=sys.stderr,
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await sim.stop()


def handle(args: argparse.Namespace) -> int:
    """Entry point of `cvm-backup simulator`."""
    import asyncio

    asyncio.run(serve(build_config(args), args.port))
    return 0
