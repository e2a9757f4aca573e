"""Limiter lifecycle: built inside the loop, no burst when fresh, stats, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.config import DEFAULT_LIMITS, Settings
from orchestrator.limiter import (
    DEFAULT_CATCH_UP,
    DEFAULT_JITTER,
    FALLBACK_LIMIT,
    Limiters,
    busiest_window,
    spacing,
)
from tests.limiter import vtime
from tests.limiter.traffic import gaps, grant_times, jittered

ACTION = "CreateImage"


def test_fresh_limiter_waits_one_period_before_the_first_call() -> None:
    """A fresh limiter behaves as if it had just let a call through: no initial burst."""

    async def scenario() -> tuple[float, list[float]]:
        started = asyncio.get_running_loop().time()
        return started, await grant_times(Limiters(), ACTION, 10, 10)

    started, times = vtime.run(scenario())
    period = Limiters().period(ACTION)
    assert min(times) - started == pytest.approx(period, abs=1e-4)
    assert min(gaps(times)) >= period - DEFAULT_CATCH_UP


def test_takeover_after_full_rate_traffic_does_not_burst() -> None:
    """A new limiter taking over from one running at full rate keeps the spacing and the window."""

    async def scenario() -> list[float]:
        before = await grant_times(Limiters(), ACTION, 30, 10)
        after = await grant_times(Limiters(), ACTION, 30, 10)
        return before + after

    times = vtime.run(scenario())
    assert min(gaps(times)) >= Limiters().period(ACTION) - DEFAULT_CATCH_UP
    assert busiest_window(jittered(times, DEFAULT_JITTER)) <= 10


def test_forget_restarts_an_account_without_burst() -> None:
    """A call right after forget() (a lease gained) still waits one period: no burst."""

    async def scenario() -> float:
        limiters = Limiters()
        await limiters.acquire("a", ACTION)
        await asyncio.sleep(5)
        limiters.forget("a")
        started = asyncio.get_running_loop().time()
        await limiters.acquire("a", ACTION)
        return asyncio.get_running_loop().time() - started

    assert vtime.run(scenario()) == pytest.approx(Limiters().period(ACTION), abs=1e-4)


def test_lane_idle_since_the_lease_gain_grants_its_first_call_at_once() -> None:
    """A lane first used a while after forget() (the lease gain) is primed as of the gain."""

    async def scenario() -> tuple[float, list[float]]:
        limiters = Limiters()
        limiters.forget("acct")
        await asyncio.sleep(5)
        started = asyncio.get_running_loop().time()
        return started, await grant_times(limiters, ACTION, 10, 10)

    started, times = vtime.run(scenario())
    period = Limiters().period(ACTION)
    assert min(times) == pytest.approx(started, abs=1e-4)
    assert min(gaps(sorted(times))) >= period - DEFAULT_CATCH_UP


def test_first_grant_is_a_period_after_the_lease_gain_never_sooner() -> None:
    """Used half a period after forget(), a lane waits out the rest of the period."""

    async def scenario() -> float:
        limiters = Limiters()
        limiters.forget("acct")
        gained = asyncio.get_running_loop().time()
        await asyncio.sleep(limiters.period(ACTION) / 2)
        await limiters.acquire("acct", ACTION)
        return asyncio.get_running_loop().time() - gained

    assert vtime.run(scenario()) == pytest.approx(Limiters().period(ACTION), abs=1e-4)


def test_takeover_primed_at_the_gain_keeps_every_window_within_the_limit() -> None:
    """A replica gaining the lease as the old holder stops at full rate never bursts past it."""

    async def scenario() -> list[float]:
        before = await grant_times(Limiters(), ACTION, 30, 10)
        taker = Limiters()
        taker.forget("acct")
        return before + await grant_times(taker, ACTION, 30, 10)

    times = vtime.run(scenario())
    assert min(gaps(times)) >= Limiters().period(ACTION) - DEFAULT_CATCH_UP
    assert busiest_window(jittered(times, DEFAULT_JITTER)) <= 10


def test_lease_regained_mid_stream_keeps_one_stream_of_grants() -> None:
    """forget() while calls wait in a lane (a lease lost and regained) never doubles the rate."""

    async def scenario() -> list[float]:
        limiters = Limiters()
        busy = asyncio.create_task(grant_times(limiters, ACTION, 40, 20))
        await asyncio.sleep(1.0)  # mid-stream, with waiters queued in the lane
        limiters.forget("acct")
        more = await grant_times(limiters, ACTION, 20, 10)
        return sorted(await busy + more)

    times = vtime.run(scenario())
    assert len(times) == 60
    assert min(gaps(times)) >= Limiters().period(ACTION) - DEFAULT_CATCH_UP
    assert busiest_window(jittered(times, DEFAULT_JITTER)) <= 10


def test_forget_outside_a_loop_primes_at_first_use() -> None:
    """forget() without a running loop only drops lanes; the first use then waits a period."""
    limiters = Limiters()
    limiters.forget("acct")

    async def scenario() -> float:
        started = asyncio.get_running_loop().time()
        await limiters.acquire("acct", ACTION)
        return asyncio.get_running_loop().time() - started

    assert vtime.run(scenario()) == pytest.approx(Limiters().period(ACTION), abs=1e-4)


def test_construction_needs_no_event_loop() -> None:
    """Limiters can be built at startup outside any loop; nothing binds until first use."""
    limiters = Limiters()
    assert limiters.snapshot() == {}
    with pytest.raises(RuntimeError):
        limiters.throttled("a", ACTION)


def test_one_instance_serves_successive_loops() -> None:
    """Used in a second loop, the limiters start afresh instead of reusing loop-bound parts."""
    limiters = Limiters()
    for _ in range(2):
        vtime.run(grant_times(limiters, ACTION, 5, 5))
        assert limiters.snapshot()[("acct", ACTION)].calls == 5
    assert len(asyncio.run(grant_times(limiters, "DescribeImages", 3, 3))) == 3


async def test_spacing_holds_on_a_real_loop() -> None:
    """On the real clock, grants are never closer than the period less the catch-up."""
    limiters = Limiters({"Fast": 200})
    times = await grant_times(limiters, "Fast", 40, 10)
    assert min(gaps(times)) >= limiters.period("Fast") - DEFAULT_CATCH_UP


def test_cancelled_waiters_do_not_use_up_grants() -> None:
    """Cancelling the call in the bucket and one queued behind it leaves the spacing intact."""

    async def scenario() -> tuple[float, list[float]]:
        limiters, loop, times = Limiters(), asyncio.get_running_loop(), []
        started = loop.time()

        async def call() -> None:
            await limiters.acquire("a", ACTION)
            times.append(loop.time())

        tasks = [asyncio.create_task(call()) for _ in range(4)]
        await asyncio.sleep(0.01)
        tasks[0].cancel()
        tasks[2].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return started, times

    started, times = vtime.run(scenario())
    period = Limiters().period(ACTION)
    assert [t - started for t in times] == pytest.approx([period, 2 * period], abs=1e-4)


def test_stats_count_calls_and_waits() -> None:
    """Stats report calls, waiting time and the current rate per (account, action)."""

    async def scenario() -> Limiters:
        limiters = Limiters()
        await grant_times(limiters, ACTION, 10, 10, "a")
        return limiters

    limiters = vtime.run(scenario())
    stats = limiters.snapshot()[("a", ACTION)]
    period = limiters.period(ACTION)
    assert (stats.calls, stats.limit, stats.throttles) == (10, 10, 0)
    # Ten callers queued at once wait 1, 2, ... 10 periods.
    assert stats.avg_wait == pytest.approx(5.5 * period, abs=1e-3)
    assert stats.rate == stats.full_rate == pytest.approx(1 / period)


def test_limits_and_margin_come_from_settings() -> None:
    """from_settings uses the configured limits; unknown actions get the fallback limit."""
    limiters = Limiters.from_settings(Settings(limits={**DEFAULT_LIMITS, ACTION: 5}))
    assert limiters.limit(ACTION) == 5
    assert limiters.period(ACTION) == spacing(5, Settings().rate_margin)
    assert limiters.limit("StopInstances") == FALLBACK_LIMIT
