"""Drive a limiter lane from concurrent tasks and record when each call was let through."""

from __future__ import annotations

import asyncio
import itertools
import random

from orchestrator.limiter import Limiters


async def grant_times(
    limiters: Limiters, action: str, calls: int, tasks: int = 50, account: str = "acct"
) -> list[float]:
    """Loop times of `calls` grants of one lane, requested by `tasks` concurrent workers."""
    loop = asyncio.get_running_loop()
    times: list[float] = []
    remaining = iter(range(calls))

    async def worker() -> None:
        for _ in remaining:
            await limiters.acquire(account, action)
            times.append(loop.time())

    await asyncio.gather(*(worker() for _ in range(tasks)))
    return times


def jittered(times: list[float], jitter: float, seed: int = 7) -> list[float]:
    """Arrival times at the server: each grant moved by uniform noise in [-jitter, +jitter]."""
    rng = random.Random(seed)
    return [t + rng.uniform(-jitter, jitter) for t in times]


def gaps(times: list[float]) -> list[float]:
    """Seconds between consecutive times."""
    return [b - a for a, b in itertools.pairwise(times)]


def min_span(times: list[float], calls: int) -> float:
    """The shortest time that `calls` consecutive grants took, first to last."""
    ordered = sorted(times)
    return min(b - a for a, b in zip(ordered, ordered[calls - 1 :], strict=False))
