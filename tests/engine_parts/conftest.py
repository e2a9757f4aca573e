"""Fixtures of the engine-part tests: the real simulator, a migrated database, an EngineContext."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import pytest

from orchestrator.config import Settings
from orchestrator.context import EngineContext
from orchestrator.simulator.config import SimConfig, SimInstance
from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.client import CvmClient
from orchestrator.tencent.credentials import Credentials, StaticCredentials
from tests.engine_parts.helpers import ACCOUNT, FAILING, INSTANCES
from tests.fixtures.sim import TEST_SECRET_ID, TEST_SECRET_KEY, SimClock, make_sim_config


@pytest.fixture
def sim_config() -> SimConfig:
    """The shared fast config with our own instances, one of which makes CREATEFAILED images."""
    instances = tuple(SimInstance(i) for i in INSTANCES)
    # No rate limits: these tests count calls and outcomes, the limiter has its own tests.
    return replace(
        make_sim_config(0),
        instances=(*instances, SimInstance(FAILING, behaviour="fail")),
        create_delay=(0.0, 0.0),
        limits=dict.fromkeys(make_sim_config(0).limits),
    )


@pytest.fixture
def sim_clock() -> SimClock:
    """The clock the simulator below runs on."""
    return SimClock()


@pytest.fixture
async def simulator(sim_config: SimConfig, sim_clock: SimClock) -> AsyncIterator[Simulator]:
    """The shared simulator fixture, on a clock the test controls."""
    sim = Simulator(sim_config, mono=sim_clock)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@pytest.fixture
def settings() -> Settings:
    """Settings with a fast tracker."""
    return Settings(tracker_min_interval=0.02, tracker_max_interval=0.1)


@pytest.fixture
async def engine(
    pg_pool: asyncpg.Pool, simulator: Simulator, settings: Settings
) -> AsyncIterator[EngineContext]:
    """An EngineContext on the test database and the simulator."""
    creds = StaticCredentials(Credentials(TEST_SECRET_ID, TEST_SECRET_KEY))
    async with CvmClient(credentials=creds, endpoint=simulator.url, account=ACCOUNT) as client:
        yield EngineContext(pg_pool, {ACCOUNT: client}, settings, "test-host:1:abc")
