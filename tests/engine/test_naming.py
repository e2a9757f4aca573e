"""Deterministic image names, our tags, and the backoff schedule."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from orchestrator import backoff, naming
from orchestrator.config import RetrySettings
from orchestrator.tencent.errors import ErrorClass
from orchestrator.tencent.models import Tag

SLOT = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)


def test_name_is_deterministic_and_uses_the_utc_slot() -> None:
    """The same (policy, instance, slot) always gives the same name, whatever the tz shown."""
    shanghai = SLOT.astimezone(timezone(timedelta(hours=8)))
    assert naming.image_name("web-nightly", "ins-6pb6lrmy", SLOT) == (
        "cvmbk-web-nightly-ins-6pb6lrmy-20261123T0300Z"
    )
    assert naming.image_name("web-nightly", "ins-6pb6lrmy", shanghai) == naming.image_name(
        "web-nightly", "ins-6pb6lrmy", SLOT
    )


def test_longest_names_fit_in_sixty_characters_and_stay_unique() -> None:
    """A 20-char policy and an unusually long instance id still fit, without collisions."""
    long_a = "ins-" + "a" * 32
    long_b = "ins-" + "a" * 31 + "b"
    a = naming.image_name("p" * 20, long_a, SLOT)
    b = naming.image_name("p" * 20, long_b, SLOT)
    assert len(a) <= naming.MAX_NAME
    assert len(b) <= naming.MAX_NAME
    assert a != b
    assert a.endswith("-20261123T0300Z")


def test_naive_slot_is_refused() -> None:
    """A slot without a timezone would name images differently on differently set hosts."""
    with pytest.raises(ValueError, match="timezone-aware"):
        naming.image_name("p", "ins-1", SLOT.replace(tzinfo=None))


def test_ours_tags_round_trip() -> None:
    """The tags we put on an image are what `is_ours` recognises, per policy."""
    tags = tuple(Tag(k, v) for k, v in naming.ours_tags("web", "ins-1", SLOT).items())
    assert naming.is_ours(tags)
    assert naming.is_ours(tags, "web")
    assert not naming.is_ours(tags, "db")
    assert not naming.is_ours((Tag("owner", "someone-else"),))


def test_backoff_doubles_under_a_cap_with_full_jitter_and_respects_the_window() -> None:
    """Delays stay within [0, min(cap, base*2^(n-1))] and never pass the deadline."""
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(10.0, 0.5 * 2 ** (attempt - 1))
        draws = [backoff.delay(attempt, 0.5, 10.0, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8
    deadline = SLOT + timedelta(seconds=1)
    assert backoff.next_attempt(SLOT, 10, 60.0, 600.0, deadline) <= deadline


def test_busy_instances_wait_longer_than_transient_errors() -> None:
    """Each error class starts from its own configured base."""
    retry = RetrySettings(transient_base=1.0, busy_base=15.0, throttle_delay=0.5)
    assert backoff.base_for(ErrorClass.BUSY, retry) == 15.0
    assert backoff.base_for(ErrorClass.TRANSIENT, retry) == 1.0
    assert backoff.base_for(ErrorClass.THROTTLED, retry) == 0.5
