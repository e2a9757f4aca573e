"""Group writes: what concurrent tasks submit meanwhile goes to Postgres as one statement.

Every job writes twice around its CreateImage call (its name before, its image after). One
statement each costs a round trip, a pool checkout with its reset, and a commit, which bounds
the engine long before the API does once its limits are lifted. A `GroupWriter` keeps at most
one flush in flight: items submitted while it runs wait and go together in the next one, so a
lone write goes out at once and batches grow only with load, as in Postgres' own group commit.

A batch that fails on its data (a CHECK violation in one row, say) is written again item by
item, so only the bad item's caller sees the error; a lost connection or a cancellation fails
the whole batch at once, since writing each alone would only fail the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Generic, TypeVar

from orchestrator.db.resilience import is_connection_error

T = TypeVar("T")

# Bounds one statement's arrays; the dispatcher's in-flight limit keeps batches far smaller.
MAX_BATCH = 500

Flush = Callable[[Sequence[T]], Awaitable[Collection[int]]]


class GroupWriter(Generic[T]):
    """Submit items keyed by an id; `flush` writes a batch and returns the ids it applied.

    `flush` must apply all of a batch or nothing (one statement, or one transaction): a batch
    that failed on its data is written again item by item.
    """

    def __init__(self, flush: Flush[T], key: Callable[[T], int], max_batch: int = MAX_BATCH):
        self._flush = flush
        self._key = key
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[bool]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> bool:
        """Write `item` with whatever else is pending; whether the flush applied it."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        # A cancelled caller no longer awaits its future: its failure must not go unretrieved.
        future.add_done_callback(_retrieve)
        self._queue.append((item, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name="group-writer")
        # Shielded: a caller cancelled mid-write must not cancel the batch of the others.
        return await asyncio.shield(future)

    async def aclose(self) -> None:
        """Wait for the writes already submitted (shutdown)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._write(batch)
        except asyncio.CancelledError as exc:
            # The loop is going away: nobody will flush what is still queued.
            for _, future in self._queue:
                _settle(future, exc)
            self._queue.clear()
            raise
        finally:
            self._task = None

    async def _write(self, batch: list[tuple[T, asyncio.Future[bool]]]) -> None:
        try:
            applied = await self._flush([item for item, _ in batch])
        except BaseException as exc:
            if len(batch) > 1 and _about_data(exc):
                # One bad record must fail its own write, not the others' it shared a statement
                # with (the statement applied nothing, so each is written once).
                await self._write_each(batch)
                return
            # Each waiter sees the failure as its own write's (a database blip, say).
            for _, future in batch:
                _settle(future, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for item, future in batch:
            if not future.done():
                future.set_result(self._key(item) in applied)

    async def _write_each(self, batch: list[tuple[T, asyncio.Future[bool]]]) -> None:
        for n, one in enumerate(batch):
            try:
                await self._write([one])
            except BaseException as exc:
                # Cancelled half-way: the rest are no longer queued, so `_drain` cannot see them.
                for _, future in batch[n + 1 :]:
                    _settle(future, exc)
                raise


def _about_data(exc: BaseException) -> bool:
    """Whether `exc` may be about some item of the batch: not a cancellation, not the link."""
    return isinstance(exc, Exception) and not is_connection_error(exc)


def _retrieve(future: asyncio.Future[bool]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[bool], exc: BaseException) -> None:
    if future.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)
