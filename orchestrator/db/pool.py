"""Connections: resolve the DSN (configured or embedded) and open pools with our codecs.

Every connection gets JSON codecs for `json` and `jsonb`: pass Python dicts and lists as
parameters and get them back as Python objects (not JSON strings).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg

from orchestrator.config import Settings
from orchestrator.db import embedded
from orchestrator.db.dsn import problem, redact, redact_text
from orchestrator.errors import UsageError

CONNECT_TIMEOUT = 10.0
# Failures whose messages say what went wrong on the network or the server (host, port, user,
# database; never the password): shown, scrubbed all the same.
_REACHABILITY_ERRORS = (TimeoutError, OSError, asyncpg.PostgresError)

T = TypeVar("T")

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # What query functions accept: a plain connection or one acquired from a pool.
    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]


class DatabaseUnavailable(UsageError):
    """The database cannot be reached; the message names the (redacted) DSN."""


class DatabaseMisconfigured(UsageError):
    """The DSN cannot be used as written (not transient: retrying will not help)."""


def resolve_dsn(settings: Settings, *, create: bool = False) -> str:
    """The configured DSN, else the embedded server's (started on demand; blocking).

    Only `create=True` (migrate) may initdb a new embedded database; without it a home with
    none is refused (embedded.NoDatabase, exit 2), so a read-only command creates nothing.
    """
    if settings.database_url:
        return settings.database_url
    return embedded.dsn(settings.home, create=create)


async def init_connection(conn: asyncpg.Connection) -> None:
    """Per-connection setup shared by pools, single connections and test fixtures."""
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


class PoolConnection(asyncpg.Connection):
    """A pooled connection whose release skips the reset round trip unless it needs one.

    asyncpg resets every connection it takes back (unlock advisory locks, UNLISTEN, RESET ALL):
    a statement and a commit per checkout, on every job's writes. Our pooled connections keep no
    session state except a LISTEN (flagged here) and rotation's advisory lock (flagged by
    `keeps_session_state`); only those pay for the reset. An open transaction is always rolled
    back by asyncpg itself, reset query or not.
    """

    __slots__ = ("_session_state",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session_state = False

    def keeps_session_state(self) -> None:
        """This connection now holds session state (an advisory lock): reset it on release."""
        self._session_state = True

    async def add_listener(self, channel: str, callback: Any) -> None:
        """LISTEN, remembering that a reset (UNLISTEN) is due on release."""
        self._session_state = True
        await super().add_listener(channel, callback)

    def get_reset_query(self) -> str:
        """The full reset after session state was kept, else none at all."""
        return str(super().get_reset_query()) if self._session_state else ""

    async def reset(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 (asyncpg API)
        """Reset as asyncpg does; the connection is clean again afterwards."""
        await super().reset(timeout=timeout)
        self._session_state = False


def keeps_session_state(conn: Any) -> None:
    """Flag a pooled connection (or its proxy) as holding session state; others: no-op."""
    flag = getattr(conn, "keeps_session_state", None)
    if flag is not None:
        flag()


def _failure(dsn: str, exc: Exception) -> UsageError:
    where = redact(dsn)
    if isinstance(exc, _REACHABILITY_ERRORS):
        return DatabaseUnavailable(
            f"database {where} is unreachable: {redact_text(str(exc), dsn=dsn)}"
        )
    # asyncpg's parse errors (ValueError, IndexError, ...) quote the DSN piece they choked on,
    # which may be part of the password: only the type is shown.
    return DatabaseMisconfigured(
        f"database {where}: asyncpg refused the DSN or its settings ({type(exc).__name__}; "
        "its message is not shown: it may quote the password)"
    )


async def _open(dsn: str, opener: Callable[[], Awaitable[T]]) -> T:
    """`opener()` (a connect or a pool), every failure turned into one of our errors.

    The error is raised outside the `except` block so it carries no `__context__`: the original
    exception, message and all, never reaches a traceback.
    """
    reason = problem(dsn)
    if reason is not None:
        raise DatabaseMisconfigured(f"database {redact(dsn)} {reason}")
    try:
        return await opener()
    except Exception as exc:  # noqa: BLE001 - every message may quote the DSN
        failure = _failure(dsn, exc)
    raise failure


async def connect_dsn(dsn: str) -> asyncpg.Connection:
    """One connection with our codecs; unreachable -> DatabaseUnavailable, bad DSN ->
    DatabaseMisconfigured (neither ever quoting the password)."""
    conn = await _open(dsn, lambda: asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT))
    await init_connection(conn)
    return conn


async def connect(settings: Settings, *, create: bool = False) -> asyncpg.Connection:
    """One connection (for migrations, LISTEN, one-shot commands); `create` as for resolve_dsn."""
    dsn = await asyncio.to_thread(lambda: resolve_dsn(settings, create=create))
    return await connect_dsn(dsn)


async def create_pool_dsn(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool with our codecs; failures as for `connect_dsn`."""
    pool: Any = await _open(
        dsn,
        lambda: asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=init_connection,
            timeout=CONNECT_TIMEOUT,
            connection_class=PoolConnection,
        ),
    )
    return pool  # type: ignore[no-any-return]


async def connect_pool(
    settings: Settings, *, min_size: int = 1, max_size: int = 10
) -> asyncpg.Pool:
    """A pool on the configured database, or on the embedded one when no DSN is set."""
    dsn = await asyncio.to_thread(resolve_dsn, settings)
    return await create_pool_dsn(dsn, min_size=min_size, max_size=max_size)
