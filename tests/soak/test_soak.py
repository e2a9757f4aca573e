"""Soak: the daemon as a process through Postgres restarts and 30% API faults.

Short by default (one round, two restarts: the CI run). With CVM_BACKUP_SOAK_SECONDS=600 it
keeps going for that long: a new policy (a new set of jobs) per round, two restarts in each,
all on one daemon process that must never die. Every round must end with every job succeeded,
exactly one NORMAL image per instance, no duplicate, no rate-limit violation, nothing claimed.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from orchestrator import naming
from orchestrator.db import pool
from orchestrator.db.resilience import is_connection_error
from orchestrator.simulator.config import Faults, SimConfig
from orchestrator.simulator.fleet import generate_fleet
from orchestrator.simulator.runner import Simulator
from tests.fixtures.daemon import DaemonProcess, config_toml, daemon_env
from tests.fixtures.engine import FAST_RETRY, fast_settings, insert_policy
from tests.fixtures.own_pg import OwnPostgres
from tests.fixtures.sim import TEST_REGION, assert_sim_clean, make_sim_config

FLEET_SIZE = 36
SOAK_SECONDS = float(os.environ.get("CVM_BACKUP_SOAK_SECONDS", "0"))
ROUND_TIMEOUT = 90.0
# 30% of calls fail: InternalError, HTTP 5xx and dropped connections, 10% each; half of the
# CreateImage faults strike after the image was made.
FAULTS = Faults(
    internal_error_rate=0.1,
    http_5xx_rate=0.1,
    drop_rate=0.1,
    after_create=0.5,
    latency=(0.0, 0.05),
)
TERMINAL = ("succeeded", "failed", "expired", "skipped")


@pytest.fixture
def sim_config() -> SimConfig:
    """36 instances, images that take a moment to build, 30% faults, room for many rounds."""
    return replace(
        make_sim_config(),
        instances=generate_fleet(FLEET_SIZE, regions=(TEST_REGION,), seed=7, data_disks=1),
        create_delay=(0.3, 1.0),
        # The real API's eventual consistency: new images listed late, deleted ones linger.
        list_lag=1.0,
        delete_delay=1.0,
        faults=FAULTS,
        quota={TEST_REGION: 100_000},
        seed=7,
    )


@pytest.fixture
async def daemon(
    own_postgres: OwnPostgres, simulator: Simulator, tmp_path: Path
) -> AsyncIterator[DaemonProcess]:
    """A daemon command line on the restartable database and the faulty simulator (reaped)."""
    # Leases outlast an outage plus a missed beat, so a restart alone never causes a reclaim;
    # a generous retry budget keeps 30% faults from exhausting a job by bad luck.
    settings = fast_settings(
        own_postgres.dsn,
        simulator.url,
        lease_seconds=6.0,
        retry=replace(FAST_RETRY, max_transient_attempts=12),
    )
    config = config_toml(settings, tmp_path / "config.toml")
    env = daemon_env(own_postgres.dsn, simulator.url, config, tmp_path)
    process = DaemonProcess(env, tmp_path / "log")
    yield process
    await process.kill()


class Db:
    """Test-side queries that treat the database being away as "not yet" instead of failing."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record] | None:
        """The rows, or None while the database is unavailable."""
        try:
            conn = await pool.connect_dsn(self.dsn)
        except Exception as exc:
            if is_connection_error(exc):
                return None
            raise
        try:
            return await conn.fetch(query, *args)
        except Exception as exc:
            if is_connection_error(exc):
                return None
            raise
        finally:
            await conn.close()

    async def count(self, run_id: int, states: tuple[str, ...]) -> int | None:
        """How many jobs of the run are in one of `states`."""
        rows = await self.fetch(
            "SELECT count(*) AS n FROM jobs WHERE run_id = $1 AND state = ANY($2::text[])",
            run_id,
            list(states),
        )
        return None if rows is None else int(rows[0]["n"])


async def _until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    try:
        async with asyncio.timeout(within):
            while not await check():  # noqa: ASYNC110 - polls a database, not an event
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out after {within} s waiting for {what}") from None


