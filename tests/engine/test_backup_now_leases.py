"""`backup-now --wait` beside a running daemon: the lease holder makes every call, once."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from orchestrator.accounts import LOCK_NAMESPACE, lock_key
from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.fleet import generate_fleet
from orchestrator.simulator.runner import Simulator
from tests.fixtures.daemon import DaemonProcess, daemon_process
from tests.fixtures.engine import insert_policy
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_REGION, assert_sim_clean, make_sim_config

FLEET = generate_fleet(8, regions=(TEST_REGION,), seed=17)
# Long on purpose: the daemon must learn of the new run by NOTIFY.
NOTIFY_ONLY_POLL = 30.0


@pytest.fixture
def sim_config() -> SimConfig:
    """Eight instances, quick builds."""
    return replace(make_sim_config(), instances=FLEET, create_delay=(0.1, 0.3), seed=17)


async def _manual_policy(pool: asyncpg.Pool) -> None:
    # Not due on its own schedule (1 January): only backup-now runs it. The window outlasts a
    # slow machine: a run made at :59 must not expire at the next minute.
    await insert_policy(
        pool, "manual", instance_tags={"backup": "daily"}, schedule="0 0 1 1 *", window="1 hour"
    )


def _count(process: DaemonProcess, event: str) -> int:
    return sum(1 for e in process.events() if e["event"] == event)


async def test_backup_now_wait_leaves_the_calls_to_the_daemon_holding_the_lease(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    tmp_path: Path,
    reaped: list[DaemonProcess],
) -> None:
    """With a daemon holding the account, --wait only waits: the daemon drives the run."""
    await _manual_policy(pg_pool)
    daemon = daemon_process(
        pg_dsn, simulator.url, tmp_path, "daemon", reaped, poll_interval=NOTIFY_ONLY_POLL
    )
    await daemon.start("run")

    async def leased() -> bool:
        return _count(daemon, "account.lease_acquired") > 0

    await wait_for(leased, within=30)
    cli = daemon_process(
        pg_dsn, simulator.url, tmp_path, "cli", reaped, poll_interval=NOTIFY_ONLY_POLL
    )
    await cli.start("backup-now", "manual", "--wait")
    # Well inside the daemon's 30 s poll: the new run's NOTIFY is what wakes it.
    assert await cli.wait(within=20) == 0, cli.stderr()
    assert _count(cli, "job.dispatched") == 0
    assert _count(daemon, "job.dispatched") == len(FLEET)
    await daemon.kill()
    states = await pg_pool.fetch("SELECT state, count(*) AS n FROM jobs GROUP BY state")
    assert {r["state"]: r["n"] for r in states} == {"succeeded": len(FLEET)}
    assert_sim_clean(simulator)


async def test_backup_now_wait_calls_nothing_until_it_holds_the_account(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    tmp_path: Path,
    reaped: list[DaemonProcess],
) -> None:
    """While another process holds the account's lease --wait makes no call; then takes over."""
    await _manual_policy(pg_pool)
    holder = await asyncpg.connect(pg_dsn)
    try:
        taken = await holder.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2))", LOCK_NAMESPACE, lock_key("default")
        )
        assert taken
        cli = daemon_process(
            pg_dsn, simulator.url, tmp_path, "cli", reaped, poll_interval=NOTIFY_ONLY_POLL
        )
        await cli.start("backup-now", "manual", "--wait")

        async def started() -> bool:
            return _count(cli, "daemon.started") > 0

        await wait_for(started, within=30)
        # Unleased, the engine would claim and call within milliseconds of starting.
        with pytest.raises(TimeoutError):
            await wait_for(functools.partial(_calls, simulator), within=1.0)
    finally:
        await holder.close()  # the lease frees with the session
    assert await cli.wait(within=60) == 0, cli.stderr()
    assert _count(cli, "job.dispatched") == len(FLEET)
    assert_sim_clean(simulator)


async def _calls(simulator: Simulator) -> bool:
    return simulator.state.count_calls("CreateImage") > 0
