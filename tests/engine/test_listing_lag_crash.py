"""A crash under a 40 s listing lag: the next `backup-now --wait` ends with one image each."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.fleet import generate_fleet
from orchestrator.simulator.runner import Simulator
from tests.fixtures.daemon import DaemonProcess, daemon_process
from tests.fixtures.engine import insert_policy
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_REGION, assert_sim_clean, make_sim_config

FLEET = generate_fleet(6, regions=(TEST_REGION,), seed=23)
LIST_LAG = 40.0  # a new image is missing from DescribeImages this long; its name is taken


@pytest.fixture
def sim_config() -> SimConfig:
    """Six instances, quick builds listed 40 s late, deletions that linger."""
    return replace(
        make_sim_config(),
        instances=FLEET,
        create_delay=(0.1, 0.3),
        list_lag=LIST_LAG,
        delete_delay=2.0,
        seed=23,
    )


async def _same_minute_ahead() -> None:
    """Start early in a minute: both backup-now calls must name the same slot (one run)."""
    second = datetime.now(UTC).second
    if second > 45:
        await asyncio.sleep(60.5 - second)


async def test_a_crash_under_listing_lag_is_finished_by_the_next_backup_now(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    tmp_path: Path,
    reaped: list[DaemonProcess],
) -> None:
    """SIGKILL 1 s after the first CreateImage success; images unlisted for 40 s: the next
    `backup-now --wait` exits 0, one image per instance, and `status` names each."""
    await insert_policy(
        pg_pool, "lag", instance_tags={"backup": "daily"}, schedule="0 0 1 1 *", window="1 hour"
    )
    await _same_minute_ahead()
    first = daemon_process(pg_dsn, simulator.url, tmp_path, "first", reaped)
    await first.start("backup-now", "lag", "--wait")

    async def created() -> bool:
        return simulator.state.count_calls("CreateImage", code="OK") > 0

    await wait_for(created, within=30)
    await asyncio.sleep(1.0)
    await first.kill()
    second = daemon_process(pg_dsn, simulator.url, tmp_path, "second", reaped)
    await second.start("backup-now", "lag", "--wait")
    assert await second.wait(within=LIST_LAG + 60) == 0, second.stderr()[-3000:]
    images = [i for i in simulator.state.iter_ours() if i.alive]
    assert sorted(i.instance_id for i in images) == sorted(s.instance_id for s in FLEET)
    rows = await pg_pool.fetch("SELECT j.image_id, j.state FROM jobs j")
    assert {r["state"] for r in rows} == {"succeeded"}
    assert {r["image_id"] for r in rows} == {i.image_id for i in images}
    status = daemon_process(pg_dsn, simulator.url, tmp_path, "status", reaped)
    await status.start("status")
    assert await status.wait(within=30) == 0, status.stderr()
    assert all(i.image_id in status.stdout() for i in images), status.stdout()
    assert_sim_clean(simulator)
