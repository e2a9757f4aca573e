"""The live view: jobs by state, API calls per second against the limit, and an ETA.

On a terminal one line is redrawn in place; anywhere else (a pipe, CI) a plain line is printed
every few seconds when something changed, so logs of the demo stay short and readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

import asyncpg

from orchestrator.jobs import LIVE_STATES, TERMINAL_STATES
from orchestrator.limiter import Limiters

STATE_ORDER = (*LIVE_STATES, *TERMINAL_STATES)
WATCHED_ACTION = "CreateImage"
TTY_INTERVAL = 0.25
PLAIN_INTERVAL = 3.0
# Rates are measured over the last few seconds: steady enough to read, quick to follow.
RATE_WINDOW = 3.0
MIN_RATE_SPAN = 2.0
ETA_WINDOW = 10.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at the jobs of a slot and at the API calls made so far."""

    at: float  # monotonic seconds
    states: Mapping[str, int]
    calls: Mapping[str, int]  # by action, since the process started

    @property
    def total(self) -> int:
        """Jobs of the slot."""
        return sum(self.states.values())

    @property
    def done(self) -> int:
        """Jobs of the slot in a terminal state."""
        return sum(n for state, n in self.states.items() if state in TERMINAL_STATES)


async def take_sample(pool: asyncpg.Pool, limiters: Limiters, slot: datetime) -> Sample:
    """Jobs of `slot` by state, and API calls granted per action."""
    rows = await pool.fetch(
        "SELECT state, count(*) AS n FROM jobs WHERE slot = $1 GROUP BY state", slot
    )
    calls: dict[str, int] = {}
    for (_, action), stats in limiters.snapshot().items():
        calls[action] = calls.get(action, 0) + stats.calls
    return Sample(time.monotonic(), {r["state"]: int(r["n"]) for r in rows}, calls)


def _rate(new: float, old: float, seconds: float) -> float:
    return (new - old) / seconds if seconds > 0 else 0.0


def _oldest_within(history: deque[Sample], seconds: float) -> Sample:
    """The oldest sample at most `seconds` old, or at least the one before the latest."""
    latest = history[-1]
    oldest = next(s for s in history if latest.at - s.at <= seconds)
    return history[-2] if oldest is latest and len(history) > 1 else oldest


def eta_seconds(history: deque[Sample]) -> float | None:
    """Seconds until every job is terminal, from the recent completion rate; None if unknown."""
    latest, old = history[-1], _oldest_within(history, ETA_WINDOW)
    remaining = latest.total - latest.done
    if remaining == 0:
        return 0.0
    rate = _rate(latest.done, old.done, latest.at - old.at)
    return remaining / rate if rate > 0 else None


def _states(sample: Sample) -> str:
    shown = [f"{state} {sample.states[state]}" for state in STATE_ORDER if sample.states.get(state)]
    return " . ".join(shown) or "no jobs yet"


def call_rates(history: deque[Sample]) -> tuple[float, float] | None:
    """(watched action, all actions) calls per second lately; None until enough is seen."""
    latest, old = history[-1], _oldest_within(history, RATE_WINDOW)
    seconds = latest.at - old.at
    # Counting grants over a short span overstates the rate by up to one call per span.
    if seconds < MIN_RATE_SPAN:
        return None
    watched = _rate(latest.calls.get(WATCHED_ACTION, 0), old.calls.get(WATCHED_ACTION, 0), seconds)
    return watched, _rate(sum(latest.calls.values()), sum(old.calls.values()), seconds)


def _calls(history: deque[Sample], limit: int) -> str:
    rates = call_rates(history)
    if rates is None:
        return f"{WATCHED_ACTION}   --/s of {limit} . all API   --/s"
    return f"{WATCHED_ACTION} {rates[0]:4.1f}/s of {limit} . all API {rates[1]:4.1f}/s"


def _eta(history: deque[Sample]) -> str:
    eta = eta_seconds(history)
    return "ETA --" if eta is None else f"ETA {eta:3.0f}s"


def render(label: str, history: deque[Sample], limit: int) -> tuple[str, str]:
    """Progress as two parts: counts, ETA and call rates; then jobs by state."""
    latest = history[-1]
    head = (
        f"{label}: {latest.done}/{latest.total} done | {_eta(history)} | {_calls(history, limit)}"
    )
    return head, f"  jobs: {_states(latest)}"


class LiveView:
    """Follows one slot until told to stop; redraws on a TTY, prints plain lines otherwise."""

    def __init__(self, out: TextIO, pool: asyncpg.Pool, limiters: Limiters, limit: int) -> None:
        self.out = out
        self.pool = pool
        self.limiters = limiters
        self.limit = limit
        self.tty = out.isatty()
        self._drawn = False

    async def follow(self, label: str, slot: datetime, stop: asyncio.Event) -> None:
        """Show progress of `slot` until `stop` is set, then the final state."""
        history: deque[Sample] = deque(maxlen=256)
        interval = TTY_INTERVAL if self.tty else PLAIN_INTERVAL
        self._drawn = False
        last = ""
        while not stop.is_set():
            history.append(await take_sample(self.pool, self.limiters, slot))
            last = self._show(render(label, history, self.limit), last)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
        history.append(await take_sample(self.pool, self.limiters, slot))
        self._show(render(label, history, self.limit), last, final=True)

    def _show(self, parts: tuple[str, str], last: str, *, final: bool = False) -> str:
        line = f"{parts[0]} | {parts[1].strip()}"
        if self.tty:
            self._redraw(parts, final)
        elif line != last:
            self.out.write(line + "\n")
        self.out.flush()
        return line

    def _redraw(self, parts: tuple[str, str], final: bool) -> None:
        width = shutil.get_terminal_size().columns - 1
        # Back to the start of the first line drawn last time (cursor up one), then redraw
        # both lines, erasing what is left of the old ones; the final state stays on screen.
        up = "\r\x1b[1A" if self._drawn else "\r"
        head, states = (part[:width] for part in parts)
        self.out.write(f"{up}{head}\x1b[K\n{states}\x1b[K" + ("\n" if final else ""))
        self._drawn = True
