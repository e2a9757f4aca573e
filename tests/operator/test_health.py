"""/healthz, /readyz and /metrics answers, with the database up, down and behind on migrations."""

from __future__ import annotations

from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from orchestrator.config import Settings
from orchestrator.db import pool as db_pool
from orchestrator.errors import UsageError
from orchestrator.health import parse_address, serve_health
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
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
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


async def test_address_in_use(pg_pool: asyncpg.Pool) -> None:
    """A metrics_address already taken is a usage error naming it, not a traceback."""
    async with serve_health(pg_pool, LOCAL) as url:
        taken = Settings(metrics_address=url.removeprefix("http://"))
        with pytest.raises(UsageError, match=r"metrics_address 127\.0\.0\.1:\d+: cannot listen"):
            async with serve_health(pg_pool, taken):
                pass
