"""Throttling slows one limiter down; quiet time brings it back to full rate step by step."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestrator.limiter import DEFAULT_CATCH_UP, Adaptation, Limiters
from tests.limiter import vtime
from tests.limiter.traffic import gaps, grant_times

ACTION = "CreateImage"


def test_throttle_halves_rate_and_widens_spacing() -> None:
    """After RequestLimitExceeded the rate halves and grants come two periods apart."""

    async def scenario() -> tuple[float, list[float], list[MutableMapping[str, Any]]]:
        limiters = Limiters()
        await limiters.acquire("a", ACTION)
        with capture_logs() as events:
            limiters.throttled("a", ACTION)
        return (
            limiters.stats("a", ACTION).rate,
            await grant_times(limiters, ACTION, 8, 8, "a"),
            events,
        )

    limiters = Limiters()
    rate, times, events = vtime.run(scenario())
    full = 1 / limiters.period(ACTION)
    assert rate == pytest.approx(full / 2)
    assert min(gaps(times)) >= 2 * limiters.period(ACTION) - DEFAULT_CATCH_UP
    assert [e["event"] for e in events] == ["limiter.slowed"]
    assert events[0]["rate"] == round(full / 2, 3)


def test_throttles_from_calls_in_flight_slow_down_once() -> None:
    """Several throttles within the hold time halve the rate once; a later one halves again."""

    async def scenario() -> list[float]:
        limiters = Limiters(adapt=Adaptation(hold=1.0))
        rates = []
        for _ in range(5):
            limiters.throttled("a", ACTION)
        rates.append(limiters.stats("a", ACTION).rate)
        await asyncio.sleep(1.5)
        limiters.throttled("a", ACTION)
        rates.append(limiters.stats("a", ACTION).rate)
        return rates

    full = 1 / Limiters().period(ACTION)
    assert vtime.run(scenario()) == pytest.approx([full / 2, full / 4])


def test_slowdown_is_capped() -> None:
    """Repeated throttling never takes the rate below full rate / max_slowdown."""

    async def scenario() -> float:
        limiters = Limiters(adapt=Adaptation(max_slowdown=8.0))
        for _ in range(10):
            limiters.throttled("a", ACTION)
            await asyncio.sleep(1.1)
        return limiters.stats("a", ACTION).rate

    full = 1 / Limiters().period(ACTION)
    assert vtime.run(scenario()) == pytest.approx(full / 8)


def test_rate_recovers_gradually_after_quiet_time() -> None:
    """Quiet time adds the rate back step by step, logs limiter.recovered once, then stays full."""

    async def scenario() -> tuple[list[float], list[MutableMapping[str, Any]]]:
        limiters = Limiters(adapt=Adaptation(recover_every=2.0, recover_step=0.1))
        limiters.throttled("a", ACTION)
        rates = []
        with capture_logs() as events:
            for _ in range(16):
                await asyncio.sleep(1.5)
                rates.append(limiters.stats("a", ACTION).rate)
        return rates, events

    full = 1 / Limiters().period(ACTION)
    rates, events = vtime.run(scenario())
    assert rates == sorted(rates)
    assert full / 2 < rates[3] < full
    assert rates[7:] == pytest.approx([full] * 9)
    assert [e["event"] for e in events] == ["limiter.recovered"]


def test_recovered_limiter_spaces_calls_at_full_rate() -> None:
    """After recovery, grants are back to one full-rate period apart."""

    async def scenario() -> list[float]:
        limiters = Limiters()
        limiters.throttled("a", ACTION)
        await asyncio.sleep(30)
        return await grant_times(limiters, ACTION, 20, 5, "a")

    period = Limiters().period(ACTION)
    assert max(gaps(vtime.run(scenario()))) == pytest.approx(period, abs=1e-4)


@pytest.mark.parametrize("recover", [False, True])
def test_rate_changes_with_calls_queued_never_bunch_grants(recover: bool) -> None:
    """Slowing down or recovering while callers wait keeps every gap at least one period."""

    async def scenario() -> list[float]:
        limiters = Limiters(adapt=Adaptation(recover_every=0.5, recover_step=0.5))
        traffic = asyncio.create_task(grant_times(limiters, ACTION, 60, 10, "a"))
        await asyncio.sleep(1.0)
        limiters.throttled("a", ACTION)
        if recover:
            await asyncio.sleep(0.6)
            await limiters.acquire("a", ACTION)
        return await traffic

    times = vtime.run(scenario())
    assert min(gaps(times)) >= Limiters().period(ACTION) - DEFAULT_CATCH_UP


def test_throttle_touches_only_its_own_account_and_action() -> None:
    """Throttling (a, CreateImage) leaves (a, DescribeImages) and (b, CreateImage) at full rate."""

    async def scenario() -> dict[tuple[str, str], bool]:
        limiters = Limiters()
        limiters.throttled("a", ACTION)
        for key in [("a", "DescribeImages"), ("b", ACTION)]:
            await limiters.acquire(*key)
        return {key: stats.slowed for key, stats in limiters.snapshot().items()}

    assert vtime.run(scenario()) == {
        ("a", ACTION): True,
        ("a", "DescribeImages"): False,
        ("b", ACTION): False,
    }


def test_accounts_are_limited_independently() -> None:
    """Two accounts each get the full rate at the same time: neither waits for the other."""

    async def scenario() -> tuple[list[float], list[float]]:
        limiters = Limiters()
        a, b = await asyncio.gather(
            grant_times(limiters, ACTION, 30, 10, "a"), grant_times(limiters, ACTION, 30, 10, "b")
        )
        return a, b

    period = Limiters().period(ACTION)
    a, b = vtime.run(scenario())
    assert max(a) - min(a) == pytest.approx(29 * period, abs=1e-3)
    assert max(b) - min(b) == pytest.approx(29 * period, abs=1e-3)
    assert abs(min(a) - min(b)) < period
