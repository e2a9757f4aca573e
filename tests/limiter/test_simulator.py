"""The limiter in front of the real client, against the simulator's own one-second windows."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from structlog.testing import capture_logs

from orchestrator.limiter import DEFAULT_JITTER, Limiters
from orchestrator.simulator import SimConfig, run_simulator
from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.client import CvmClient, RetryPolicy
from orchestrator.tencent.credentials import Credentials, StaticCredentials
from tests.fixtures.sim import TEST_REGION, TEST_SECRET_ID, TEST_SECRET_KEY, make_sim_config

TASKS = 30  # concurrent callers per action: far more than the limits let through


class JitteredLimiter:
    """The real limiters, plus a random network delay of 0-40 ms (±20 ms) before each send."""

    def __init__(self, limiters: Limiters, jitter: float = DEFAULT_JITTER, seed: int = 5) -> None:
        self.limiters = limiters
        self._jitter = jitter
        self._rng = random.Random(seed)

    async def acquire(self, account: str, action: str) -> None:
        """Wait for the grant, then for this call's share of network jitter."""
        await self.limiters.acquire(account, action)
        await asyncio.sleep(self._rng.uniform(0, 2 * self._jitter))

    def throttled(self, account: str, action: str) -> None:
        """Pass the server's RequestLimitExceeded on to the real limiters."""
        self.limiters.throttled(account, action)


@asynccontextmanager
async def client_against(sim: Simulator, limiters: Limiters) -> AsyncIterator[CvmClient]:
    """A client for the simulator that waits on `limiters` with injected jitter."""
    async with CvmClient(
        credentials=StaticCredentials(Credentials(TEST_SECRET_ID, TEST_SECRET_KEY)),
        endpoint=sim.url,
        limiter=JitteredLimiter(limiters),
        retry=RetryPolicy(throttle_retries=20, base_delay=0.05, max_delay=0.2),
    ) as client:
        yield client


async def flood(call: Callable[[], Awaitable[object]], seconds: float) -> int:
    """Run `call` from TASKS concurrent tasks for `seconds`; the number of calls completed."""
    done = [0]

    async def worker() -> None:
        while True:
            await call()
            done[0] += 1

    workers = [asyncio.create_task(worker()) for _ in range(TASKS)]
    finished, _ = await asyncio.wait(workers, timeout=seconds)
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    for task in finished:
        task.result()  # a worker that stopped early failed: show why
    return done[0]


async def test_full_speed_traffic_never_trips_the_simulator() -> None:
    """CreateImage and DescribeImages at full speed with ±20 ms jitter: zero throttles."""
    config: SimConfig = make_sim_config()
    instance = config.instances[0].instance_id
    async with run_simulator(config, port=0) as sim, client_against(sim, Limiters()) as client:

        async def create() -> object:
            return await client.create_image(
                TEST_REGION, instance_id=instance, name="limiter-check", dry_run=True
            )

        async def describe() -> object:
            return await client.describe_images(TEST_REGION)

        await asyncio.gather(flood(create, 2.5), flood(describe, 2.5))
        assert sim.state.violations == {}
        # The check only means something if the limiter pushed right up to the limits.
        assert sim.state.max_window("CreateImage") >= 9
        assert sim.state.max_window("DescribeImages") >= 38


async def test_server_stricter_than_configured_slows_the_limiter() -> None:
    """A server limit below the configured one throttles; the limiter slows and calls succeed."""
    limiters = Limiters()
    async with run_simulator(make_sim_config(), port=0) as sim:
        sim.set_limit("DescribeImages", 20)
        async with client_against(sim, limiters) as client:
            with capture_logs() as events:
                calls = await flood(lambda: client.describe_images(TEST_REGION), 2.0)
    stats = limiters.stats("default", "DescribeImages")
    assert sim.state.violations["DescribeImages"] >= 1
    assert stats.throttles >= 1
    assert stats.rate <= stats.full_rate / 2
    assert "limiter.slowed" in [e["event"] for e in events]
    assert 0 < calls <= stats.calls - sim.state.violations["DescribeImages"]
