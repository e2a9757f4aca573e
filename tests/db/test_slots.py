"""Cron slots: computed on local wall time, each local time firing once across DST changes."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.policies import (
    Policy,
    latest_slot_at_or_before,
    next_slot_after,
    slots_between,
)


def policy(schedule: str, timezone: str = "UTC") -> Policy:
    """A minimal policy with this schedule."""
    return Policy(
        name="p",
        region="ap-guangzhou",
        schedule=schedule,
        timezone=timezone,
        instance_ids=("ins-1",),
    )


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    """An aware UTC datetime."""
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_slots_are_start_exclusive_end_inclusive() -> None:
    """(start, end]: a slot exactly at start is excluded, one exactly at end included."""
    slots = slots_between(policy("0 3 * * *"), utc(2024, 5, 1, 3), utc(2024, 5, 3, 3))
    assert slots == [utc(2024, 5, 2, 3), utc(2024, 5, 3, 3)]


def test_slots_follow_the_policy_timezone() -> None:
    """03:00 in Shanghai is 19:00 UTC the day before."""
    p = policy("0 3 * * *", "Asia/Shanghai")
    assert next_slot_after(p, utc(2024, 5, 1)) == utc(2024, 5, 1, 19)
    assert latest_slot_at_or_before(p, utc(2024, 5, 1)) == utc(2024, 4, 30, 19)


def test_skipped_local_time_fires_at_the_transition() -> None:
    """Berlin 2024-03-31 02:30 does not exist: it fires at 03:00 CEST (01:00 UTC)."""
    p = policy("30 2 * * *", "Europe/Berlin")
    slots = slots_between(p, utc(2024, 3, 29, 12), utc(2024, 4, 1, 12))
    assert slots == [utc(2024, 3, 30, 1, 30), utc(2024, 3, 31, 1), utc(2024, 4, 1, 0, 30)]


def test_skipped_times_collapse_into_one_slot() -> None:
    """New York 2024-03-10 02:00 and 02:30 both fall in the gap: one slot at 03:00 EDT."""
    p = policy("*/30 2 * * *", "America/New_York")
    slots = slots_between(p, utc(2024, 3, 10), utc(2024, 3, 10, 12))
    assert slots == [utc(2024, 3, 10, 7)]


def test_repeated_local_time_fires_once() -> None:
    """Berlin 2024-10-27 02:30 happens twice: one slot, at the first (CEST) occurrence."""
    p = policy("30 2 * * *", "Europe/Berlin")
    slots = slots_between(p, utc(2024, 10, 26, 12), utc(2024, 10, 27, 12))
    assert slots == [utc(2024, 10, 27, 0, 30)]


def test_hourly_across_fall_back_is_strictly_increasing() -> None:
    """Hourly slots across the fall-back hour stay unique and ordered."""
    p = policy("0 * * * *", "Europe/Berlin")
    slots = slots_between(p, utc(2024, 10, 26, 22), utc(2024, 10, 27, 3))
    assert slots == sorted(set(slots))
    assert utc(2024, 10, 27, 0) in slots
    assert utc(2024, 10, 27, 2) in slots


def test_latest_slot_includes_exact_time_and_next_excludes_it() -> None:
    """A slot exactly at `when` is the latest at-or-before, and next is strictly after."""
    p = policy("0 3 * * *")
    assert latest_slot_at_or_before(p, utc(2024, 5, 1, 3)) == utc(2024, 5, 1, 3)
    assert next_slot_after(p, utc(2024, 5, 1, 3)) == utc(2024, 5, 2, 3)


def test_naive_datetimes_are_refused() -> None:
    """Slot functions need aware datetimes; naive ones are a programming error."""
    with pytest.raises(ValueError, match="timezone-aware"):
        next_slot_after(policy("0 3 * * *"), datetime(2024, 5, 1))


ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Shanghai",
    "America/Santiago",
    "Pacific/Apia",
]
CRONS = ["0 3 * * *", "*/15 * * * *", "30 2 * * 0", "0 0 1 * *", "45 1,2,3 * * *"]


@settings(max_examples=150, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    cron=st.sampled_from(CRONS),
    when=st.datetimes(
        min_value=datetime(2010, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
    ),
)
def test_latest_and_next_bracket_any_instant(zone: str, cron: str, when: datetime) -> None:
    """latest <= when < next, and the only slot in (latest, next] is next."""
    p = policy(cron, zone)
    latest = latest_slot_at_or_before(p, when)
    upcoming = next_slot_after(p, when)
    assert latest <= when < upcoming
    assert latest.tzinfo is UTC
    assert upcoming.tzinfo is UTC
    assert slots_between(p, latest, upcoming) == [upcoming]
    assert next_slot_after(p, latest) == upcoming


@settings(max_examples=60, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    cron=st.sampled_from(CRONS),
    start=st.datetimes(
        min_value=datetime(2015, 1, 1), max_value=datetime(2025, 1, 1), timezones=st.just(UTC)
    ),
)
def test_slots_are_strictly_increasing(zone: str, cron: str, start: datetime) -> None:
    """Over any three days, slots are strictly increasing and inside the window."""
    end = start + timedelta(days=3)
    slots = slots_between(policy(cron, zone), start, end)
    assert all(a < b for a, b in itertools.pairwise(slots))
    assert all(start < s <= end for s in slots)
