"""GroupWriter: concurrent writes go out together, one flush in flight, failures reach all."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence

import pytest

from orchestrator.db.batch import GroupWriter


class Recorder:
    """A flush that records its batches and applies even ids only, after `gate` opens."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: BaseException | None = None

    async def flush(self, items: Sequence[int]) -> Collection[int]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
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


async def test_a_failed_flush_fails_every_waiter_of_that_batch() -> None:
    """A database error reaches each caller whose item was in the failed statement."""
    rec = Recorder()
    rec.fail = ConnectionResetError("gone")
    writer = GroupWriter(rec.flush, key=int)
    results = await asyncio.gather(*(writer.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionResetError) for r in results)
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
