"""Per (account, action) rate limiting that no one-second window at the server can catch out.

Invariant 2 (docs/design.md#invariants): whatever one-second window the server counts in, it never
sees more calls than the action's limit, also when network jitter moves calls closer together on the
way. A leaky bucket with a burst of `limit` does not give that (docs/design.md#rate-limits:
`AsyncLimiter(10, 1)` lets 19 through one window), so each (account, action) gets an aiolimiter
bucket of just over one call that spaces grants evenly (`spacing`, `primed_bucket`), used by one
waiter at a time.

A lane starts as if it had granted a call when its account's lease was gained (`forget`), or at
its first use when there is no lease; so a restart or a lease takeover never bursts, and a lane
idle since the lease was gained grants its first call at once (the first call of a slot is not
held back a period for nothing). `RequestLimitExceeded` halves its rate and quiet time brings it
back step by step (AIMD).
Limiters bind to the running loop on first use, never at import (aiolimiter warns otherwise).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from orchestrator import logs
from orchestrator.config import DEFAULT_LIMITS, Settings

# Network jitter the guarantee absorbs: each call may reach the server this much early or late.
DEFAULT_JITTER = 0.02
# How far a grant may come early to make up for the event loop waking late (epoll sleeps in whole
# milliseconds); without it lateness accumulates and costs up to 9% of the limit at 40/s.
DEFAULT_CATCH_UP = 0.002
# Unknown actions get the lowest published CVM limit (docs/design.md#rate-limits), not none.
FALLBACK_LIMIT = 10
# Makes the bound below strict, with about 1 ms to spare for delays between grant and send.
_GUARD = 1.002

_log = logs.get("limiter")


def spacing(
    limit: int,
    margin: float = 1.0,
    jitter: float = DEFAULT_JITTER,
    catch_up: float = DEFAULT_CATCH_UP,
) -> float:
    """Seconds between grants so no one-second server window sees more than `limit` calls."""
    # Grants keep to a grid T apart, each at most c (catch_up) earlier than T after the one
    # before, and reach the server shifted by up to ±j: calls n-1 grants apart can land as close
    # as (n-1)T - c - 2j. A closed one-second window thus holds at most
    #     floor((1 + 2j + c) / T) + 1  calls  (`window_bound`),
    # which stays <= limit exactly when T > (1 + 2j + c) / limit; _GUARD makes that strict.
    # For j = 20 ms, c = 2 ms the nominal utilization 1 / (limit * T) is 0.958 at any limit.
    # `margin` independently caps the rate at margin * limit, for when `jitter` is set small.
    return max((1 + 2 * jitter + catch_up) / limit * _GUARD, 1 / (limit * margin))


def window_bound(
    period: float, jitter: float = DEFAULT_JITTER, catch_up: float = DEFAULT_CATCH_UP
) -> int:
    """The most calls granted `period` apart that ±`jitter` can put in one second."""
    return math.floor((1 + 2 * jitter + catch_up) / period) + 1


async def primed_bucket(
    period: float, catch_up: float = DEFAULT_CATCH_UP, idle: float = 0.0
) -> AsyncLimiter:
    """A bucket granting one call per `period`, at most `catch_up` early, full `idle` s ago."""
    # Capacity 1 + e with a leak of one unit per period is a grid with a tolerance of e periods:
    # a grant that came late by d lets the next come d sooner, never more than e * period, so
    # lateness does not pile up and calls never bunch (a bucket of `limit` lets `limit` bunch).
    tolerance = catch_up / period
    limiter = AsyncLimiter(1 + tolerance, period * (1 + tolerance))
    # Full as of `idle` seconds ago, as if the last second had been busy: the first grant is at
    # least one period after that call, so a fresh lane never bursts and a rate change never
    # shortens the gap to the call before. What is left after leaking `idle` seconds fits in a
    # fresh bucket, so this returns without waiting.
    await limiter.acquire(max(limiter.max_rate - idle / period, 0.0))
    return limiter


@dataclass(frozen=True, slots=True)
class Adaptation:
    """How throttling slows a lane down and how quiet time brings it back (AIMD)."""

    slow_factor: float = 2.0  # a throttle divides the rate by this
    max_slowdown: float = 16.0  # never slower than full rate / max_slowdown
    hold: float = 1.0  # throttles this soon after a slowdown come from calls already sent
    recover_every: float = 2.0  # each quiet interval of this many seconds adds one step
    recover_step: float = 0.1  # fraction of the full rate added per step


@dataclass(frozen=True, slots=True)
class LimiterStats:
    """What one (account, action) limiter has done; rates in calls per second."""

    account: str
    action: str
    limit: int
    full_rate: float
    rate: float
    calls: int
    total_wait: float
    throttles: int

    @property
    def avg_wait(self) -> float:
        """Mean seconds a call waited for its grant."""
        return self.total_wait / self.calls if self.calls else 0.0

    @property
    def slowed(self) -> bool:
        """Whether throttling currently holds the rate below its full rate."""
        return self.rate < self.full_rate


class _Lane:
    """One (account, action): a primed bucket behind a FIFO lock, with an adaptive period."""

    def __init__(
        self,
        account: str,
        action: str,
        limit: int,
        *,
        full_period: float,
        adapt: Adaptation,
        catch_up: float,
        started_at: float | None = None,
    ) -> None:
        self.account, self.action, self.limit = account, action, limit
        self._full_period = full_period
        self._adapt = adapt
        self._catch_up = catch_up
        self._loop = asyncio.get_running_loop()
        self._period = full_period
        self._changed_at = self._loop.time()
        self._slowed_at = -math.inf
        self._bucket: AsyncLimiter | None = None
        self._bucket_period = 0.0
        # When the lane's history begins (the lease gain): its first bucket is primed as of then.
        self._started_at = self._changed_at if started_at is None else started_at
        self._last_grant = -math.inf
        # Only the lock holder waits in the bucket, so a bucket can be replaced when the rate
        # changes without two buckets granting side by side.
        self._lock = asyncio.Lock()
        self._calls = 0
        self._total_wait = 0.0
        self._throttles = 0

    async def acquire(self) -> None:
        """Wait for this lane's next grant."""
        started = self._loop.time()
        async with self._lock:
            self._recover(self._loop.time())
            bucket = await self._current_bucket()
            await bucket.acquire()
            self._last_grant = self._loop.time()
        self._calls += 1
        self._total_wait += self._loop.time() - started

    async def _current_bucket(self) -> AsyncLimiter:
        if self._bucket is None:
            # Never sooner than a period after this lane's own latest grant either: a restart
            # must not shorten the gap to a call the old bucket has just let through.
            since = max(self._started_at, self._last_grant)
            idle = max(self._loop.time() - since, 0.0)
            self._bucket = await primed_bucket(self._period, self._catch_up, idle)
            self._bucket_period = self._period
        elif self._bucket_period != self._period:
            # Primed as of now: the new spacing counts from the latest grant at the latest.
            self._bucket = await primed_bucket(self._period, self._catch_up)
            self._bucket_period = self._period
        return self._bucket

    def restart(self, at: float) -> None:
        """Begin the lane's history again at `at` (a lease gained): as if it granted a call then.

        The lane itself stays, so callers already waiting in it and those arriving after
        share one stream of grants; the next bucket is primed as of `at`.
        """
        self._started_at = at
        self._bucket = None

    def throttle(self) -> None:
        """The server said RequestLimitExceeded: slow down, unless we just did."""
        now = self._loop.time()
        self._throttles += 1
        self._recover(now)
        self._changed_at = now
        if now - self._slowed_at < self._adapt.hold:
            return
        slowest = self._full_period * self._adapt.max_slowdown
        self._period = min(self._period * self._adapt.slow_factor, slowest)
        self._slowed_at = now
        _log.warning("limiter.slowed", **self._fields())

    def _recover(self, now: float) -> None:
        if self._period <= self._full_period:
            return
        steps = math.floor((now - self._changed_at) / self._adapt.recover_every)
        if steps <= 0:
            return
        full_rate = 1 / self._full_period
        rate = 1 / self._period + steps * self._adapt.recover_step * full_rate
        self._changed_at += steps * self._adapt.recover_every
        self._period = max(1 / rate, self._full_period)
        if self._period == self._full_period:
            _log.info("limiter.recovered", **self._fields())

    def _fields(self) -> dict[str, object]:
        return {
            "account": self.account,
            "action": self.action,
            "rate": round(1 / self._period, 3),
            "full_rate": round(1 / self._full_period, 3),
        }

    def stats(self) -> LimiterStats:
        """Counters and the current rate, with recovery brought up to date."""
        self._recover(self._loop.time())
        return LimiterStats(
            account=self.account,
            action=self.action,
            limit=self.limit,
            full_rate=1 / self._full_period,
            rate=1 / self._period,
            calls=self._calls,
            total_wait=self._total_wait,
            throttles=self._throttles,
        )


