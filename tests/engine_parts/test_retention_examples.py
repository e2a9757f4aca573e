"""Retention on hand-picked histories: timezones, DST, ISO weeks, years, safety rules, reasons."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from orchestrator.retention import Candidate, Decision, Rules, decide, deletions

NOW = datetime(2027, 6, 1, tzinfo=UTC)


def img(image_id: str, iso: str, state: str = "NORMAL", *, ours: bool = True) -> Candidate:
    """A candidate created at an ISO time (with offset)."""
    return Candidate(image_id, datetime.fromisoformat(iso), state, ours)


def kept(decisions: list[Decision]) -> set[str]:
    """Ids of the kept images."""
    return {d.image_id for d in decisions if d.keep}


def by_id(decisions: list[Decision]) -> dict[str, Decision]:
    """Decisions keyed by image id."""
    return {d.image_id: d for d in decisions}


def test_daily_buckets_follow_the_policy_timezone() -> None:
    """17:00Z on the 20th is the 21st in Shanghai, so it shares a day with the 21st's image."""
    images = [
        img("a", "2026-11-20T15:00:00+00:00"),  # 23:00 on the 20th in Shanghai
        img("b", "2026-11-20T17:00:00+00:00"),  # 01:00 on the 21st in Shanghai
        img("c", "2026-11-21T03:00:00+00:00"),  # 11:00 on the 21st in Shanghai
    ]
    rules = Rules(keep_daily=2)
    assert kept(decide(rules, "Asia/Shanghai", NOW, images)) == {"a", "c"}
    assert kept(decide(rules, "UTC", NOW, images)) == {"b", "c"}


def test_fall_back_hour_is_one_calendar_day() -> None:
    """Both 01:30s of the New York fall-back night are the same day; the later one is kept."""
    images = [
        img("edt", "2026-11-01T01:30:00-04:00"),
        img("est", "2026-11-01T01:30:00-05:00"),
        img("before", "2026-10-31T23:00:00-04:00"),
    ]
    decisions = by_id(decide(Rules(keep_daily=2), "America/New_York", NOW, images))
    assert decisions["est"].reasons == ("newest NORMAL", "daily 2026-11-01")
    assert decisions["before"].reasons == ("daily 2026-10-31",)
    assert decisions["edt"].reasons == ("not selected by any rule",)


def test_spring_forward_day_is_one_bucket() -> None:
    """Berlin's 23-hour day still holds one daily bucket, in local time."""
    images = [
        img("late", "2026-03-29T23:30:00+02:00"),
        img("early", "2026-03-29T00:30:00+01:00"),
        img("prev", "2026-03-28T23:30:00+01:00"),
    ]
    assert kept(decide(Rules(keep_daily=2), "Europe/Berlin", NOW, images)) == {"late", "prev"}


def test_iso_week_spans_new_year() -> None:
    """2026-W53 runs Mon 28 Dec 2026 to Sun 3 Jan 2027; Monday 4 Jan starts 2027-W01."""
    images = [
        img("mon", "2026-12-28T10:00:00+00:00"),
        img("fri", "2027-01-01T10:00:00+00:00"),
        img("sun", "2027-01-03T10:00:00+00:00"),
        img("w01", "2027-01-04T10:00:00+00:00"),
    ]
    decisions = by_id(decide(Rules(keep_weekly=2), "UTC", NOW, images))
    assert kept(list(decisions.values())) == {"sun", "w01"}
    assert decisions["sun"].reasons == ("weekly 2026-W53",)


def test_week_boundary_in_local_time() -> None:
    """Sunday 23:30 in Shanghai is Sunday 15:30Z but Monday 00:30 in Tokyo: a new ISO week."""
    images = [img("sun", "2026-11-22T15:30:00+00:00"), img("sat", "2026-11-21T10:00:00+00:00")]
    assert kept(decide(Rules(keep_weekly=2), "Asia/Shanghai", NOW, images)) == {"sun"}
    assert kept(decide(Rules(keep_weekly=2), "Asia/Tokyo", NOW, images)) == {"sun", "sat"}


def test_yearly_and_monthly_buckets() -> None:
    """Yearly keeps the newest image of each recent year, monthly of each recent month."""
    images = [
        img("y24", "2024-12-31T08:00:00+00:00"),
        img("y25a", "2025-03-01T08:00:00+00:00"),
        img("y25b", "2025-12-31T17:00:00+00:00"),  # 2026-01-01 01:00 in Shanghai
        img("y26", "2026-02-01T08:00:00+00:00"),
    ]
    assert kept(decide(Rules(keep_yearly=2), "UTC", NOW, images)) == {"y26", "y25b"}
    assert kept(decide(Rules(keep_yearly=2), "Asia/Shanghai", NOW, images)) == {"y26", "y25a"}
    monthly = by_id(decide(Rules(keep_monthly=3), "UTC", NOW, images))
    assert kept(list(monthly.values())) == {"y26", "y25b", "y25a"}
    assert monthly["y25b"].reasons == ("monthly 2025-12",)


