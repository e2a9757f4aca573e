"""Operator-area fixtures: an engine context on the simulator, and rows written with plain SQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from datetime import datetime

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
from tests.engine.conftest import LogCapture
from tests.fixtures.sim import TEST_REGION, make_sim_config

# Images that exist at the simulator and that the images table records as ours (tests/plan).
SEEDED = ("img-old00001", "img-old00002", "img-old00003", "img-pend0001")


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
    """JSON log lines written while the test runs (the engine area's capture, for this one)."""
    capture = LogCapture()
    logs.configure("json", "debug", capture.stream)
    yield capture
    structlog.reset_defaults()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client for the endpoint under test."""
    async with aiohttp.ClientSession() as session:
        yield session


async def insert_policy(
    pool: asyncpg.Pool,
    name: str,
    instance_ids: Sequence[str],
    *,
    keep_last: int = 2,
    include_data_disks: bool = False,
) -> int:
    """A policy written with plain SQL, due now (daily at midnight, a two-day window); its id."""
    value = await pool.fetchval(
        "INSERT INTO policies (name, region, schedule, instance_ids, keep_last,"
        " include_data_disks, completion_window)"
        " VALUES ($1, $2, '0 0 * * *', $3, $4, $5, '2 days') RETURNING id",
        name,
        TEST_REGION,
        list(instance_ids),
        keep_last,
        include_data_disks,
    )
    return int(value)


async def insert_image(
    pool: asyncpg.Pool,
    policy_id: int,
    instance_id: str,
    image_id: str,
    created: datetime,
    *,
    state: str = "NORMAL",
    delete_reason: str | None = None,
) -> None:
    """One image recorded as ours; with `delete_reason`, a delete intent already committed."""
    await pool.execute(
        "INSERT INTO images (image_id, name, account, region, instance_id, policy_id, slot,"
        " state, created_at, delete_requested_at, delete_reason)"
        " VALUES ($1, $2, 'default', $3, $4, $5, $6, $7, $6,"
        " CASE WHEN $8::text IS NULL THEN NULL ELSE now() END, $8)",
        image_id,
        f"seed-{image_id}",
        TEST_REGION,
        instance_id,
        policy_id,
        created,
        state,
        delete_reason,
    )
