"""Riding out database outages: which errors mean "Postgres is away", and a per-loop watch.

A Postgres restart shows up in several guises: queries cut off mid-flight (AdminShutdown,
ConnectionDoesNotExist), a pool handing out a connection that just died ("connection is closed"),
refused sockets while the server is down, and "the database system is starting up" while it comes
back. All of them are transient for a daemon: nothing it wrote is lost (every write is one
transaction), and work whose outcome could not be recorded stays claimed until its lease lapses,
after which it is reclaimed and resolved by name (docs/design.md#invariants, 1 and 6). So each loop
waits the outage out with `DbWatch` instead of dying; every other error still propagates and stops
the daemon, as a bug should.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

import asyncpg

from orchestrator import logs, waits
from orchestrator.db.pool import DatabaseUnavailable

log = logs.get("db")

FIRST_DELAY = 0.5
MAX_DELAY = 5.0

# The server went away or is not accepting connections yet; asyncpg.InterfaceError is checked
# separately (most of its instances are usage errors, i.e. bugs).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # ConnectionDoesNotExist, ConnectionFailure, ...
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.AdminShutdownError,  # fast/smart shutdown cut the query off
    asyncpg.CrashShutdownError,
    # A session terminated mid-query sometimes surfaces as "cannot switch to state N; another
    # operation is in progress" (MagicStack/asyncpg#1069); the pool's reset then drops it.
    asyncpg.InternalClientError,
    DatabaseUnavailable,  # our own wrapper around a refused connect
    OSError,  # refused, reset or broken sockets (ConnectionError is a subclass)
    TimeoutError,  # connecting timed out
)
_CLOSED_HINTS = ("connection is closed", "connection was closed", "pool is closing")
# Any failed statement as well as a lost connection: what a step that may fail on its own (one
# tracker tick, a clean-up on the way out) catches and logs; a bug in our code still propagates.
DB_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    *CONNECTION_ERRORS,
)


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` means the database is unreachable (transient), not a bug or bad data."""
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    return isinstance(exc, asyncpg.InterfaceError) and any(
        hint in str(exc) for hint in _CLOSED_HINTS
    )


class DbWatch:
    """One loop's view of the database: `async with watch:` around each database step.

    A connection error inside the block is logged (`db.unavailable`, once per outage),
    suppressed, and followed by a backoff pause (`first` doubling to `cap`, cut short by
    `stop`); the first clean block afterwards logs `db.reconnected`. Other errors propagate.
    """

    def __init__(
        self,
        task: str,
        stop: asyncio.Event | None = None,
        *,
        first: float = FIRST_DELAY,
        cap: float = MAX_DELAY,
    ) -> None:
        self.task = task
        self.stop = stop
        self.first = first
        self.cap = cap
        self.failures = 0  # consecutive failed blocks; 0 while the database answers
        self.outages = 0  # outages seen by this loop (observability and tests)

    @property
    def down(self) -> bool:
        """Whether the last block failed on the connection."""
        return self.failures > 0

    def delay(self) -> float:
        """The pause after the current run of failures."""
        if self.failures == 0:
            return 0.0
        return min(self.cap, self.first * float(2 ** (self.failures - 1)))

    def ok(self) -> None:
        """The database answered: end the outage, if there was one."""
        if self.failures:
            log.info("db.reconnected", task=self.task, failures=self.failures)
            self.failures = 0

    def failed(self, exc: BaseException) -> None:
        """Count one failed step; the first of an outage is logged."""
        self.failures += 1
        if self.failures == 1:
            self.outages += 1
            log.warning("db.unavailable", task=self.task, error=repr(exc))

    async def pause(self) -> None:
        """Wait out the backoff delay, or until `stop` is set."""
        seconds = self.delay()
        if seconds <= 0:
            return
        if self.stop is None:
            await asyncio.sleep(seconds)
            return
        await waits.pause(self.stop, seconds)

    async def __aenter__(self) -> DbWatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            self.ok()
            return False
        if not isinstance(exc, Exception) or not is_connection_error(exc):
            return False  # cancellation, bugs: not ours to swallow
        self.failed(exc)
        await self.pause()
        return True
