"""Sliding one-second windows per (account, action), and the window counter."""

from __future__ import annotations

import pytest

from orchestrator.simulator.apierror import ApiError
from orchestrator.simulator.ratelimit import RateWindows
from tests.simulator.helpers import FrozenClock


def _windows(clock: FrozenClock, limit: int | None = 3) -> RateWindows:
    return RateWindows({"CreateImage": limit}, clock)


def test_limit_plus_one_is_throttled_with_real_message() -> None:
    """The call that makes a window exceed the limit gets the real message."""
    clock = FrozenClock()
    windows = _windows(clock)
    for _ in range(3):
        windows.admit("acc", "CreateImage")
    with pytest.raises(ApiError) as caught:
        windows.admit("acc", "CreateImage")
    assert caught.value.code == "RequestLimitExceeded"
    assert caught.value.message == (
        "Your current request times equals to `4` in a second, which exceeds the frequency "
        "limit `3` for a second. Please reduce the frequency of calls."
    )


def test_window_slides() -> None:
    """A call is judged by the second before it, not by calendar seconds."""
    clock = FrozenClock()
    windows = _windows(clock)
    for step in (0.0, 0.5, 0.4):
        clock.advance(step)
        windows.admit("acc", "CreateImage")
    clock.advance(0.2)  # t=1.1: the call at t=0 left the window; 0.5 and 0.9 remain
    windows.admit("acc", "CreateImage")
    with pytest.raises(ApiError):
        windows.admit("acc", "CreateImage")
    clock.advance(0.7)  # t=1.8: 0.9, both calls at 1.1 (one was rejected) and this one: 4
    with pytest.raises(ApiError):
        windows.admit("acc", "CreateImage")
    clock.advance(1.0)  # t=2.8: the window is empty again
    windows.admit("acc", "CreateImage")


def test_rejected_calls_count_and_are_violations() -> None:
    """Rejected calls stay in the window, count in max_window and as violations."""
    clock = FrozenClock()
    windows = _windows(clock, limit=2)
    for _ in range(2):
        windows.admit("acc", "CreateImage")
    for _ in range(3):
        with pytest.raises(ApiError):
            windows.admit("acc", "CreateImage")
    assert windows.violations() == {"CreateImage": 3}
    assert windows.max_window("CreateImage") == 5


def test_accounts_are_separate() -> None:
    """Each account has its own windows; max_window can be asked per account."""
    clock = FrozenClock()
    windows = _windows(clock, limit=2)
    for account in ("a", "a", "b"):
        windows.admit(account, "CreateImage")
    assert (windows.max_window("CreateImage", "a"), windows.max_window("CreateImage", "b")) == (
        2,
        1,
    )
    assert windows.max_window("CreateImage") == 2
    assert windows.violations() == {}


def test_lifted_limit_still_counts() -> None:
    """With the limit lifted nothing is refused but the window counter still works."""
    clock = FrozenClock()
    windows = _windows(clock, limit=None)
    for _ in range(500):
        windows.admit("acc", "CreateImage")
    assert windows.max_window("CreateImage") == 500
    windows.set_limit("CreateImage", 10)
    with pytest.raises(ApiError):
        windows.admit("acc", "CreateImage")
