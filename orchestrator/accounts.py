"""Account leases: which replica drives each account's API traffic (docs/accounts.md, replicas).

Each account is leased with a Postgres session-level advisory lock held on a connection of its
own, outside the pool: the pool's reset would unlock it, and a pooled connection may be closed
at any time. When the holding process dies, Postgres closes its session and the lock frees at
once, so another replica takes the account over on its next try (every `interval` seconds).
Only the holder calls the account's API, so one limiter per account holds across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable

import asyncpg

from orchestrator import logs
from orchestrator.db.resilience import CONNECTION_ERRORS

log = logs.get("accounts")

# Two-key advisory locks: (namespace, hashtext(key)); distinct from rotation's and migrate's.
LOCK_NAMESPACE = 0x43564241  # "CVBA"
KEY_PREFIX = "cvm-backup:account:"
TRY_INTERVAL = 1.0
# A probe that hangs this long counts as a lost session: better to stop driving the accounts.
PROBE_TIMEOUT = 3.0
# Any sign the lock session is gone: then the locks are gone too. InterfaceError counts here in
# every form, since the lock connection is ours alone and is rebuilt on the next round.
_CONNECTION_LOST: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.InterfaceError)

Connect = Callable[[], Awaitable[asyncpg.Connection]]
OnChange = Callable[[str, bool], None]


def lock_key(account: str) -> str:
    """The text hashed into the advisory lock of `account`."""
    return KEY_PREFIX + account


class AccountLeases:
    """Holds the advisory-lock leases of the accounts it can; `held()` is the current set."""

    def __init__(
        self,
        accounts: Iterable[str],
        connect: Connect,
        *,
        interval: float = TRY_INTERVAL,
        on_change: OnChange | None = None,
    ) -> None:
        self.accounts = tuple(sorted(set(accounts)))
        self._connect = connect
        self._interval = interval
        self._on_change = on_change
        self._held: set[str] = set()
        self._conn: asyncpg.Connection | None = None

    def held(self) -> frozenset[str]:
        """The accounts this replica holds right now."""
        return frozenset(self._held)

    async def run(self, stop: asyncio.Event) -> None:
        """Try for unheld accounts every interval until `stop`; then release everything."""
        try:
            while not stop.is_set():
                await self.try_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._interval)
        finally:
            await self.close()

    async def try_once(self) -> None:
        """One round: check the lock connection, then try each account not held."""
        try:
            conn = await self._connection()
            # A probe even when everything is held: a dead session means the locks are gone.
            await conn.fetchval("SELECT 1", timeout=PROBE_TIMEOUT)
            for account in self.accounts:
                if account not in self._held and await self._try_lock(conn, account):
                    self._gain(account)
        except _CONNECTION_LOST as exc:
            log.warning("account.lease_db_error", error=str(exc))
            self._lose_all("lock connection lost")
            await self._discard()

    async def close(self) -> None:
        """Give every lease up by closing the lock session."""
        self._lose_all("stopped")
        await self._discard()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            if self._held:
                self._lose_all("lock connection closed")
            self._conn = await self._connect()
        return self._conn

    async def _try_lock(self, conn: asyncpg.Connection, account: str) -> bool:
        got = await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2))",
            LOCK_NAMESPACE,
            lock_key(account),
            timeout=PROBE_TIMEOUT,
        )
        return bool(got)

    def _gain(self, account: str) -> None:
        self._held.add(account)
        log.info("account.lease_acquired", account=account)
        if self._on_change is not None:
            self._on_change(account, True)

    def _lose_all(self, reason: str) -> None:
        for account in sorted(self._held):
            self._held.discard(account)
            log.warning("account.lease_lost", account=account, reason=reason)
            if self._on_change is not None:
                self._on_change(account, False)

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(*_CONNECTION_LOST, asyncpg.PostgresError):
                await asyncio.wait_for(conn.close(), timeout=2.0)
        if conn is not None and not conn.is_closed():
            conn.terminate()
