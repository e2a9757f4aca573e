"""The in-flight bound: a count of free slots, taken in bulk and given back one job at a time.

A semaphore hands out one slot per acquire, so taking every free slot of a large bound costs a
loop iteration per slot: with `max_in_flight` in the millions that loop spins a core and never
yields to the signal handler. Here taking is one subtraction whatever the bound.
"""

from __future__ import annotations

import asyncio


class Slots:
    """`size` slots; `take` waits for at least `least` free ones and takes all of them."""

    def __init__(self, size: int) -> None:
        self.free = size
        self._changed = asyncio.Event()

    async def take(self, least: int, stop: asyncio.Event) -> int:
        """Every free slot once at least `least` are free; 0 when `stop` came first."""
        while self.free < least:
            if stop.is_set():
                return 0
            self._changed.clear()
            await _first(self._changed, stop)
        if stop.is_set():
            return 0
        taken, self.free = self.free, 0
        return taken

    def give_back(self, count: int = 1) -> None:
        """Return `count` slots (a finished job, or a claim that found fewer jobs)."""
        if count > 0:
            self.free += count
            self._changed.set()


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
