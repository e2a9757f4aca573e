"""The operator endpoint: /healthz, /readyz and Prometheus /metrics, on loopback by default.

- `/healthz` answers 200 while the process serves HTTP at all (liveness: restart me if not).
- `/readyz` answers 200 only when the database is reachable, its schema is exactly current and
  the daemon says its loops run; otherwise 503 with a JSON reason (take me out of rotation).
- `/metrics` re-reads the database numbers, then renders every metric (see `metrics.py`).

Bound to 127.0.0.1 unless `metrics_address` says otherwise: the endpoint has no
authentication, and job and policy names are nobody else's business.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

from orchestrator import logs
from orchestrator.config import Settings
from orchestrator.context import EngineContext
from orchestrator.db import migrate
from orchestrator.errors import UsageError
from orchestrator.metrics import CONTENT_TYPE, DATABASE_ERRORS, Metrics

DEFAULT_ADDRESS = "127.0.0.1:9108"
# A readiness probe must answer within the prober's timeout (usually a few seconds) even when
# Postgres hangs: past this the database counts as unreachable.
READY_TIMEOUT = 3.0
# The quota changes by support ticket, not by the minute; each read is one API call per region.
QUOTA_INTERVAL = 300.0

Readiness = Callable[[], bool]

log = logs.get("health")


def _always() -> bool:
    return True


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) -> (host, port); a bad value is a UsageError."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise UsageError(f"config: metrics_address must be host:port, not {address!r}")
    return host, int(port)


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the process is ready, and why not."""

    ready: bool
    reason: str = "ready"


async def _schema(pool: asyncpg.Pool) -> migrate.SchemaStatus:
    conn: Any
    async with pool.acquire() as conn:  # a pool proxy: asyncpg's stubs want a Connection
        return await migrate.schema_status(conn)


async def check_ready(pool: asyncpg.Pool, readiness: Readiness) -> Verdict:
    """Database reachable, schema current, daemon loops running: in that order."""
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            status = await _schema(pool)
    except TimeoutError:
        # Also what a pool with every connection busy looks like: name the wait, not a cause.
        return Verdict(False, f"database did not answer within {READY_TIMEOUT} s")
    except DATABASE_ERRORS as exc:
        return Verdict(False, f"database unreachable: {type(exc).__name__}: {exc}")
    if not status.current:
        return Verdict(False, status.describe())
    if not readiness():
        return Verdict(False, "daemon loops are not running")
    return Verdict(True)


class _Handlers:
    """The three routes over one pool, one Metrics and the daemon's readiness callback."""

    def __init__(self, pool: asyncpg.Pool, metrics: Metrics, readiness: Readiness) -> None:
        self.pool, self.metrics, self.readiness = pool, metrics, readiness
        # Scrapes refresh a shared snapshot: one at a time so a render never mixes two reads.
        self._scrape = asyncio.Lock()

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(self, _: web.Request) -> web.Response:
        verdict = await check_ready(self.pool, self.readiness)
        body = {"ready": verdict.ready, "reason": verdict.reason}
        return web.json_response(body, status=200 if verdict.ready else 503)

    async def metrics_(self, _: web.Request) -> web.Response:
        async with self._scrape:
            await self.metrics.refresh(self.pool)
            body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def build_app(
    pool: asyncpg.Pool, metrics: Metrics, readiness: Readiness = _always
) -> web.Application:
    """The aiohttp application serving /healthz, /readyz and /metrics."""
    handlers = _Handlers(pool, metrics, readiness)
    app = web.Application()
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics_)
    return app


async def _refresh_quota(ctx: EngineContext, metrics: Metrics, interval: float) -> None:
    """Read the quota now and then every `interval` seconds; a failed read waits for the next."""
    while True:
        try:
            await metrics.refresh_quota(ctx)
        except DATABASE_ERRORS as exc:
            log.warning("metrics.quota_failed", error=str(exc))
        await asyncio.sleep(interval)


async def _listen(runner: web.AppRunner, host: str, port: int) -> None:
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        # Port taken or address not local: a config problem to name, not a crash to debug.
        raise UsageError(f"config: metrics_address {host}:{port}: cannot listen: {exc}") from None


@asynccontextmanager
async def serve_health(
    source: EngineContext | asyncpg.Pool,
    settings: Settings,
    readiness: Readiness = _always,
    *,
    metrics: Metrics | None = None,
    quota_interval: float = QUOTA_INTERVAL,
) -> AsyncIterator[str]:
    """Serve the endpoint for the block; yields its base URL (`http://127.0.0.1:PORT`).

    Given an EngineContext, its clients' API calls and limiters are counted and the image quota
    is read every `quota_interval` seconds; given a bare pool, only database metrics are served.
    """
    metrics = metrics or Metrics()
    ctx = source if isinstance(source, EngineContext) else None
    pool = source.pool if isinstance(source, EngineContext) else source
    host, port = parse_address(settings.metrics_address or DEFAULT_ADDRESS)
    runner = web.AppRunner(
        build_app(pool, metrics, readiness), access_log=None, handle_signals=False
    )
    await runner.setup()
    try:
        await _listen(runner, host, port)
        url = _url(host, runner.addresses[0][1])
        async with _watched(ctx, metrics, quota_interval):
            log.info("health.serving", url=url)
            yield url
    finally:
        await runner.cleanup()


@asynccontextmanager
async def _watched(
    ctx: EngineContext | None, metrics: Metrics, quota_interval: float
) -> AsyncIterator[None]:
    """Count the context's API calls and read its quota while the block runs."""
    if ctx is None:
        yield
        return
    for client in ctx.clients.values():
        metrics.watch_client(client)
    quota = asyncio.create_task(_refresh_quota(ctx, metrics, quota_interval), name="quota")
    try:
        yield
    finally:
        quota.cancel()
        await asyncio.gather(quota, return_exceptions=True)
        for client in ctx.clients.values():
            metrics.unwatch_client(client)


async def run(
    source: EngineContext | asyncpg.Pool,
    settings: Settings,
    readiness: Readiness,
    stop: asyncio.Event,
    *,
    metrics: Metrics | None = None,
) -> None:
    """Serve until `stop` is set: the form the daemon supervises like its other loops."""
    async with serve_health(source, settings, readiness, metrics=metrics):
        await stop.wait()
