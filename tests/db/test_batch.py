"""GroupWriter: concurrent writes go out together, one flush in flight, failures stay scoped."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence

import asyncpg
import pytest

from orchestrator.db.batch import GroupWriter


class Recorder:
    """A flush that records its batches and applies even ids only, after `gate` opens.

    Like one statement, it applies nothing when it fails: `fail` always, or `bad_error` (a CHECK
    violation) when the batch holds one of the `bad` ids.
    """

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: BaseException | None = None
        self.bad: set[int] = set()
        self.bad_error: BaseException = asyncpg.CheckViolationError("violates check constraint")
        self.stall: set[int] = set()  # written alone, these never finish
        self.stalled = asyncio.Event()

    async def flush(self, items: Sequence[int]) -> Collection[int]:
        self.batches.append(list(items))
        await self.gate.wait()
        if len(items) == 1 and items[0] in self.stall:
            self.stalled.set()
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail
        if self.bad.intersection(items):
            raise self.bad_error
        return {i for i in items if i % 2 == 0}


async def test_lone_write_goes_out_alone_and_reports_whether_applied() -> None:
    """A single submission is flushed at once; the result says whether it was applied."""
    rec = Recorder()
    writer = GroupWriter(rec.flush, key=int)
    assert await writer.submit(2) is True
    assert await writer.submit(3) is False
    assert rec.batches == [[2], [3]]


async def test_writes_submitted_during_a_flush_go_together_next() -> None:
    """While one flush runs, later submissions queue and share the next statement."""
    rec = Recorder()
    rec.gate.clear()
    writer = GroupWriter(rec.flush, key=int)
    first = asyncio.create_task(writer.submit(0))
    await asyncio.sleep(0)
    others = [asyncio.create_task(writer.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0)
    rec.gate.set()
    results = await asyncio.gather(first, *others)
    assert rec.batches == [[0], [1, 2, 3, 4, 5]]
    assert results == [True, False, True, False, True, False]


async def test_batches_are_bounded() -> None:
    """No flush carries more than max_batch items."""
    rec = Recorder()
    writer = GroupWriter(rec.flush, key=int, max_batch=2)
    await asyncio.gather(*(writer.submit(i) for i in range(5)))
    assert sorted(i for b in rec.batches for i in b) == list(range(5))
    assert max(len(b) for b in rec.batches) == 2


async def test_a_lost_connection_fails_every_waiter_of_that_batch() -> None:
    """A connection error reaches each caller of the failed statement, with no retry alone."""
    rec = Recorder()
    rec.fail = ConnectionResetError("gone")
    writer = GroupWriter(rec.flush, key=int)
    results = await asyncio.gather(*(writer.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionResetError) for r in results)
    assert rec.batches == [[0, 1, 2]]
    rec.fail = None
    assert await writer.submit(4) is True


async def test_a_cancelled_caller_does_not_cancel_the_batch() -> None:
    """Cancelling one waiter leaves the shared write and the other waiters intact."""
    rec = Recorder()
    rec.gate.clear()
    writer = GroupWriter(rec.flush, key=int)
    blocker = asyncio.create_task(writer.submit(0))
    await asyncio.sleep(0)
    quitter = asyncio.create_task(writer.submit(2))
    stayer = asyncio.create_task(writer.submit(4))
    await asyncio.sleep(0)
    quitter.cancel()
    rec.gate.set()
    assert await stayer is True
    assert await blocker is True
    with pytest.raises(asyncio.CancelledError):
        await quitter
    await writer.aclose()
    assert rec.batches == [[0], [2, 4]]


async def test_a_bad_record_fails_only_its_own_write() -> None:
    """A CHECK violation in one item of a batch fails that item; the others are written alone."""
    rec = Recorder()
    rec.gate.clear()
    rec.bad = {3}
    writer = GroupWriter(rec.flush, key=int)
    first = asyncio.create_task(writer.submit(0))
    await asyncio.sleep(0)
    others = [asyncio.create_task(writer.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0)
    rec.gate.set()
    results = await asyncio.gather(first, *others, return_exceptions=True)
    assert results[:3] == [True, False, True]
    assert isinstance(results[3], asyncpg.CheckViolationError)
    assert results[4:] == [True, False]
    assert rec.batches == [[0], [1, 2, 3, 4, 5], [1], [2], [3], [4], [5]]


async def test_a_cancelled_flush_is_not_retried_item_by_item() -> None:
    """A batch cut off by cancellation (shutdown) is cancelled for every waiter, not split."""
    rec = Recorder()
    rec.gate.clear()
    rec.bad, rec.bad_error = {2}, asyncio.CancelledError()
    writer = GroupWriter(rec.flush, key=int)
    first = asyncio.create_task(writer.submit(0))
    await asyncio.sleep(0)
    others = [asyncio.create_task(writer.submit(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)
    rec.gate.set()
    assert await first is True
    results = await asyncio.gather(*others, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert rec.batches == [[0], [1, 2, 3]]


async def test_a_writer_cancelled_while_writing_items_alone_settles_them_all() -> None:
    """Shutdown during the item-by-item writes cancels the items not yet written too."""
    rec = Recorder()
    rec.gate.clear()
    rec.bad, rec.stall = {3}, {2}
    writer = GroupWriter(rec.flush, key=int)
    first = asyncio.create_task(writer.submit(0))
    await asyncio.sleep(0)
    others = [asyncio.create_task(writer.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0)
    rec.gate.set()
    async with asyncio.timeout(5):
        await rec.stalled.wait()
        [drain] = [t for t in asyncio.all_tasks() if t.get_name() == "group-writer"]
        drain.cancel()
        results = await asyncio.gather(first, *others, return_exceptions=True)
    assert results[:2] == [True, False]
    assert all(isinstance(r, asyncio.CancelledError) for r in results[2:])
