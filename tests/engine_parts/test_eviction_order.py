"""Quota eviction order on generated regions: what may go, and in which order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import rotation
from orchestrator.rotation import LiveImage, eviction_order

BASE = datetime(2026, 1, 1, tzinfo=UTC)
STATES = ("NORMAL", "NORMAL", "NORMAL", "CREATING", "CREATEFAILED", "SYNCING")


@st.composite
def regions(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Image rows of one region: a few (policy, instance) pairs, mixed states, some pending."""
    entries = draw(
        st.lists(
            st.tuples(
                st.integers(1, 3),  # policy: 1 and 2 rotate, 3 fails on a full quota
                st.sampled_from(("ins-a", "ins-b", "ins-c")),
                st.integers(0, 60),  # age in days
                st.sampled_from(STATES),
                st.booleans() | st.just(False),  # delete already requested
            ),
            max_size=30,
        )
    )
    rules = {"timezone": "UTC", "keep_last": 2, "keep_daily": 0, "keep_weekly": 0}
    rules |= {"keep_monthly": 1, "keep_yearly": 0, "max_age_days": None}
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
            "on_quota": "fail" if policy == 3 else "rotate",
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


RANKS = {
    rotation.RANK_FAILED: 1,
    rotation.RANK_RELEASED: 2,
    rotation.RANK_OWN: 3,
    rotation.RANK_OTHER: 4,
}
REQUESTER = 1


def _kept(rows: list[dict[str, Any]]) -> set[str]:
    """Ids retention keeps, computed pair by pair the way the engine's rules say."""
    kept: set[str] = set()
    for group in _pairs(rows).values():
        images = [LiveImage.from_record(r) for r in group]
        decisions = rotation.decide_or_skip(group[0], images) or []
        kept |= {d.image_id for d in decisions if d.keep}
    return kept


def _pairs(rows: list[dict[str, Any]]) -> dict[tuple[int, str], list[dict[str, Any]]]:
    pairs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault((r["policy_id"], r["instance_id"]), []).append(r)
    return pairs


@settings(max_examples=300, deadline=None)
@given(regions())
def test_eviction_never_takes_the_newest_normal_nor_unfinished(rows: list[dict[str, Any]]) -> None:
    """Only settled NORMAL/CREATEFAILED images, never the newest NORMAL, each at most once."""
    order = eviction_order(rows, REQUESTER)
    ids = [image.image_id for image, _ in order]
    assert len(ids) == len(set(ids))
    assert not set(ids) & _newest_normal(rows)
    for image, _ in order:
        assert image.state in {"NORMAL", "CREATEFAILED"}
        assert image.delete_requested_at is None


@settings(max_examples=300, deadline=None)
@given(regions())
def test_eviction_goes_rank_by_rank(rows: list[dict[str, Any]]) -> None:
    """Ranks 1-4 in order; 1 and 2 oldest first; 3 and 4 round the instances, oldest first."""
    order = eviction_order(rows, REQUESTER)
    ranks = [RANKS[reason] for _, reason in order]
    assert ranks == sorted(ranks)
    for rank in (1, 2):
        ages = [
            (i.created_at, i.image_id) for (i, _), r in zip(order, ranks, strict=True) if r == rank
        ]
        assert ages == sorted(ages)
    for rank in (3, 4):
        taken = [i for (i, _), r in zip(order, ranks, strict=True) if r == rank]
        depth: dict[tuple[int, str], int] = {}
        depths = []
        for image in taken:
            key = (image.policy_id, image.instance_id)
            depths.append(depth.get(key, 0))
            depth[key] = depth.get(key, 0) + 1
        assert depths == sorted(
            depths
        )  # no instance loses a second image before the others a first
    failed = {
        r["image_id"] for r in rows if r["state"] == "CREATEFAILED" and not r["delete_requested_at"]
    }
    assert {i.image_id for (i, _), r in zip(order, ranks, strict=True) if r == 1} == failed


@settings(max_examples=300, deadline=None)
@given(regions())
def test_eviction_respects_policies(rows: list[dict[str, Any]]) -> None:
    """Rank 3 is the requester's, rank 4 other rotate policies'; a fail policy loses only what
    its retention lets go."""
    order = eviction_order(rows, REQUESTER)
    kept = _kept(rows)
    for image, reason in order:
        rank = RANKS[reason]
        if rank == 2:
            assert image.image_id not in kept
        if rank == 3:
            assert image.policy_id == REQUESTER
        if rank == 4:
            assert image.policy_id == 2
        if image.policy_id == 3:
            # Retention leaves CREATEFAILED images to rotation: those are failures, not backups.
            assert rank in (1, 2)
            assert rank == 1 or image.image_id not in kept


def test_a_bad_timezone_keeps_its_pair_out_of_retention_ranks() -> None:
    """A pair whose timezone zoneinfo does not know is never released by its rules."""
    row = {
        "image_id": "img-badtz001",
        "account": "default",
        "region": "ap-guangzhou",
        "policy_id": 3,
        "instance_id": "ins-a",
        "job_id": None,
        "state": "NORMAL",
        "delete_requested_at": None,
        "delete_reason": None,
        "on_quota": "fail",
        "timezone": "Mars/Olympus_Mons",
        "keep_last": 1,
        "keep_daily": 0,
        "keep_weekly": 0,
        "keep_monthly": 0,
        "keep_yearly": 0,
        "max_age_days": None,
    }
    rows = [
        {**row, "image_id": f"img-badtz{n:03d}", "created_at": BASE - timedelta(days=n)}
        for n in range(3)
    ]
    assert eviction_order(rows, REQUESTER) == []
