"""The engine commands as a user runs them: run --once, backup-now, status; exit codes."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from orchestrator.simulator.runner import Simulator
from tests.fixtures.daemon import DaemonProcess, config_toml, daemon_env
from tests.fixtures.engine import fast_settings, insert_policy


def _daemon(dsn: str, simulator: Simulator, tmp_path: Path) -> DaemonProcess:
    config = config_toml(fast_settings(dsn, simulator.url), tmp_path / "config.toml")
    return DaemonProcess(daemon_env(dsn, simulator.url, config, tmp_path), tmp_path / "log")


@pytest.fixture
def cli(pg_dsn: str, simulator: Simulator, tmp_path: Path) -> DaemonProcess:
    """The command line on this test's database and simulator."""
    return _daemon(pg_dsn, simulator, tmp_path)


async def _run(cli: DaemonProcess, *args: str) -> int:
    await cli.start(*args)
    return await cli.wait(within=60)


async def test_run_once_drains_and_exits_zero_then_status_shows_images(
    cli: DaemonProcess, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """run --once backs everything up and exits 0; status --json names each latest image."""
    await insert_policy(pg_pool, "once", instance_tags={"backup": "daily"})
    assert await _run(cli, "run", "--once") == 0
    assert await _run(cli, "status", "--json") == 0
    rows = json.loads(cli.stdout())
    assert len(rows) == len(simulator.config.instances)
    assert {r["state"] for r in rows} == {"succeeded"}
    assert all(r["latest_image"] and r["latest_image"].startswith("img-") for r in rows)
    assert await _run(cli, "status") == 0
    assert "LATEST GOOD IMAGE" in cli.stdout()


async def test_run_once_exits_one_when_a_job_fails(
    cli: DaemonProcess, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """A job that fails (here: an instance that cannot be imaged) makes run --once exit 1."""
    target = simulator.config.instances[0].instance_id
    simulator.set_instance_state(target, "LAUNCH_FAILED")
    await insert_policy(pg_pool, "bad", instance_ids=[target])
    assert await _run(cli, "run", "--once") == 1
    code = await pg_pool.fetchval("SELECT last_error_code FROM jobs")
    assert code == "InvalidInstance.NotSupported"


async def test_backup_now_twice_in_a_minute_then_wait(
    cli: DaemonProcess, pg_pool: asyncpg.Pool, simulator: Simulator
) -> None:
    """backup-now creates the minute's run once; --wait drives it and prints progress."""
    await _clear_of_minute_rollover()
    await insert_policy(pg_pool, "now", instance_tags={"backup": "daily"})
    assert await _run(cli, "backup-now", "now") == 0
    assert await _run(cli, "backup-now", "now", "--wait") == 0
    lines = cli.stdout().splitlines()
    assert "created" in lines[0]
    assert "exists" in lines[1]
    total = len(simulator.config.instances)
    assert lines[-1].startswith(f"run 1: {total}/{total} terminal (succeeded {total})")
    assert await pg_pool.fetchval("SELECT count(*) FROM runs") == 1


async def _clear_of_minute_rollover() -> None:
    # "Twice in the same minute" needs both calls inside one wall-clock minute; near the end of
    # a minute, start at the next one instead of racing the rollover.
    second = datetime.now(UTC).second
    if second >= 45:
        await asyncio.sleep(60.5 - second)


async def test_unknown_policy_is_a_usage_error(cli: DaemonProcess) -> None:
    """backup-now with a policy that does not exist exits 2 and names it."""
    assert await _run(cli, "backup-now", "missing") == 2
    assert "no policy named 'missing'" in cli.stderr()


async def test_daemon_refuses_a_schema_that_is_not_current(
    pg_empty_dsn: str, simulator: Simulator, tmp_path: Path
) -> None:
    """On an unmigrated database `run` refuses to start, with exit 2 and the reason."""
    cli = _daemon(pg_empty_dsn, simulator, tmp_path)
    assert await _run(cli, "run") == 2
    assert "schema is not current" in cli.stderr()
