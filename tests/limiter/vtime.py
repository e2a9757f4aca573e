"""An asyncio loop on virtual time: whenever it would sleep, the clock jumps instead.

The real loop, the real aiolimiter and the real limiter run unchanged; only the clock is fake,
so spacing can be checked to the microsecond and minutes of traffic take milliseconds. Each loop
iteration also costs a microsecond, as on a real machine: aiolimiter re-arms a timer for the
float dust left in its bucket, which a clock that never moves would spin on forever.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

TICK = 1e-6


class _JumpingSelector(selectors.DefaultSelector):
    """Polls real I/O without blocking; a timeout advances the loop's clock instead."""

    def __init__(self, loop: VirtualLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Ready events now; with none, jump the clock to the loop's next timer."""
        ready = super().select(0)
        if not ready and timeout is None:
            raise RuntimeError("virtual loop would wait forever: nothing scheduled")
        sleep = timeout + self._loop.lateness if timeout else 0.0
        self._loop.now += TICK if ready or not sleep else max(sleep, TICK)
        return ready


class VirtualLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose `time()` only moves when the loop would otherwise wait."""

    def __init__(self, start: float = 1000.0, lateness: float = 0.0) -> None:
        self.now = start
        self.lateness = lateness
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        """The virtual clock."""
        return self.now


def run(coro: Coroutine[Any, Any, T], lateness: float = 0.0) -> T:
    """Run `coro` on a fresh virtual loop whose every timed sleep overshoots by `lateness`."""
    loop = VirtualLoop(lateness=lateness)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