async def _reaching(db: Db, run_id: int, states: tuple[str, ...], at_least: int) -> None:
    async def reached() -> bool:
        n = await db.count(run_id, states)
        return n is not None and n >= at_least

    await _until(reached, ROUND_TIMEOUT, f"{at_least} jobs in {states}")


async def _run_of(db: Db, policy: str) -> int:
    found: list[int] = []

    async def created() -> bool:
        rows = await db.fetch(
            "SELECT r.id FROM runs r JOIN policies p ON p.id = r.policy_id WHERE p.name = $1",
            policy,
        )
        found.extend(int(r["id"]) for r in rows or ())
        return bool(found)

    await _until(created, 30, f"the run of {policy}")
    return found[0]


async def _soak_round(
    number: int, own: OwnPostgres, db: Db, daemon: DaemonProcess, sim: Simulator
) -> None:
    policy = f"soak{number}"
    db_pool = await pool.create_pool_dsn(own.dsn, min_size=1, max_size=1)
    try:
        await insert_policy(db_pool, policy, instance_tags={"backup": "daily"})
    finally:
        await db_pool.close()
    run_id = await _run_of(db, policy)
    rng = random.Random(number)
    # First restart while CreateImage calls are in flight, second while images are tracked.
    await _reaching(db, run_id, ("creating", "waiting_image", *TERMINAL), FLEET_SIZE // 4)
    await own.restart(down_for=rng.uniform(0.5, 1.5))
    await _reaching(db, run_id, ("succeeded",), FLEET_SIZE // 2)
    await own.restart(down_for=rng.uniform(0.2, 1.0))
    await _reaching(db, run_id, TERMINAL, FLEET_SIZE)
    await _assert_round(policy, run_id, db, sim)
    assert daemon.proc is not None
    assert daemon.proc.returncode is None, "the daemon died"


async def _stop(daemon: DaemonProcess) -> int | None:
    """SIGTERM the daemon and reap it (SIGKILL after 30 s); its exit code."""
    if daemon.proc is None:
        return None
    if daemon.proc.returncode is None:
        daemon.proc.send_signal(signal.SIGTERM)
    try:
        return await daemon.wait(within=30)
    except TimeoutError:
        await daemon.kill()
        return None


async def _assert_round(policy: str, run_id: int, db: Db, sim: Simulator) -> None:
    rows = await db.fetch(
        "SELECT instance_id, state, reason, last_error_code, lease_owner, slot"
        " FROM jobs WHERE run_id = $1",
        run_id,
    )
    assert rows is not None
    assert len(rows) == FLEET_SIZE
    bad = [dict(r) for r in rows if r["state"] != "succeeded" or r["lease_owner"] is not None]
    assert bad == []
    for row in rows:
        name = naming.image_name(policy, row["instance_id"], row["slot"])
        made = sim.state.images_named(name)
        assert [(i.state, i.alive) for i in made] == [("NORMAL", True)], (name, made)
    assert_sim_clean(sim)


@pytest.mark.timeout(SOAK_SECONDS + 240)
async def test_daemon_survives_postgres_restarts_and_faults(
    own_postgres: OwnPostgres, daemon: DaemonProcess, simulator: Simulator
) -> None:
    """Postgres restarts mid-run under 30% faults: every job succeeds once, nothing duplicated."""
    db = Db(own_postgres.dsn)
    await daemon.start("run")
    loop = asyncio.get_running_loop()
    until = loop.time() + SOAK_SECONDS
    number = 0
    try:
        while number == 0 or loop.time() < until:
            number += 1
            await _soak_round(number, own_postgres, db, daemon, simulator)
    finally:
        # Reaped even when a round failed: a live child outlasting the test fails later ones.
        code = await _stop(daemon)
    assert code == 0
    events = [e["event"] for e in daemon.events()]
    assert "daemon.task_failed" not in events
    # The restarts were noticed and ridden out, not slept through.
    assert events.count("db.unavailable") >= 1
    assert events.count("db.reconnected") >= 1
    assert own_postgres.restarts == 2 * number
