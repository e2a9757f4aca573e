"""/healthz, /readyz and /metrics answers; the database up, down, behind; ports taken or off."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from orchestrator import config
from orchestrator.config import Settings
from orchestrator.db import pool as db_pool
from orchestrator.errors import UsageError
from orchestrator.health import DEFAULT_ADDRESS, PortInUse, parse_address, run, serve_health, wanted
from tests.fixtures.logs import LogCapture
from tests.fixtures.polling import wait_for
from tests.operator.scrape import scrape, value

LOCAL = Settings(metrics_address="127.0.0.1:0")


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    """Status and JSON body of a GET."""
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def test_ready_when_all_is_well(pg_pool: asyncpg.Pool, http: aiohttp.ClientSession) -> None:
    """A reachable, current database and running loops: /healthz and /readyz both 200."""
    async with serve_health(pg_pool, LOCAL, lambda: True) as url:
        assert url.startswith("http://127.0.0.1:")
        assert await get(http, f"{url}/healthz") == (200, {"alive": True})
        assert await get(http, f"{url}/readyz") == (200, {"ready": True, "reason": "ready"})


async def test_not_ready_when_loops_stopped(
    pg_pool: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    """The daemon's readiness callback saying no turns /readyz into 503; /healthz stays 200."""
    running = [True]
    async with serve_health(pg_pool, LOCAL, lambda: running[0]) as url:
        assert (await get(http, f"{url}/readyz"))[0] == 200
        running[0] = False
        status, body = await get(http, f"{url}/readyz")
        assert (await get(http, f"{url}/healthz"))[0] == 200
    assert status == 503
    assert body == {"ready": False, "reason": "daemon loops are not running"}


async def test_not_ready_when_schema_not_current(
    pg_empty_dsn: str, http: aiohttp.ClientSession
) -> None:
    """An unmigrated database: 503 naming the pending migration and `cvm-backup migrate`."""
    empty = await db_pool.create_pool_dsn(pg_empty_dsn, max_size=2)
    try:
        async with serve_health(empty, LOCAL, lambda: True) as url:
            status, body = await get(http, f"{url}/readyz")
    finally:
        await empty.close()
    assert status == 503
    assert body["ready"] is False
    assert "0001_init" in str(body["reason"])
    assert "cvm-backup migrate" in str(body["reason"])