class Limiters:
    """One limiter per (account, action), shared by every task of the process."""

    def __init__(
        self,
        limits: Mapping[str, int] = DEFAULT_LIMITS,
        *,
        margin: float = 1.0,
        jitter: float = DEFAULT_JITTER,
        catch_up: float = DEFAULT_CATCH_UP,
        adapt: Adaptation | None = None,
    ) -> None:
        self._limits = dict(limits)
        self._margin = margin
        self._jitter = jitter
        self._catch_up = catch_up
        self._adapt = adapt or Adaptation()
        self._lanes: dict[tuple[str, str], _Lane] = {}
        # Loop time each account's lanes start from, set by `forget` (the lease gain).
        self._started: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Limiters:
        """Limiters with the configured limits, rate margin and jitter allowance."""
        return cls(settings.limits, margin=settings.rate_margin, jitter=settings.limiter_jitter)

    def period(self, action: str) -> float:
        """Seconds between grants for `action` at its full rate."""
        return spacing(self.limit(action), self._margin, self._jitter, self._catch_up)

    def limit(self, action: str) -> int:
        """The server's per-second limit for `action`."""
        return self._limits.get(action, FALLBACK_LIMIT)

    async def acquire(self, account: str, action: str) -> None:
        """Wait until a call of `action` for `account` may be sent."""
        await self._lane(account, action).acquire()

    def throttled(self, account: str, action: str) -> None:
        """Report a RequestLimitExceeded answer; the limiter slows down. Call inside the loop."""
        self._lane(account, action).throttle()

    def forget(self, account: str) -> None:
        """Restart an account's limiters (lease gained) as if each had granted a call just now."""
        self._started.pop(account, None)
        try:
            loop = self._bind()
        except RuntimeError:
            # Outside a loop: the lanes start afresh at their first use instead.
            for key in [key for key in self._lanes if key[0] == account]:
                del self._lanes[key]
            return
        # Lanes in use restart in place (dropping one would let its waiters and a new lane grant
        # side by side: twice the rate); later ones are primed as of this moment. A lane idle
        # since the gain grants at once, and none grants within a period of the gain.
        now = self._started[account] = loop.time()
        for key, lane in self._lanes.items():
            if key[0] == account:
                lane.restart(now)

    def stats(self, account: str, action: str) -> LimiterStats:
        """The stats of one (account, action) limiter."""
        return self._lane(account, action).stats()

    def snapshot(self) -> dict[tuple[str, str], LimiterStats]:
        """The stats of every limiter used so far, keyed by (account, action)."""
        return {key: lane.stats() for key, lane in self._lanes.items()}

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new loop (tests, a restarted daemon) starts afresh: locks and buckets bind to
            # the loop they were first used in, and its clock is not the old one's.
            self._lanes.clear()
            self._started.clear()
            self._loop = loop
        return loop

    def _lane(self, account: str, action: str) -> _Lane:
        self._bind()
        lane = self._lanes.get((account, action))
        if lane is None:
            lane = self._lanes[(account, action)] = _Lane(
                account,
                action,
                self.limit(action),
                full_period=self.period(action),
                adapt=self._adapt,
                catch_up=self._catch_up,
                started_at=self._started.get(account),
            )
        return lane


def busiest_window(times: list[float], width: float = 1.0) -> int:
    """The most of `times` that one closed window of `width` seconds contains."""
    ordered = sorted(times)
    best = start = 0
    for end, at in enumerate(ordered):
        while at - ordered[start] > width:
            start += 1
        best = max(best, end - start + 1)
    return best
