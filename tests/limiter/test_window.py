"""The window guarantee: even spacing, and at most `limit` calls in any second despite jitter."""

from __future__ import annotations

import asyncio

import pytest
from aiolimiter import AsyncLimiter
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.limiter import (
    DEFAULT_CATCH_UP,
    DEFAULT_JITTER,
    Limiters,
    busiest_window,
    spacing,
    window_bound,
)
from tests.limiter import vtime
from tests.limiter.traffic import gaps, grant_times, jittered, min_span

JITTER = DEFAULT_JITTER


@given(limit=st.integers(1, 500), jitter=st.floats(0.0, 0.1), catch_up=st.floats(0.0, 0.01))
def test_spacing_bound_never_exceeds_limit(limit: int, jitter: float, catch_up: float) -> None:
    """The period chosen for any limit and jitter keeps the worst-case window within the limit."""
    period = spacing(limit, jitter=jitter, catch_up=catch_up)
    assert window_bound(period, jitter, catch_up) <= limit


@pytest.mark.parametrize("limit", [10, 20, 40])
def test_spacing_keeps_utilization_high(limit: int) -> None:
    """With ±20 ms jitter allowed the limiter still uses at least 95% of the limit."""
    assert 1 / (spacing(limit) * limit) >= 0.95


def test_margin_caps_rate_when_jitter_is_small() -> None:
    """Without a jitter allowance the margin alone sets the rate."""
    assert spacing(10, margin=0.9, jitter=0.0) == pytest.approx(1 / 9)


def test_grants_keep_to_the_period_grid() -> None:
    """500 grants to 50 tasks: n in a row span at least (n-1) periods less the catch-up."""
    limiters = Limiters()
    period = limiters.period("CreateImage")
    times = vtime.run(grant_times(limiters, "CreateImage", 500))
    for n in (2, 3, 10, 11, 100):
        assert min_span(times, n) >= (n - 1) * period - DEFAULT_CATCH_UP - 1e-9
    assert max(gaps(times)) <= period + 1e-4


@pytest.mark.parametrize("lateness", [0.001, 0.005])
def test_late_wakeups_are_caught_up_without_bunching(lateness: float) -> None:
    """A loop waking late costs no rate up to the catch-up, and no gap is ever shorter."""
    limiters = Limiters()
    period = limiters.period("CreateImage")
    times = vtime.run(grant_times(limiters, "CreateImage", 300), lateness=lateness)
    assert min(gaps(times)) >= period - DEFAULT_CATCH_UP - 1e-9
    mean_gap = (times[-1] - times[0]) / 299
    expected = period + max(0.0, lateness - DEFAULT_CATCH_UP)
    assert mean_gap == pytest.approx(expected, abs=1e-5)


def test_window_bound_is_attained_by_the_worst_case() -> None:
    """The bound is tight: one early grant and adversarial jitter reach it, and no more."""
    period, catch_up = 0.1041, DEFAULT_CATCH_UP
    grants = [0.0] + [k * period - catch_up for k in range(1, 40)]
    arrivals = [t + (JITTER if i == 0 else -JITTER) for i, t in enumerate(grants)]
    assert busiest_window(arrivals) == window_bound(period, JITTER, catch_up) == 11


@pytest.mark.parametrize(("action", "seed"), [("CreateImage", 1), ("DescribeImages", 2)])
def test_no_window_exceeds_limit_with_random_jitter(action: str, seed: int) -> None:
    """Grants moved by ±20 ms random jitter never put more than the limit in any one second."""
    limiters = Limiters()
    times = vtime.run(grant_times(limiters, action, 500))
    assert busiest_window(jittered(times, JITTER, seed)) <= limiters.limit(action)


def test_no_window_exceeds_limit_with_adversarial_jitter() -> None:
    """The worst jitter pattern (one call late, the next `limit - 1` early) still fits."""
    limiters = Limiters()
    times = vtime.run(grant_times(limiters, "CreateImage", 200))
    arrivals = [t + (JITTER if i % 10 == 0 else -JITTER) for i, t in enumerate(times)]
    assert busiest_window(arrivals) <= 10


def test_plain_leaky_bucket_fails_the_same_check() -> None:
    """Control: AsyncLimiter(10, 1), the obvious choice, lets a window see more than 10."""

    async def burst() -> list[float]:
        loop, bucket, times = asyncio.get_running_loop(), AsyncLimiter(10, 1), []
        for _ in range(40):
            await bucket.acquire()
            times.append(loop.time())
        return times

    assert busiest_window(vtime.run(burst())) > 10


def test_busiest_window_counts_a_closed_window() -> None:
    """Calls exactly one second apart share a window; the counter is the check's yardstick."""
    assert busiest_window([0.0, 0.5, 1.0, 2.1]) == 3
    assert busiest_window([]) == 0


def test_spacing_without_jitter_allowance_fails_the_same_check() -> None:
    """Control: calls exactly 1/limit apart put 11 in a window under the same adversarial jitter."""
    times = [k * 0.1 for k in range(200)]
    arrivals = [t + (JITTER if i % 10 == 0 else -JITTER) for i, t in enumerate(times)]
    assert busiest_window(arrivals) > 10
