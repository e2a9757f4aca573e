"""The expected interval (RPO) a policy's schedule allows, and when an instance is overdue."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.policies import Policy
from orchestrator.rpo import expected_interval, is_overdue

HOUR = 3600.0
DAY = 24 * HOUR


def _policy(schedule: str, window: timedelta, timezone: str = "UTC") -> Policy:
    return Policy(
        name="p", region="ap-guangzhou", schedule=schedule, timezone=timezone,
        completion_window=window,
    )  # fmt: skip


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_daily_schedule_is_a_day_plus_the_window() -> None:
    """Daily at 03:00 with a 6 h window: 30 h, before and after the slot alike."""
    policy = _policy("0 3 * * *", timedelta(hours=6))
    for now in ("2024-05-08T02:00", "2024-05-08T08:59", "2024-05-08T09:01", "2024-05-08T23:00"):
        assert expected_interval(policy, _at(now)) == DAY + 6 * HOUR


@pytest.mark.parametrize(
    ("now", "days"),
    [
        ("2024-05-10T08:00", 1),  # Friday, its window open: Thursday's image, Friday next
        ("2024-05-10T12:00", 3),  # Friday's window closed: its image must last until Monday
        ("2024-05-11T12:00", 3),  # Saturday: still Friday's
        ("2024-05-13T08:00", 3),  # Monday before its window closed: still Friday's
        ("2024-05-13T10:00", 1),  # Monday's window closed: Tuesday is next
    ],
)
def test_weekday_schedule_follows_the_gap_after_the_closed_slot(now: str, days: int) -> None:
    """Mon-Fri 03:00, 6 h window: the gap after the newest closed slot, so no weekend alarm."""
    policy = _policy("0 3 * * 1-5", timedelta(hours=6))
    assert expected_interval(policy, _at(now)) == days * DAY + 6 * HOUR


def test_a_friday_image_is_never_overdue_over_the_weekend() -> None:
    """An image taken Friday 03:00 stays within the RPO until Monday's window closes."""
    policy = _policy("0 3 * * 1-5", timedelta(hours=6))
    friday = _at("2024-05-10T03:00").timestamp()
    for hours in range(7, 3 * 24 + 6):
        now = _at("2024-05-10T03:00") + timedelta(hours=hours)
        interval = expected_interval(policy, now)
        assert interval is not None
        assert not is_overdue(friday, now.timestamp(), interval), now
    late = _at("2024-05-13T09:00:01")
    interval = expected_interval(policy, late)
    assert interval is not None
    assert is_overdue(friday, late.timestamp(), interval)


def test_a_missed_daily_slot_is_overdue_once_its_window_closes() -> None:
    """Yesterday's image, today's job failed: overdue just after today's window closes."""
    policy = _policy("0 3 * * *", timedelta(hours=6))
    yesterday = _at("2024-05-07T03:00:05").timestamp()
    for now, late in (("2024-05-08T08:59", False), ("2024-05-08T09:00:06", True)):
        interval = expected_interval(policy, _at(now))
        assert interval is not None
        assert is_overdue(yesterday, _at(now).timestamp(), interval) is late


def test_dst_day_in_the_policy_timezone() -> None:
    """Across a spring-forward night the gap is 23 h of real time, as the slots are."""
    policy = _policy("0 3 * * *", timedelta(hours=1), timezone="Europe/Berlin")
    # Berlin springs forward on 2024-03-31 at 02:00: 03:00 on the 30th to 03:00 on the 31st.
    now = datetime(2024, 3, 30, 3, 30, tzinfo=UTC)
    assert expected_interval(policy, now) == 23 * HOUR + HOUR


def test_never_backed_up_is_overdue() -> None:
    """0 means no good image at all: overdue under any interval."""
    assert is_overdue(0.0, _at("2024-05-08T00:00").timestamp(), 400 * DAY)
