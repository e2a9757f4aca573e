"""The in-flight bound: slots taken in bulk, given back per job, released by stop."""

from __future__ import annotations

import asyncio

from orchestrator.slots import Slots


async def test_every_free_slot_is_taken_in_one_step() -> None:
    """A huge bound is taken whole by one call, leaving none free."""
    slots = Slots(2**63)
    assert await slots.take(1, asyncio.Event()) == 2**63
    assert slots.free == 0


async def test_take_waits_for_the_refill_then_takes_all() -> None:
    """With fewer free than asked for, take waits; give_back past the refill wakes it."""
    slots = Slots(4)
    await slots.take(4, asyncio.Event())
    waiting = asyncio.create_task(slots.take(2, asyncio.Event()))
    slots.give_back()
    await asyncio.sleep(0)
    assert not waiting.done()
    slots.give_back(2)
    assert await asyncio.wait_for(waiting, 5) == 3


async def test_stop_ends_a_waiting_take_with_nothing() -> None:
    """A stop while waiting returns 0 and leaves the free count alone."""
    slots, stop = Slots(1), asyncio.Event()
    await slots.take(1, stop)
    waiting = asyncio.create_task(slots.take(1, stop))
    await asyncio.sleep(0)
    stop.set()
    assert await asyncio.wait_for(waiting, 5) == 0
    slots.give_back()
    assert slots.free == 1
