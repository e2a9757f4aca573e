"""The operator endpoint: /healthz, /readyz and Prometheus /metrics, on loopback by default.

- `/healthz` answers 200 while the process serves HTTP at all (liveness: restart me if not).
- `/readyz` answers 200 only when the database is reachable, its schema is exactly current and
  the daemon says its loops run; otherwise 503 with a JSON reason (take me out of rotation).
- `/metrics` re-reads the database numbers, then renders every metric (see `metrics.py`).

Served by default, on `DEFAULT_ADDRESS` (loopback), unless `metrics_address` names another
address or is "off": the endpoint has no authentication, and job and policy names are nobody
else's business. A `run --once` drain serves only an address set explicitly, so a cron job does
not contend with the daemon for the default port.

A port already taken (another replica on the same host, say) is logged as `health.port_in_use`
and tried again every `BIND_RETRY` seconds; it never stops the daemon. The replica that holds
the port serves its own numbers, so replicas sharing a host want a `metrics_address` each.

Why 8739: Prometheus' default port allocations (its wiki) fill 9100-9999 (9108, the previous
default here, is graphite_exporter's metrics port) and go on past 10000, and Prometheus' guide
to writing exporters recommends ports outside that range for internal applications. 8739 is
also below Linux's ephemeral range (32768-60999), so no outgoing connection holds it by chance.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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
from orchestrator.metrics import CONTENT_TYPE, DATABASE_ERRORS, Held, Metrics

DEFAULT_ADDRESS = "127.0.0.1:8739"
OFF = "off"
# How often a taken port is tried again: a replica that left frees it for the next one.
BIND_RETRY = 30.0
# A readiness probe must answer within the prober's timeout (usually a few seconds) even when
# Postgres hangs: past this the database counts as unreachable.
READY_TIMEOUT = 3.0
# The quota changes by support ticket, not by the minute; each read is one API call per region.
QUOTA_INTERVAL = 300.0

Readiness = Callable[[], bool]

log = logs.get("health")


def _always() -> bool:
    return True


class PortInUse(OSError):
    """The address is already bound by another process."""


def wanted(settings: Settings, *, once: bool) -> bool:
    """Whether to serve: always unless "off"; a --once drain only at an address set explicitly."""
    if settings.metrics_address == OFF:
        return False
    return settings.metrics_address is not None or not once


def address_of(settings: Settings) -> str:
    """The address to listen on: `metrics_address`, else the default."""
    return settings.metrics_address or DEFAULT_ADDRESS


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
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(exc.errno, f"{host}:{port} is already in use") from None
        # Address not local, port not ours to bind: a config problem to name, not a crash.
        raise UsageError(f"config: metrics_address {host}:{port}: cannot listen: {exc}") from None


@asynccontextmanager
async def serve_health(
    source: EngineContext | asyncpg.Pool,
    settings: Settings,
    readiness: Readiness = _always,
    *,
    metrics: Metrics | None = None,
    quota_interval: float = QUOTA_INTERVAL,
    held: Held | None = None,
) -> AsyncIterator[str]:
    """Serve the endpoint for the block; yields its base URL (`http://127.0.0.1:PORT`).

    Given an EngineContext, its clients' API calls and limiters are counted and the image quota
    is read every `quota_interval` seconds; given a bare pool, only database metrics are served.
    `held` limits the database numbers to the accounts this process drives. Raises PortInUse
    when the address is taken.
    """
    metrics = metrics or Metrics()
    ctx = source if isinstance(source, EngineContext) else None
    async with (
        _watched(ctx, metrics, quota_interval, held),
        _listening(source, settings, readiness, metrics) as url,
    ):
        log.info("health.serving", url=url)
        yield url


@asynccontextmanager
async def _listening(
    source: EngineContext | asyncpg.Pool,
    settings: Settings,
    readiness: Readiness,
    metrics: Metrics,
) -> AsyncIterator[str]:
    pool = source.pool if isinstance(source, EngineContext) else source
    host, port = parse_address(address_of(settings))
    runner = web.AppRunner(
        build_app(pool, metrics, readiness), access_log=None, handle_signals=False
    )
    await runner.setup()
    try:
        await _listen(runner, host, port)
        # Finished jobs count from here, not from the first scrape.
        await metrics.start(pool)
        yield _url(host, runner.addresses[0][1])
    finally:
        await runner.cleanup()


@asynccontextmanager
async def _watched(
    ctx: EngineContext | None, metrics: Metrics, quota_interval: float, held: Held | None
) -> AsyncIterator[None]:
    """Count the context's API calls and read its quota while the block runs."""
    metrics.held = held
    if ctx is None:
        yield
        return
    metrics.accounts = tuple(sorted(ctx.clients))
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
    held: Held | None = None,
    retry: float = BIND_RETRY,
) -> None:
    """Serve until `stop` is set: the form the daemon supervises like its other loops.

    A taken port is logged once and tried again every `retry` seconds, never fatal.
    """
    metrics = metrics or Metrics()
    ctx = source if isinstance(source, EngineContext) else None
    # API calls count from the start, whether or not the port is free yet.
    async with _watched(ctx, metrics, QUOTA_INTERVAL, held):
        logged = False
        while not stop.is_set():
            try:
                async with _listening(source, settings, readiness, metrics) as url:
                    log.info("health.serving", url=url)
                    await stop.wait()
                    return
            except PortInUse:
                if not logged:
                    _log_port_in_use(address_of(settings), retry)
                    logged = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=retry)


def _log_port_in_use(address: str, retry: float) -> None:
    log.warning(
        "health.port_in_use",
        address=address,
        retry_in=retry,
        hint="another process (a replica on this host?) serves it: give each replica its own"
        ' metrics_address, or "off"; this daemon runs on and takes the port when it frees',
    )
