"""Lazy timed transitions: events wait on a heap and run when the store is next read.

An image's CREATING end, its appearance in listings, its DELETING end and an instance's return
from a short-lived state all become due at a known time. Settling them on the next read
instead of on timers keeps thousands of images free, and keeps every change on the caller's
thread, so an action still sees the store atomically.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

Event = Callable[[], None]


class Timeline:
    """Events by due time (monotonic seconds); ties run in the order they were scheduled."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Event]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def at(self, due: float, event: Event) -> None:
        """Run `event` on the first `run_due` at or after `due`."""
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, event))

    def run_due(self, now: float) -> None:
        """Run every event whose time has come, earliest first."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2]()
