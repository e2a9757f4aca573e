"""Retention on generated histories, checked against a straightforward reference implementation."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.retention import Candidate, Rules, decide

# Zones with DST (both hemispheres, half-hour shifts, transitions at midnight) and without.
ZONES = (
    "UTC",
    "Asia/Shanghai",
    "America/New_York",
    "Europe/Berlin",
    "Australia/Lord_Howe",
    "America/Sao_Paulo",
    "Asia/Kolkata",
)
STATES = ("NORMAL", "NORMAL", "NORMAL", "CREATING", "CREATEFAILED", "SYNCING", "USING")
# Sao Paulo still had DST (switching at midnight) in these years.
BASE = datetime(2017, 1, 1, tzinfo=UTC)
SPAN_SECONDS = 4 * 365 * 86400

counts = st.integers(min_value=0, max_value=6)
rules_strategy = st.builds(
    Rules,
    keep_last=counts,
    keep_daily=counts,
    keep_weekly=counts,
    keep_monthly=counts,
    keep_yearly=counts,
    max_age_days=st.none() | st.integers(min_value=1, max_value=1500),
)
# Mostly spread over years, sometimes clustered within hours of each other (same-day buckets).
offsets = st.integers(min_value=0, max_value=SPAN_SECONDS) | st.integers(
    min_value=SPAN_SECONDS // 2, max_value=SPAN_SECONDS // 2 + 3 * 86400
)


@st.composite
def histories(draw: st.DrawFn) -> list[Candidate]:
    """Images of one (policy, instance): mixed states, some not ours, ties in time allowed."""
    entries = draw(
        st.lists(
            st.tuples(offsets, st.sampled_from(STATES), st.booleans() | st.just(True)), max_size=40
        )
    )
    return [
        Candidate(f"img-{i:04d}", BASE + timedelta(seconds=off), state, ours)
        for i, (off, state, ours) in enumerate(entries)
    ]


def _key(c: Candidate) -> tuple[datetime, str]:
    return (c.created, c.image_id)


BUCKETS: tuple[tuple[str, Callable[[datetime], Hashable]], ...] = (
    ("keep_daily", lambda t: t.date()),
    ("keep_weekly", lambda t: tuple(t.isocalendar()[:2])),
    ("keep_monthly", lambda t: (t.year, t.month)),
    ("keep_yearly", lambda t: t.year),
)


def _selected_by_rules(rules: Rules, zone: ZoneInfo, normal: Sequence[Candidate]) -> set[str]:
    """Group by calendar bucket, take the newest image of the N latest buckets."""
    if not rules.has_keep_rule():
        return {c.image_id for c in normal}
    chosen = {c.image_id for c in sorted(normal, key=_key, reverse=True)[: rules.keep_last]}
    for field, label in BUCKETS:
        groups: dict[Hashable, list[Candidate]] = defaultdict(list)
        for c in normal:
            groups[label(c.created.astimezone(zone))].append(c)
        latest = sorted(groups, key=lambda k: max(map(_key, groups[k])), reverse=True)
        chosen |= {max(groups[k], key=_key).image_id for k in latest[: getattr(rules, field)]}
    return chosen


def reference_kept(
    rules: Rules, timezone: str, now: datetime, images: Sequence[Candidate]
) -> set[str]:
    """The ids an independent, obvious implementation keeps."""
    normal = [c for c in images if c.ours and c.state == "NORMAL"]
    untouchable = {c.image_id for c in images} - {c.image_id for c in normal}
    if not normal:
        return untouchable
    kept = _selected_by_rules(rules, ZoneInfo(timezone), normal)
    if rules.max_age_days is not None:
        cutoff = now - timedelta(days=rules.max_age_days)
        kept = {c.image_id for c in normal if c.image_id in kept and c.created >= cutoff}
    return kept | untouchable | {max(normal, key=_key).image_id}


now_strategy = st.integers(min_value=SPAN_SECONDS, max_value=SPAN_SECONDS + 400 * 86400).map(
    lambda s: BASE + timedelta(seconds=s)
)


@settings(max_examples=400, deadline=None)
@given(rules_strategy, st.sampled_from(ZONES), now_strategy, histories())
def test_keeps_exactly_what_the_rules_select(
    rules: Rules, tz: str, now: datetime, images: list[Candidate]
) -> None:
    """The kept set equals the reference implementation's on any history."""
    decisions = decide(rules, tz, now, images)
    assert sorted(d.image_id for d in decisions) == sorted(c.image_id for c in images)
    assert {d.image_id for d in decisions if d.keep} == reference_kept(rules, tz, now, images)


@settings(max_examples=400, deadline=None)
@given(rules_strategy, st.sampled_from(ZONES), now_strategy, histories())
def test_never_deletes_newest_normal_nor_foreign_nor_unfinished(
    rules: Rules, tz: str, now: datetime, images: list[Candidate]
) -> None:
    """Deletes only our NORMAL images, and never the newest of them."""
    by_id = {c.image_id: c for c in images}
    normal = [c for c in images if c.ours and c.state == "NORMAL"]
    newest = max(normal, key=_key).image_id if normal else None
    for d in decide(rules, tz, now, images):
        assert d.reasons, d
        if not d.keep:
            assert by_id[d.image_id].ours
            assert by_id[d.image_id].state == "NORMAL"
            assert d.image_id != newest


@settings(max_examples=200, deadline=None)
@given(rules_strategy, st.sampled_from(ZONES), now_strategy, histories(), st.randoms())
def test_input_order_does_not_matter(
    rules: Rules, tz: str, now: datetime, images: list[Candidate], rnd: object
) -> None:
    """Shuffling the candidates changes no decision."""
    shuffled = list(images)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert decide(rules, tz, now, shuffled) == decide(rules, tz, now, images)
