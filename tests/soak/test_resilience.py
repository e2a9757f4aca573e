"""DbWatch and the connection-error test: what a loop survives, what still stops it."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from orchestrator.daemon import engine_context
from orchestrator.db import pool
from orchestrator.db.pool import DatabaseUnavailable
from orchestrator.db.resilience import CONNECTION_ERRORS, DbWatch, is_connection_error
from orchestrator.dispatcher import Dispatcher
from orchestrator.simulator.runner import Simulator
from tests.fixtures.engine import fast_settings
from tests.fixtures.logs import LogCapture
from tests.fixtures.own_pg import OwnPostgres

OUTAGE = (*CONNECTION_ERRORS, asyncpg.InterfaceError)
TRANSIENT = [
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.InterfaceError("cannot call Connection.fetch(): connection is closed"),
    ConnectionRefusedError(111, "Connection refused"),
    DatabaseUnavailable("database postgresql://x@h/db is unreachable"),
    TimeoutError(),
    asyncpg.InternalClientError("cannot switch to state 11; another operation (2) is in progress"),
]
BUGS = [
    asyncpg.UniqueViolationError("duplicate key value violates unique constraint"),
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    asyncpg.UndefinedColumnError('column "nope" does not exist'),
    ValueError("bad data"),
]


@pytest.mark.parametrize("exc", TRANSIENT, ids=lambda e: type(e).__name__)
def test_connection_level_errors_are_transient(exc: BaseException) -> None:
    """A server restart in each of its guises counts as the database being away."""
    assert is_connection_error(exc)


@pytest.mark.parametrize("exc", BUGS, ids=lambda e: type(e).__name__)
def test_other_errors_are_not_transient(exc: BaseException) -> None:
    """Bad SQL, constraint violations and misuse are bugs, not outages."""
    assert not is_connection_error(exc)


def test_backoff_doubles_from_half_a_second_to_five() -> None:
    """The pause after each consecutive failure: 0.5, 1, 2, 4, then capped at 5."""
    watch = DbWatch("t")
    delays = []
    for _ in range(6):
        watch.failed(ConnectionResetError())
        delays.append(watch.delay())
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    watch.ok()
    assert watch.delay() == 0.0


async def test_an_outage_is_logged_once_and_its_end_once(captured_logs: LogCapture) -> None:
    """Three failed steps then a clean one: one db.unavailable, one db.reconnected."""
    watch = DbWatch("loop", first=0.001, cap=0.002)
    for _ in range(3):
        async with watch:
            raise asyncpg.CannotConnectNowError("the database system is starting up")
    async with watch:
        pass
    async with watch:
        pass
    events = [e for e in captured_logs.events() if e.startswith("db.")]
    assert events == ["db.unavailable", "db.reconnected"]
    line = next(x for x in captured_logs.lines if x["event"] == "db.reconnected")
    assert (line["task"], line["failures"]) == ("loop", 3)
    assert watch.outages == 1


async def test_other_errors_propagate() -> None:
    """A bug inside the block is not swallowed: the supervised loop dies as before."""
    watch = DbWatch("loop", first=0.001)
    with pytest.raises(asyncpg.UniqueViolationError):
        async with watch:
            raise asyncpg.UniqueViolationError("duplicate key")
    assert not watch.down


async def test_backoff_pause_ends_when_stop_is_set() -> None:
    """A stopping daemon does not sit out the backoff."""
    stop = asyncio.Event()
    watch = DbWatch("loop", stop, first=60.0, cap=60.0)
    stop.set()
    async with asyncio.timeout(5):
        async with watch:
            raise ConnectionResetError()
    assert watch.down


async def test_a_loop_rides_out_a_real_restart(own_postgres: OwnPostgres) -> None:
    """A query loop on a pool keeps going through a Postgres stop and start."""
    db = await asyncpg.create_pool(own_postgres.dsn, min_size=1, max_size=2)
    stop = asyncio.Event()
    watch = DbWatch("probe", stop, first=0.05, cap=0.2)
    answers = 0

    async def probe() -> None:
        nonlocal answers
        while not stop.is_set():
            async with watch:
                answers += int(await db.fetchval("SELECT 1"))
            await asyncio.sleep(0.01)

    task = asyncio.create_task(probe())
    try:
        await own_postgres.restart(down_for=0.5)
        before = answers
        async with asyncio.timeout(20):
            while answers <= before + 3 or watch.down:  # noqa: ASYNC110 - polls a counter
                await asyncio.sleep(0.05)
        assert watch.outages >= 1
    finally:
        stop.set()
        await task
        await db.close()


async def test_failed_claims_give_their_slots_back(
    own_postgres: OwnPostgres, sim_env: Simulator
) -> None:
    """Claims failing while Postgres is down do not eat the in-flight slots for good."""
    settings = fast_settings(own_postgres.dsn, sim_env.url, max_in_flight=2)
    db = await pool.create_pool_dsn(own_postgres.dsn, min_size=0, max_size=2)
    try:
        async with engine_context(settings, db) as ctx:
            dispatcher = Dispatcher(ctx)
            await asyncio.to_thread(own_postgres.stop)
            # More failed claims than slots: a leak would block the third one forever.
            for _ in range(settings.max_in_flight + 2):
                async with asyncio.timeout(15):
                    with pytest.raises(OUTAGE) as failed:
                        await dispatcher.dispatch_once(asyncio.Event())
                assert is_connection_error(failed.value), repr(failed.value)
            await asyncio.to_thread(own_postgres.start)
            async with asyncio.timeout(15):
                assert await dispatcher.dispatch_once(asyncio.Event()) == 0
    finally:
        await db.close()
