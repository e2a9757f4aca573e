"""Quota eviction order on generated regions: what may go, and in which order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.rotation import eviction_order

BASE = datetime(2026, 1, 1, tzinfo=UTC)
STATES = ("NORMAL", "NORMAL", "NORMAL", "CREATING", "CREATEFAILED", "SYNCING")


@st.composite
def regions(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Image rows of one region: a few (policy, instance) pairs, mixed states, some pending."""
    entries = draw(
        st.lists(
            st.tuples(
                st.integers(1, 2),  # policy
                st.sampled_from(("ins-a", "ins-b", "ins-c")),
                st.integers(0, 60),  # age in days
                st.sampled_from(STATES),
                st.booleans() | st.just(False),  # delete already requested
            ),
            max_size=30,
        )
    )
    rules = {"timezone": "UTC", "keep_last": 2, "keep_daily": 0, "keep_weekly": 0}
    rules |= {"keep_monthly": 0, "keep_yearly": 0, "max_age_days": None}
    return [
        {
            "image_id": f"img-{n:05d}",
            "account": "default",
            "region": "ap-guangzhou",
            "policy_id": policy,
            "instance_id": instance,
            "job_id": None,
            "state": state,
            "created_at": BASE - timedelta(days=age),
            "delete_requested_at": BASE if pending else None,
            "delete_reason": "earlier" if pending else None,
            **rules,
        }
        for n, (policy, instance, age, state, pending) in enumerate(entries)
    ]


def _newest_normal(rows: list[dict[str, Any]]) -> set[str]:
    """Ids of the newest settled NORMAL image of each (policy, instance)."""
    best: dict[tuple[int, str], dict[str, Any]] = {}
    for r in rows:
        if r["state"] != "NORMAL" or r["delete_requested_at"] is not None:
            continue
        key = (r["policy_id"], r["instance_id"])
        if key not in best or (r["created_at"], r["image_id"]) > (
            best[key]["created_at"],
            best[key]["image_id"],
        ):
            best[key] = r
    return {r["image_id"] for r in best.values()}


@settings(max_examples=300, deadline=None)
@given(regions())
def test_eviction_never_takes_the_newest_normal_nor_unfinished(rows: list[dict[str, Any]]) -> None:
    """Only settled NORMAL/CREATEFAILED images, never the newest NORMAL, each at most once."""
    order = eviction_order(rows)
    ids = [image.image_id for image, _, _ in order]
    assert len(ids) == len(set(ids))
    assert not set(ids) & _newest_normal(rows)
    for image, _, _ in order:
        assert image.state in {"NORMAL", "CREATEFAILED"}
        assert image.delete_requested_at is None


@settings(max_examples=300, deadline=None)
@given(regions())
def test_eviction_goes_failed_then_released_then_oldest(rows: list[dict[str, Any]]) -> None:
    """CREATEFAILED first, then retention's, then the optional rest, each group oldest first."""
    order = eviction_order(rows)
    kinds = [
        0 if image.state == "CREATEFAILED" else 1 if not optional else 2
        for image, _, optional in order
    ]
    assert kinds == sorted(kinds)
    for kind in (0, 1, 2):
        ages = [
            (i.created_at, i.image_id)
            for (i, _, _), k in zip(order, kinds, strict=True)
            if k == kind
        ]
        assert ages == sorted(ages)
    failed = {
        r["image_id"] for r in rows if r["state"] == "CREATEFAILED" and not r["delete_requested_at"]
    }
    assert {i.image_id for (i, _, _), k in zip(order, kinds, strict=True) if k == 0} == failed
