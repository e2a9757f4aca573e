"""What every scenario shares: a simulator, a fresh database, and a daemon driven to the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from orchestrator.bench.daemon import Daemon, DaemonConfig
from orchestrator.bench.database import BenchDatabase
from orchestrator.bench.options import Options
from orchestrator.bench.records import drained
from orchestrator.bench.simside import Arrivals, Fleet, serve
from orchestrator.db.pool import create_pool_dsn
from orchestrator.simulator.runner import Simulator

_DRAIN_POLL = 0.1


class BenchError(RuntimeError):
    """A scenario could not be measured (the daemon died, or never finished)."""


@dataclass(frozen=True, slots=True)
class Env:
    """The run-wide parts: options, the Postgres server, a directory for daemon files."""

    options: Options
    database: BenchDatabase
    workdir: Path


@dataclass(frozen=True, slots=True)
class Stage:
    """One scenario's simulator, its arrival log, and a database with a small pool on it."""

    sim: Simulator
    arrivals: Arrivals
    dsn: str
    pool: asyncpg.Pool


@asynccontextmanager
async def stage(env: Env, fleet: Fleet) -> AsyncIterator[Stage]:
    """A simulator serving `fleet` and a fresh migrated database, both gone on exit."""
    async with serve(fleet) as (sim, arrivals), env.database.fresh() as dsn:
        pool = await create_pool_dsn(dsn, min_size=1, max_size=2)
        try:
            yield Stage(sim, arrivals, dsn, pool)
        finally:
            await pool.close()


def daemon_config(options: Options, limits: Mapping[str, int] | None = None) -> DaemonConfig:
    """The daemon's settings: product defaults, except what the options (and `limits`) set."""
    return DaemonConfig(
        settings=options.daemon_settings, limits=limits or {}, retry=options.daemon_retry
    )


def daemon_for(env: Env, st: Stage, name: str, config: DaemonConfig) -> Daemon:
    """A (not yet started) daemon on this stage's database and simulator."""
    return Daemon(env.workdir, name, st.dsn, st.sim.url, config)


async def drive(daemon: Daemon, st: Stage, within: float) -> int:
    """Start `run`, wait until the run is drained, stop it gracefully; the exit code."""
    await daemon.start(once=False)
    try:
        finished = await _until_drained(daemon, st, within)
    finally:
        code = await daemon.stop()
    if not finished:
        raise BenchError(f"the daemon did not drain within {within:.0f} s:\n{daemon.tail()}")
    return code


async def _until_drained(daemon: Daemon, st: Stage, within: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if not daemon.running:
            raise BenchError(f"the daemon exited early:\n{daemon.tail()}")
        if await drained(st.pool):
            return True
        await asyncio.sleep(_DRAIN_POLL)
    return False
