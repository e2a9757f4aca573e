"""How much of a rate limit the limiter uses, and the busiest one-second window it causes.

    python -m bench.limiter_utilization [--seconds 15] [--action CreateImage] [--mode both]

Many tasks call through the limiter at full speed; each call then waits a random 0-40 ms
(±20 ms of network jitter around a 20 ms mean) before it "reaches the server". `local` counts
arrivals in-process; `sim` sends dry-run calls through the real client to the simulator and
reads the simulator's own window counter. Prints figures and writes JSON to bench/results/;
utilization = steady calls per second / limit (the target is >= 0.95, with no window over it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import DEFAULT_LIMITS
from orchestrator.limiter import DEFAULT_JITTER, Limiters, busiest_window

RESULTS = Path(__file__).resolve().parent / "results"
ACCOUNT = "bench"
SECRET_ID = "AKIDbenchlimiter000000000000000000"
SECRET_KEY = "bench-limiter-secret-key"
REGION = "ap-guangzhou"


@dataclass(frozen=True, slots=True)
class Result:
    """One measured run."""

    mode: str
    action: str
    limit: int
    jitter: float
    seconds: float
    calls: int
    steady_rate: float
    utilization: float
    busiest_window: int
    violations: int
    period: float


class Jittered:
    """The limiter, then a uniform 0..2*jitter delay: the network between grant and server."""

    def __init__(self, limiters: Limiters, jitter: float, seed: int = 1) -> None:
        self.limiters = limiters
        self._jitter = jitter
        self._rng = random.Random(seed)
        self.arrivals: list[float] = []

    async def acquire(self, account: str, action: str) -> None:
        """Wait for a grant and for this call's network delay; record the arrival."""
        await self.limiters.acquire(account, action)
        await asyncio.sleep(self._rng.uniform(0, 2 * self._jitter))
        self.arrivals.append(asyncio.get_running_loop().time())

    def throttled(self, account: str, action: str) -> None:
        """Pass a throttle on to the limiter."""
        self.limiters.throttled(account, action)


async def drive(call: Callable[[], Awaitable[object]], seconds: float, tasks: int) -> None:
    """Call `call` from `tasks` concurrent workers for `seconds`, then cancel the rest."""

    async def worker() -> None:
        while True:
            await call()

    workers = [asyncio.create_task(worker()) for _ in range(tasks)]
    finished, _ = await asyncio.wait(workers, timeout=seconds)
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    for task in finished:
        task.result()


def steady_rate(arrivals: list[float]) -> float:
    """Calls per second between the first and the last arrival (no start-up or drain)."""
    if len(arrivals) < 2:
        return 0.0
    return (len(arrivals) - 1) / (max(arrivals) - min(arrivals))


def result(
    mode: str,
    args: argparse.Namespace,
    arrivals: list[float],
    limiters: Limiters,
    *,
    window: int,
    violations: int,
) -> Result:
    """A Result from what one run saw."""
    limit = limiters.limit(args.action)
    rate = steady_rate(arrivals)
    return Result(
        mode=mode,
        action=args.action,
        limit=limit,
        jitter=args.jitter,
        seconds=args.seconds,
        calls=len(arrivals),
        steady_rate=round(rate, 3),
        utilization=round(rate / limit, 4),
        busiest_window=window,
        violations=violations,
        period=round(limiters.period(args.action), 6),
    )


async def run_local(args: argparse.Namespace) -> Result:
    """The limiter alone; arrivals counted in-process."""
    limiters = Limiters(jitter=args.jitter)
    network = Jittered(limiters, args.jitter)
    await drive(lambda: network.acquire(ACCOUNT, args.action), args.seconds, args.tasks)
    window = busiest_window(network.arrivals)
    over = max(0, window - limiters.limit(args.action))
    return result("local", args, network.arrivals, limiters, window=window, violations=over)


async def run_sim(args: argparse.Namespace) -> Result:
    """Dry-run calls through the real client to the simulator, which counts the windows."""
    from orchestrator.simulator import SimConfig, generate_fleet, run_simulator
    from orchestrator.tencent.client import CvmClient
    from orchestrator.tencent.credentials import Credentials, StaticCredentials

    limiters = Limiters(jitter=args.jitter)
    network = Jittered(limiters, args.jitter)
    config = SimConfig(credentials={SECRET_ID: SECRET_KEY}, instances=generate_fleet(1))
    instance = config.instances[0].instance_id
    creds = StaticCredentials(Credentials(SECRET_ID, SECRET_KEY))
    async with (
        run_simulator(config) as sim,
        CvmClient(credentials=creds, endpoint=sim.url, limiter=network, account=ACCOUNT) as client,
    ):
        await drive(lambda: sim_call(client, args.action, instance), args.seconds, args.tasks)
        window = sim.state.max_window(args.action)
        violations = sim.state.violations.get(args.action, 0)
    return result("sim", args, network.arrivals, limiters, window=window, violations=violations)


async def sim_call(client: Any, action: str, instance: str) -> object:
    """One harmless call of `action` (CreateImage as a DryRun)."""
    if action == "CreateImage":
        return await client.create_image(REGION, instance_id=instance, name="bench", dry_run=True)
    return await client.call(action, REGION, {})


def report(res: Result) -> None:
    """Print one run's figures."""
    print(
        f"[{res.mode}] {res.action}: limit {res.limit}/s, jitter ±{res.jitter * 1000:.0f} ms, "
        f"period {res.period * 1000:.2f} ms"
    )
    print(
        f"  calls {res.calls} in {res.seconds:.0f} s; steady {res.steady_rate:.2f}/s; "
        f"utilization {res.utilization:.3f}"
    )
    print(
        f"  busiest 1 s window {res.busiest_window} (limit {res.limit}); "
        f"violations {res.violations}"
    )


def save(results: list[Result]) -> Path:
    """Write the results as JSON under bench/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"limiter_utilization-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m bench.limiter_utilization")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each run")
    parser.add_argument("--action", default="CreateImage", choices=sorted(DEFAULT_LIMITS))
    parser.add_argument("--jitter", type=float, default=DEFAULT_JITTER, help="± seconds")
    parser.add_argument("--tasks", type=int, default=50, help="concurrent callers")
    parser.add_argument("--mode", choices=["local", "sim", "both"], default="both")
    return parser.parse_args(argv)


async def main(argv: list[str] | None = None) -> None:
    """Run the selected modes, print and save."""
    from orchestrator import logs

    logs.configure(fmt="console", level="warning")
    args = parse(argv)
    runners = {"local": [run_local], "sim": [run_sim], "both": [run_local, run_sim]}
    results = []
    for runner in runners[args.mode]:
        results.append(await runner(args))
        report(results[-1])
    print(f"results: {save(results)}")


if __name__ == "__main__":
    asyncio.run(main())
