"""Copies under SIGKILL and lost answers: still exactly one copy per backup and destination."""

from __future__ import annotations

import asyncio
import functools
import random
import signal
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from orchestrator import naming
from orchestrator.simulator.config import Faults, SimConfig
from orchestrator.simulator.fleet import generate_fleet
from orchestrator.simulator.runner import Simulator
from tests.fixtures.daemon import DaemonProcess, daemon_process
from tests.fixtures.engine import insert_policy
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_QUOTA, TEST_REGION, assert_sim_clean, make_sim_config

FLEET_SIZE = 12
KILLS = 4
DESTINATION = "ap-shanghai"


@pytest.fixture
def sim_config() -> SimConfig:
    """Twelve instances; copies take a while, answers get lost, listings lag."""
    return replace(
        make_sim_config(),
        instances=generate_fleet(FLEET_SIZE, regions=(TEST_REGION,), seed=7, data_disks=0),
        quota={TEST_REGION: TEST_QUOTA, DESTINATION: TEST_QUOTA},
        create_delay=(0.1, 0.3),
        sync_delay=(0.5, 1.5),
        list_lag=0.5,
        delete_delay=0.5,
        faults=Faults(internal_error_rate=0.05, drop_rate=0.15, after_create=0.5),
        seed=7,
    )


@pytest.fixture
def daemon(
    pg_dsn: str, simulator: Simulator, tmp_path: Path, reaped: list[DaemonProcess]
) -> DaemonProcess:
    """A daemon command line on this test's database and simulator (not started; reaped)."""
    return daemon_process(
        pg_dsn,
        simulator.url,
        tmp_path,
        "daemon",
        reaped,
        lease_seconds=6.0,
        request_timeout=3.0,
        shutdown_grace=3.0,
    )


async def _copies_dispatched(pool: asyncpg.Pool) -> bool:
    value = await pool.fetchval("SELECT count(*) FROM jobs WHERE kind = 'copy'")
    return int(value) > 0


async def _done(pool: asyncpg.Pool) -> bool:
    rows = await pool.fetch("SELECT kind, state FROM jobs")
    return len(rows) == 2 * FLEET_SIZE and all(r["state"] == "succeeded" for r in rows)


async def _started(daemon: DaemonProcess, count: int) -> bool:
    return sum(1 for e in daemon.events() if e["event"] == "daemon.started") >= count


@pytest.mark.slow
async def test_sigkill_while_copying_leaves_one_copy_per_backup(
    daemon: DaemonProcess, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Four SIGKILLs while copies are made, then a clean finish: one copy each, none twice."""
    ids = [spec.instance_id for spec in simulator.config.instances]
    policy_id = await insert_policy(pg_pool, "drk", instance_ids=ids, keep_last=1)
    copies = [{"region": DESTINATION, "keep_last": 1}]
    await pg_pool.execute("UPDATE policies SET copies = $2 WHERE id = $1", policy_id, copies)
    rng = random.Random(11)
    for round_no in range(1, KILLS + 1):
        await daemon.start("run")
        await wait_for(functools.partial(_started, daemon, round_no), within=30)
        await wait_for(lambda: _copies_dispatched(pg_pool), within=60)
        await asyncio.sleep(rng.uniform(0.1, 1.5))
        await daemon.kill()
    await daemon.start("run")
    await wait_for(lambda: _done(pg_pool), within=90)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.wait(within=15) == 0
    slot = await pg_pool.fetchval("SELECT slot FROM runs")
    for instance in ids:
        made = simulator.state.images_named(naming.image_name("drk", instance, slot))
        by_region = sorted((i.region, i.state, i.alive) for i in made)
        assert by_region == [(TEST_REGION, "NORMAL", True), (DESTINATION, "NORMAL", True)]
    assert_sim_clean(simulator)
