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


def _tags(**pairs: str) -> tuple[Tag, ...]:
    return tuple(Tag(k, v) for k, v in pairs.items())


def test_ours_tags_round_trip() -> None:
    """The tags we put on an image are what `is_ours` recognises, per deployment and policy."""
    tags = tuple(Tag(k, v) for k, v in naming.ours_tags("prod", "web").items())
    assert naming.is_ours(tags, "prod")
    assert naming.is_ours(tags, "prod", "web")
    assert not naming.is_ours(tags, "prod", "db")
    assert not naming.is_ours(tags, "staging", "web")
    assert not naming.is_ours((Tag("owner", "someone-else"),), "prod")


def test_tag_values_are_bounded_by_deployments_and_policies() -> None:
    """No tag value depends on the instance or the slot (tag values are an account-wide limit)."""
    assert naming.ours_tags("default", "web") == {
        naming.TAG_DEPLOYMENT: "default",
        naming.TAG_POLICY: "web",
    }


def test_a_bare_policy_tag_is_not_proof_of_ownership() -> None:
    """An image tagged only cvm-backup:policy (by hand, or a copy) is nobody's we know."""
    assert not naming.is_ours(_tags(**{naming.TAG_POLICY: "web"}), "default", "web")


def test_images_made_before_deployments_count_as_the_default_deployments() -> None:
    """Old images (policy, instance and slot tags) are the default deployment's, when they match."""
    old = _tags(
        **{
            naming.TAG_POLICY: "web",
            naming.TAG_INSTANCE: "ins-1",
            naming.TAG_SLOT: "20261123T0300Z",
        }
    )
    assert naming.is_ours(old, "default", "web", instance_id="ins-1", slot=SLOT)
    assert not naming.is_ours(old, "default", "web", instance_id="ins-2", slot=SLOT)
    assert not naming.is_ours(old, "prod", "web", instance_id="ins-1", slot=SLOT)


def test_origin_is_read_from_the_description_and_checked_by_the_name() -> None:
    """Reconciliation learns policy, instance and slot from an image, only if its name agrees."""
    name = naming.image_name("web", "ins-1", SLOT)
    text = naming.description("web", "ins-1", SLOT)
    assert naming.origin(name, text) == naming.Origin("web", "ins-1", SLOT)
    assert naming.origin("my-own-copy", text) is None
    assert naming.origin(name, "hand made") is None


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
