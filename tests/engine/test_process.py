"""The daemon as a real process: SIGKILL at random moments, SIGTERM, exit codes."""

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
from tests.fixtures.sim import TEST_REGION, assert_sim_clean, make_sim_config

FLEET_SIZE = 40
KILLS = 6


@pytest.fixture
def sim_config() -> SimConfig:
    """40 instances whose images take a moment and are listed late; faults and dropped answers."""
    return replace(
        make_sim_config(),
        instances=generate_fleet(FLEET_SIZE, regions=(TEST_REGION,), seed=99, data_disks=1),
        create_delay=(0.2, 0.8),
        # The real API's eventual consistency: new images listed late, deleted ones linger.
        list_lag=1.0,
        delete_delay=1.0,
        faults=Faults(
            internal_error_rate=0.1, drop_rate=0.05, after_create=0.5, latency=(0.0, 0.05)
        ),
        seed=99,
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


async def _terminal(pool: asyncpg.Pool, expected: int) -> bool:
    value = await pool.fetchval(
        "SELECT count(*) FROM jobs WHERE state IN ('succeeded', 'failed', 'expired', 'skipped')"
    )
    return int(value) == expected


async def _started(daemon: DaemonProcess, count: int) -> bool:
    return sum(1 for e in daemon.events() if e["event"] == "daemon.started") >= count


@pytest.mark.slow
async def test_sigkill_at_random_moments_leaves_exactly_one_image_per_instance(
    daemon: DaemonProcess, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """Six SIGKILLs mid-run, then a clean finish: one NORMAL image per instance, no duplicate."""
    await insert_policy(pg_pool, "crash", instance_tags={"backup": "daily"})
    rng = random.Random(2024)
    for round_no in range(1, KILLS + 1):
        await daemon.start("run")
        await wait_for(functools.partial(_started, daemon, round_no), within=30)
        await asyncio.sleep(rng.uniform(0.05, 1.2))
        await daemon.kill()
    # The kills landed while calls were being made, not only during start-up.
    assert await _has(daemon, "job.dispatched")
    await daemon.start("run")
    await wait_for(lambda: _terminal(pg_pool, FLEET_SIZE), within=60)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.wait(within=15) == 0
    slot = await pg_pool.fetchval("SELECT slot FROM runs")
    states = await pg_pool.fetch("SELECT DISTINCT state FROM jobs")
    assert [r["state"] for r in states] == ["succeeded"]
    for spec in simulator.config.instances:
        name = naming.image_name("crash", spec.instance_id, slot)
        made = simulator.state.images_named(name)
        assert [(i.state, i.alive) for i in made] == [("NORMAL", True)], (name, made)
    assert_sim_clean(simulator)


async def test_sigterm_exits_zero_within_grace_and_releases_every_lease(
    daemon: DaemonProcess, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """SIGTERM mid-run: exit 0 within the grace period and no job left claimed."""
    await _sigterm_mid_run(daemon, pg_pool, simulator, "term", latency=(0.3, 0.6))
    # The grace period is 3 s; the bound below only keeps a hang from stalling the suite.
    assert await daemon.wait(within=3.0 + 5.0) == 0
    held = await pg_pool.fetchval("SELECT count(*) FROM jobs WHERE lease_owner IS NOT NULL")
    assert held == 0
    events = [e["event"] for e in daemon.events()]
    assert events.index("daemon.stopping") < events.index("daemon.stopped")
    assert_sim_clean(simulator)


async def test_second_signal_exits_at_once(
    daemon: DaemonProcess, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """A second SIGTERM during the grace period ends the process immediately."""
    proc = await _sigterm_mid_run(daemon, pg_pool, simulator, "twice", latency=(2.0, 2.5))
    await wait_for(lambda: _has(daemon, "daemon.stopping"), within=10)
    proc.send_signal(signal.SIGTERM)
    assert await daemon.wait(within=10) == 128 + signal.SIGTERM
    assert any(e["event"] == "daemon.killed" for e in daemon.events())


async def _has(daemon: DaemonProcess, event: str) -> bool:
    return any(e["event"] == event for e in daemon.events())


async def _sigterm_mid_run(
    daemon: DaemonProcess,
    pool: asyncpg.Pool,
    simulator: Simulator,
    policy: str,
    *,
    latency: tuple[float, float],
) -> asyncio.subprocess.Process:
    """Start a run with slow calls, SIGTERM it once a call is out; the process."""
    simulator.set_faults(Faults(latency=latency))
    await insert_policy(pool, policy, instance_tags={"backup": "daily"})
    await daemon.start("run")
    await wait_for(functools.partial(_has, daemon, "job.dispatched"), within=30)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    return daemon.proc