def test_rules_are_ored_and_reasons_name_each_rule() -> None:
    """One image kept by several rules lists them all; keep_last counts its position."""
    images = [img(f"d{day}", f"2026-11-{day:02d}T03:00:00+00:00") for day in range(10, 21)]
    decisions = by_id(decide(Rules(keep_last=3, keep_daily=2), "UTC", NOW, images))
    assert decisions["d20"].reasons == (
        "newest NORMAL",
        "keep_last 1/3",
        "daily 2026-11-20",
    )
    assert decisions["d18"].reasons == ("keep_last 3/3",)
    assert decisions["d17"].keep is False
    assert len(deletions(list(decisions.values()))) == 8


def test_max_age_overrides_rules_but_not_the_newest_normal() -> None:
    """Expired images go even when a rule keeps them; the newest NORMAL stays."""
    images = [img("old", "2025-01-01T00:00:00+00:00"), img("older", "2024-01-01T00:00:00+00:00")]
    decisions = by_id(decide(Rules(keep_last=5, max_age_days=400), "UTC", NOW, images))
    assert decisions["old"].keep
    assert decisions["older"].reasons == ("expired: older than max_age_days 400",)


def test_only_normal_images_fill_slots() -> None:
    """A newer CREATING or CREATEFAILED image neither takes a slot nor gets deleted."""
    images = [
        img("building", "2026-11-22T03:00:00+00:00", "CREATING"),
        img("failed", "2026-11-21T03:00:00+00:00", "CREATEFAILED"),
        img("weird", "2026-11-21T04:00:00+00:00", "SOMETHING_NEW"),
        img("good", "2026-11-20T03:00:00+00:00"),
        img("older", "2026-11-19T03:00:00+00:00"),
    ]
    decisions = by_id(decide(Rules(keep_last=1), "UTC", NOW, images))
    assert kept(list(decisions.values())) == {"building", "failed", "weird", "good"}
    assert decisions["good"].reasons == ("newest NORMAL", "keep_last 1/1")
    assert decisions["failed"].reasons == ("CREATEFAILED: left to the tracker and rotation",)
    assert decisions["building"].reasons == ("state CREATING: not deletable",)


def test_images_not_ours_are_never_candidates() -> None:
    """A foreign image is kept whatever its age, and takes no slot."""
    images = [
        img("foreign", "2026-11-22T03:00:00+00:00", ours=False),
        img("ancient-foreign", "2020-01-01T00:00:00+00:00", ours=False),
        img("mine", "2026-11-20T03:00:00+00:00"),
    ]
    decisions = by_id(decide(Rules(keep_last=1, max_age_days=30), "UTC", NOW, images))
    assert kept(list(decisions.values())) == {"foreign", "ancient-foreign", "mine"}
    assert decisions["foreign"].reasons == ("not ours: never a candidate",)


def test_no_keep_rules_keeps_everything_young_enough() -> None:
    """Without keep rules nothing goes but what max_age_days expires."""
    images = [img("a", "2027-05-01T00:00:00+00:00"), img("b", "2025-05-01T00:00:00+00:00")]
    assert kept(decide(Rules(), "UTC", NOW, images)) == {"a", "b"}
    assert kept(decide(Rules(max_age_days=100), "UTC", NOW, images)) == {"a"}


def test_ties_in_time_break_by_image_id() -> None:
    """Two images created in the same second: the larger id counts as newer."""
    images = [img("img-a", "2026-11-20T03:00:00+00:00"), img("img-b", "2026-11-20T03:00:00+00:00")]
    assert kept(decide(Rules(keep_last=1), "UTC", NOW, images)) == {"img-b"}


def test_naive_times_are_refused() -> None:
    """A time without a zone would land in the host's local buckets: it is an error."""
    with pytest.raises(ValueError, match="no timezone"):
        decide(Rules(keep_last=1), "UTC", NOW, [Candidate("x", datetime(2026, 1, 1), "NORMAL")])


def test_empty_history() -> None:
    """No images, no decisions."""
    assert decide(Rules(keep_last=1), "UTC", NOW, []) == []
