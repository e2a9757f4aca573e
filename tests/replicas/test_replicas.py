"""Several daemons on one Postgres: one account lease holder drives the API; SIGKILL moves it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from orchestrator import accounts, naming
from orchestrator.simulator.config import Faults, SimConfig
from orchestrator.simulator.fleet import generate_fleet
from orchestrator.simulator.runner import Simulator
from tests.fixtures.daemon import DaemonProcess, config_toml, daemon_env
from tests.fixtures.engine import fast_settings, insert_policy
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_REGION, assert_sim_clean, make_sim_config

FLEET_SIZE = 30
REPLICAS = 3


@pytest.fixture
def sim_config() -> SimConfig:
    """30 instances whose images take a moment, answers with a little latency."""
    return replace(
        make_sim_config(),
        instances=generate_fleet(FLEET_SIZE, regions=(TEST_REGION,), seed=7, data_disks=1),
        create_delay=(0.3, 0.8),
        faults=Faults(latency=(0.0, 0.05)),
        seed=7,
    )


@pytest.fixture
async def replicas(
    pg_dsn: str, simulator: Simulator, tmp_path: Path
) -> AsyncIterator[list[DaemonProcess]]:
    """Three daemon command lines on one database and simulator, each with its own log."""
    settings = fast_settings(
        pg_dsn, simulator.url, lease_seconds=1.0, request_timeout=0.5, shutdown_grace=3.0
    )
    made = []
    for n in range(REPLICAS):
        home = tmp_path / f"replica{n}"
        home.mkdir()
        config = config_toml(settings, home / "config.toml")
        made.append(DaemonProcess(daemon_env(pg_dsn, simulator.url, config, home), home / "log"))
    yield made
    for process in made:
        await process.kill()  # a test that failed mid-run must not leave them running


def _count(daemon: DaemonProcess, event: str) -> int:
    return sum(1 for e in daemon.events() if e["event"] == event)


async def _holder(replicas: list[DaemonProcess]) -> DaemonProcess:
    """The one replica that logged acquiring the default account's lease."""
    holders: list[DaemonProcess] = []

    async def found() -> bool:
        holders[:] = [d for d in replicas if _count(d, "account.lease_acquired") > 0]
        return len(holders) == 1 and all(_count(d, "daemon.started") for d in replicas)

    await wait_for(found, within=20)
    return holders[0]


async def _lock_holders(pool: asyncpg.Pool) -> int:
    """Sessions holding the default account's advisory lock, as Postgres sees them."""
    value = await pool.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid::bigint = $1 AND objid::int = hashtext($2)",
        accounts.LOCK_NAMESPACE,
        accounts.lock_key("default"),
    )
    return int(value)


async def _succeeded(pool: asyncpg.Pool) -> bool:
    value = await pool.fetchval("SELECT count(*) FROM jobs WHERE state = 'succeeded'")
    return int(value) == FLEET_SIZE


async def _stop_all(replicas: list[DaemonProcess]) -> None:
    for daemon in replicas:
        await daemon.kill()


async def test_killed_lease_holder_hands_its_account_over_without_duplicates_or_bursts(
    replicas: list[DaemonProcess], pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """SIGKILL the lease holder mid-run: another replica takes over; one image each, no burst."""
    try:
        for daemon in replicas:
            await daemon.start("run")
        first = await _holder(replicas)
        assert await _lock_holders(pg_pool) == 1
        await insert_policy(pg_pool, "fleet", instance_tags={"backup": "daily"})
        await wait_for(lambda: _dispatched(first, 8), within=20)
        # Until now only the holder called CreateImage; the others claimed nothing.
        others = [d for d in replicas if d is not first]
        assert [_count(d, "job.dispatched") for d in others] == [0, 0]
        await first.kill()
        await wait_for(lambda: _taken_over(others), within=10)
        await wait_for(lambda: _succeeded(pg_pool), within=30)
        assert await _lock_holders(pg_pool) == 1
        # The kill landed mid-run: the new holder made the rest of the calls.
        assert sum(_count(d, "job.dispatched") for d in others) > 0
    finally:
        await _stop_all(replicas)
    slot = await pg_pool.fetchval("SELECT slot FROM runs")
    states = await pg_pool.fetch("SELECT DISTINCT state FROM jobs")
    assert [r["state"] for r in states] == ["succeeded"]
    for spec in simulator.config.instances:
        made = simulator.state.images_named(naming.image_name("fleet", spec.instance_id, slot))
        assert [(i.state, i.alive) for i in made] == [("NORMAL", True)], made
    assert_sim_clean(simulator)


async def _dispatched(daemon: DaemonProcess, count: int) -> bool:
    return _count(daemon, "job.dispatched") >= count


async def _taken_over(others: list[DaemonProcess]) -> bool:
    return sum(_count(d, "account.lease_acquired") for d in others) == 1


async def test_lease_holder_keeps_the_account_while_alive(
    replicas: list[DaemonProcess], pg_pool: asyncpg.Pool
) -> None:
    """Two live replicas never both hold an account: the second waits for the first."""
    try:
        await replicas[0].start("run")
        await wait_for(lambda: _acquired(replicas[0]), within=20)
        await replicas[1].start("run")
        await wait_for(lambda: _started(replicas[1]), within=20)
        # Several lease rounds (one a second) pass without the second replica taking it.
        await asyncio.sleep(2.5)
        assert _count(replicas[1], "account.lease_acquired") == 0
        assert await _lock_holders(pg_pool) == 1
    finally:
        await _stop_all(replicas)


async def _acquired(daemon: DaemonProcess) -> bool:
    return _count(daemon, "account.lease_acquired") > 0


async def _started(daemon: DaemonProcess) -> bool:
    return _count(daemon, "daemon.started") > 0
