"""Deterministic image names and the tags that mark an image as ours (DESIGN §2, invariant 1).

CreateImage has no idempotency token, so the name is the key: one name per (policy, instance,
slot), computed the same way by every process, before and after any crash.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from orchestrator.tencent.models import Tag

PREFIX = "cvmbk"
MAX_NAME = 60  # CreateImage answers InvalidParameter.ValueTooLarge beyond this
TAG_POLICY = "cvm-backup:policy"
TAG_INSTANCE = "cvm-backup:instance"
TAG_SLOT = "cvm-backup:slot"
_SLOT_FORMAT = "%Y%m%dT%H%MZ"


def slot_stamp(slot: datetime) -> str:
    """The slot as `yyyymmddThhmmZ` in UTC; naive datetimes are refused."""
    if slot.tzinfo is None:
        raise ValueError("slot must be timezone-aware")
    return slot.astimezone(UTC).strftime(_SLOT_FORMAT)


def image_name(policy: str, instance_id: str, slot: datetime) -> str:
    """`cvmbk-<policy>-<instance-id>-<yyyymmddThhmmZ>`, at most 60 characters."""
    name = f"{PREFIX}-{policy}-{instance_id}-{slot_stamp(slot)}"
    if len(name) <= MAX_NAME:
        return name
    # Policy names are <= 20 and instance ids ~12 chars, so this only guards odd ids: keep the
    # name unique and stable by replacing the middle with a digest of what was cut.
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    stamp = slot_stamp(slot)
    head = f"{PREFIX}-{policy}-{instance_id}"[: MAX_NAME - len(stamp) - len(digest) - 2]
    return f"{head}-{digest}-{stamp}"


def ours_tags(policy: str, instance_id: str, slot: datetime) -> dict[str, str]:
    """The tags every image we create carries: they say which policy, instance and slot."""
    return {TAG_POLICY: policy, TAG_INSTANCE: instance_id, TAG_SLOT: slot_stamp(slot)}


def is_ours(tags: tuple[Tag, ...], policy: str | None = None) -> bool:
    """True when the tags mark an image as made by cvm-backup (optionally by one policy)."""
    found = {t.key: t.value for t in tags}
    if TAG_POLICY not in found or TAG_SLOT not in found:
        return False
    return policy is None or found[TAG_POLICY] == policy


def description(policy: str, instance_id: str, slot: datetime) -> str:
    """A human-readable ImageDescription (max 256 characters)."""
    return f"cvm-backup policy {policy}, instance {instance_id}, slot {slot_stamp(slot)}"[:256]
