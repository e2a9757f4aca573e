"""Operator-area fixtures: an engine context on the simulator, an HTTP client, captured logs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import aiohttp
import asyncpg
import pytest
import structlog

from orchestrator import logs
from orchestrator.config import Settings
from orchestrator.context import EngineContext
from orchestrator.daemon import engine_context
from orchestrator.simulator.config import SimConfig, SimImageSeed
from orchestrator.simulator.runner import Simulator
from tests.fixtures.logs import LogCapture
from tests.fixtures.operator import SEEDED
from tests.fixtures.sim import TEST_REGION, make_sim_config


@pytest.fixture
def sim_config() -> SimConfig:
    """The shared fast config, plus images the plan tests record as ours."""
    base = make_sim_config()
    seeds = tuple(SimImageSeed(image_id=i, name=f"seed-{i}", region=TEST_REGION) for i in SEEDED)
    return replace(base, images=(*base.images, *seeds))


@pytest.fixture
def instance_ids(sim_config: SimConfig) -> list[str]:
    """The simulated fleet's instance ids."""
    return [i.instance_id for i in sim_config.instances]


@pytest.fixture
def settings(sim_env: Simulator, pg_dsn: str) -> Settings:
    """Settings on this test's database and the simulator; the endpoint on a free port."""
    return Settings(database_url=pg_dsn, endpoint=sim_env.url, metrics_address="127.0.0.1:0")


@pytest.fixture
async def ctx(pg_pool: asyncpg.Pool, settings: Settings) -> AsyncIterator[EngineContext]:
    """The daemon's own engine context (real clients, one shared limiter) on the simulator."""
    async with engine_context(settings, pg_pool) as made:
        yield made


@pytest.fixture
def health_logs() -> Iterator[LogCapture]:
    """JSON log lines written while the test runs (`captured_logs`, under this folder's name)."""
    capture = LogCapture()
    logs.configure("json", "debug", capture.stream)
    yield capture
    structlog.reset_defaults()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for the endpoint under test."""
    async with aiohttp.ClientSession() as session:
        yield session