async def test_database_down(
    pg_pool: asyncpg.Pool, pg_dsn: str, pg_admin_dsn: str, http: aiohttp.ClientSession
) -> None:
    """Database gone: /readyz 503 with the reason, /metrics still 200 with database_up 0."""
    async with serve_health(pg_pool, LOCAL, lambda: True) as url:
        before = await scrape(http, url)
        name = urlsplit(pg_dsn).path.lstrip("/")
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        finally:
            await admin.close()
        status, body = await get(http, f"{url}/readyz")
        after = await scrape(http, url)
        assert (await get(http, f"{url}/healthz"))[0] == 200
    assert value(before, "cvm_backup_database_up") == 1
    assert status == 503
    assert str(body["reason"]).startswith("database unreachable")
    assert value(after, "cvm_backup_database_up") == 0
    assert value(after, "cvm_backup_jobs") is None


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8739", ("127.0.0.1", 8739)),
        ("[::1]:0", ("::1", 0)),
        ("10.0.0.5:80", ("10.0.0.5", 80)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    """host:port and [v6]:port forms."""
    assert parse_address(address) == expected


@pytest.mark.parametrize(
    "address", ["9108", ":9108", "localhost:", "localhost:http", "h:70000", "h:\u00b2"]
)
def test_parse_address_refuses(address: str) -> None:
    """A malformed metrics_address is a usage error naming the setting."""
    with pytest.raises(UsageError, match="metrics_address"):
        parse_address(address)


async def test_address_in_use_raises_port_in_use(pg_pool: asyncpg.Pool) -> None:
    """serve_health on a taken address raises PortInUse naming it, not a traceback."""
    async with serve_health(pg_pool, LOCAL) as url:
        taken = Settings(metrics_address=url.removeprefix("http://"))
        with pytest.raises(PortInUse, match=r"127\.0\.0\.1:\d+ is already in use"):
            async with serve_health(pg_pool, taken):
                pass


async def test_a_taken_port_is_logged_and_taken_over_when_freed(
    pg_pool: asyncpg.Pool, http: aiohttp.ClientSession, health_logs: LogCapture
) -> None:
    """The daemon's form logs health.port_in_use once, keeps running, and serves once it frees."""
    holder = _listener()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    address = f"127.0.0.1:{holder.getsockname()[1]}"
    stop = asyncio.Event()
    task = asyncio.create_task(
        run(pg_pool, Settings(metrics_address=address), lambda: True, stop, retry=0.05)
    )
    try:
        await wait_for(lambda: _logged(health_logs, "health.port_in_use"), within=10)
        await asyncio.sleep(0.2)  # several retries: still one warning, still running
        assert not task.done()
        holder.close()
        await wait_for(lambda: _logged(health_logs, "health.serving"), within=10)
        assert await get(http, f"http://{address}/healthz") == (200, {"alive": True})
    finally:
        holder.close()
        stop.set()
        await asyncio.wait_for(task, 10)
    warnings = [e for e in health_logs.lines if e["event"] == "health.port_in_use"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["address"] == address
    assert "metrics_address" in warnings[0]["hint"]


async def test_the_default_address_is_loopback_8739_and_never_fatal(
    pg_pool: asyncpg.Pool, health_logs: LogCapture
) -> None:
    """No metrics_address: the default 127.0.0.1:8739 is tried; taken, it is only a warning."""
    assert DEFAULT_ADDRESS == "127.0.0.1:8739"
    holder = _listener()
    try:
        # Held here, or by another process already: taken either way.
        with contextlib.suppress(OSError):
            holder.bind(("127.0.0.1", 8739))
            holder.listen()
        stop = asyncio.Event()
        task = asyncio.create_task(run(pg_pool, Settings(), lambda: True, stop, retry=60))
        await wait_for(lambda: _logged(health_logs, "health.port_in_use"), within=10)
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        holder.close()
    (warning,) = [e for e in health_logs.lines if e["event"] == "health.port_in_use"]
    assert warning["address"] == DEFAULT_ADDRESS


async def test_the_default_address_serves_when_free(
    pg_pool: asyncpg.Pool, http: aiohttp.ClientSession, health_logs: LogCapture
) -> None:
    """No metrics_address and 8739 free: /healthz answers at http://127.0.0.1:8739."""
    with _listener() as probe:
        try:
            probe.bind(("127.0.0.1", 8739))
        except OSError:
            pytest.skip("127.0.0.1:8739 is taken on this machine")
    stop = asyncio.Event()
    task = asyncio.create_task(run(pg_pool, Settings(), lambda: True, stop, retry=60))
    try:
        await wait_for(lambda: _logged(health_logs, "health.serving"), within=10)
        assert await get(http, "http://127.0.0.1:8739/healthz") == (200, {"alive": True})
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    (serving,) = [e for e in health_logs.lines if e["event"] == "health.serving"]
    assert serving["url"] == "http://127.0.0.1:8739"


@pytest.mark.parametrize(
    ("address", "once", "served"),
    [
        (None, False, True),  # the daemon serves by default
        (None, True, False),  # a --once drain (from cron) leaves the default port alone
        ("127.0.0.1:0", True, True),  # unless an address is set
        ("off", False, False),
        ("off", True, False),
    ],
)
def test_when_the_endpoint_is_served(address: str | None, once: bool, served: bool) -> None:
    """Served by default in the daemon, only on request in --once, never when "off"."""
    assert wanted(Settings(metrics_address=address), once=once) is served


def test_off_is_a_valid_setting(tmp_path: Path) -> None:
    """metrics_address = "off" loads from the config file; other words are still refused."""
    path = tmp_path / "config.toml"
    path.write_text('metrics_address = "off"\n', encoding="utf-8")
    assert config.load({"CVM_BACKUP_CONFIG": str(path)}).metrics_address == "off"
    path.write_text('metrics_address = "none"\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r'metrics_address: must be host:port .*or "off"'):
        config.load({"CVM_BACKUP_CONFIG": str(path)})


def _listener() -> socket.socket:
    """A socket that binds as aiohttp's server does: SO_REUSEADDR, so TIME_WAIT is no obstacle."""
    made = socket.socket()
    made.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return made


async def _logged(capture: LogCapture, event: str) -> bool:
    return event in capture.events()
