"""Extreme but valid policy values, and rows that break the bounds, never take the daemon down."""

from __future__ import annotations

import functools
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.runner import Simulator
from tests.fixtures.daemon import DaemonProcess, config_toml, daemon_env
from tests.fixtures.engine import fast_settings
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_REGION, make_sim_config

# Every limit at its documented maximum (orchestrator/policies.py MAX_*), beside a normal policy.
EXTREME = """
[[policies]]
name = "normal"
region = "{region}"
schedule = "* * * * *"
instance_ids = ["{instance}"]
[policies.retention]
keep_last = 1

[[policies]]
name = "extreme-keeps"
region = "{region}"
schedule = "* * * * *"
completion_window = "31d"
instance_ids = {many_ids}
[policies.retention]
keep_last = 10000
keep_daily = 10000
keep_weekly = 10000
keep_monthly = 10000
keep_yearly = 10000
max_age_days = 36500

[[policies]]
name = "extreme-tags"
region = "{region}"
schedule = "* * * * *"
timezone = "Pacific/Kiritimati"
instance_tags = {{ "{key}" = "{value}" }}
[policies.retention]
keep_last = 1

[[policies]]
name = "a2345678901234567890"
region = "{region}"
schedule = "0 0 29 2 *"
timezone = "Etc/GMT-14"
instance_ids = ["{instance}"]
[policies.retention]
keep_yearly = 10000
max_age_days = 1
"""

# Rows older than migration 0006's bounds, as plain SQL wrote them before it existed.
BROKEN_ROWS = (
    ("huge-window", "completion_window", "interval '3000000 days'"),
    ("endless-window", "completion_window", "interval '100000000 years'"),
    ("ancient-age", "max_age_days", "1000000"),
    ("huge-keep", "keep_last", "2147483647"),
)


@pytest.fixture
def sim_config() -> SimConfig:
    """Three instances, listed late and deleted late like the real API."""
    return replace(make_sim_config(3), list_lag=0.5, delete_delay=0.5)


@pytest.fixture
async def daemon(pg_dsn: str, simulator: Simulator, tmp_path: Path) -> AsyncIterator[DaemonProcess]:
    """A daemon on this test's database and simulator, sweeping retention every second."""
    settings = fast_settings(pg_dsn, simulator.url, shutdown_grace=3.0)
    config = config_toml(settings, tmp_path / "config.toml")
    # Debug level: a sweep that deletes nothing logs retention.swept only there.
    config.write_text('retention_interval = 1.0\nlog_level = "debug"\n' + config.read_text())
    process = DaemonProcess(daemon_env(pg_dsn, simulator.url, config, tmp_path), tmp_path / "log")
    yield process
    await process.kill()


def _policy_file(simulator: Simulator, path: Path) -> Path:
    instances = [spec.instance_id for spec in simulator.config.instances]
    # Real instances first, then ids the API does not know: the policy still runs for the rest.
    many = instances + [f"ins-{n:08d}" for n in range(200 - len(instances))]
    text = EXTREME.format(
        region=TEST_REGION,
        instance=instances[0],
        many_ids="[" + ", ".join(f'"{i}"' for i in many) + "]",
        key="k" * 127,
        value="v" * 255,
    )
    path.write_text(text)
    return path


async def _break_rows(pool: asyncpg.Pool, instance: str) -> None:
    """Rows past the bounds, written as if before migration 0006 (its CHECKs dropped here)."""
    for name in (
        "policies_completion_window_max",
        "policies_keep_max",
        "policies_max_age_days_max",
    ):
        await pool.execute(f"ALTER TABLE policies DROP CONSTRAINT {name}")
    for name, column, value in BROKEN_ROWS:
        await pool.execute(
            f"INSERT INTO policies (name, region, schedule, instance_ids, keep_last, {column})"
            f" VALUES ($1, $2, '* * * * *', ARRAY[$3], 1, {value})"
            if column != "keep_last"
            else f"INSERT INTO policies (name, region, schedule, instance_ids, keep_last)"
            f" VALUES ($1, $2, '* * * * *', ARRAY[$3], {value})",
            name,
            TEST_REGION,
            instance,
        )


async def _succeeded(pool: asyncpg.Pool, policy: str) -> bool:
    found = await pool.fetchval(
        "SELECT count(*) FROM jobs j JOIN runs r ON r.id = j.run_id JOIN policies p"
        " ON p.id = r.policy_id WHERE p.name = $1 AND j.state = 'succeeded'",
        policy,
    )
    return int(found) >= 1


def _count(daemon: DaemonProcess, event: str, **fields: str) -> int:
    return sum(
        e["event"] == event and all(e.get(k) == v for k, v in fields.items())
        for e in daemon.events()
    )


def _logged(daemon: DaemonProcess, event: str, **fields: str) -> bool:
    return _count(daemon, event, **fields) > 0


async def _reported(daemon: DaemonProcess, policy: str) -> bool:
    return _logged(daemon, "policy.invalid", policy=policy)


async def _more(daemon: DaemonProcess, event: str, than: int) -> bool:
    return _count(daemon, event) > than


async def test_extreme_values_and_broken_rows_leave_the_daemon_up(
    daemon: DaemonProcess, pg_pool: asyncpg.Pool, simulator: Simulator, tmp_path: Path
) -> None:
    """Limits at their maximum apply and run; broken rows are skipped; the normal policy is
    backed up, retention sweeps, and SIGTERM still exits 0."""
    path = _policy_file(simulator, tmp_path / "extreme.toml")
    await daemon.start("policy", "apply", str(path))
    assert await daemon.wait(within=30) == 0, daemon.stderr()
    first = simulator.config.instances[0].instance_id
    await _break_rows(pool=pg_pool, instance=first)
    await daemon.start("run")
    await wait_for(lambda: _succeeded(pg_pool, "normal"), within=40)
    await wait_for(lambda: _succeeded(pg_pool, "extreme-keeps"), within=40)
    for name, _, _ in BROKEN_ROWS:
        await wait_for(functools.partial(_reported, daemon, name))
    # A sweep of the normal policy's images after a row update past the bound.
    await pg_pool.execute("UPDATE policies SET max_age_days = 1000000 WHERE name = 'normal'")
    swept = _count(daemon, "retention.swept")
    await wait_for(lambda: _more(daemon, "retention.swept", swept + 1), within=20)
    assert daemon.proc is not None
    assert daemon.proc.returncode is None, daemon.stderr()[-4000:]
    # The sweep judged the pair with that age (an age past the calendar expires nothing).
    assert not _logged(daemon, "retention.skipped")
    # Reported once per row, not on every pass.
    assert _count(daemon, "policy.invalid", policy="ancient-age", level="error") == 1
    daemon.proc.send_signal(signal.SIGTERM)
    assert await daemon.wait(within=15) == 0
    assert "Traceback" not in daemon.stderr()
    assert not _logged(daemon, "daemon.task_failed")
