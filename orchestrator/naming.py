"""Deterministic image names and the tags that mark an image as ours (docs/design.md#invariants, 1).

CreateImage has no idempotency token, so the name is the key: one name per (policy, instance,
slot), computed the same way by every process, before and after any crash.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from orchestrator.tencent.models import Tag

PREFIX = "cvmbk"
MAX_NAME = 60  # CreateImage answers InvalidParameter.ValueTooLarge beyond this
TAG_DEPLOYMENT = "cvm-backup:deployment"
TAG_POLICY = "cvm-backup:policy"
# Written by versions before deployments (one value per instance and per slot); read only, to
# recognise those images.
TAG_INSTANCE = "cvm-backup:instance"
TAG_SLOT = "cvm-backup:slot"
DEFAULT_DEPLOYMENT = "default"
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


def ours_tags(deployment: str, policy: str) -> dict[str, str]:
    """The tags every image we create carries: which installation made it, under which policy.

    Both values are bounded (deployments x policies), unlike a value per instance or slot, which
    would grow an account-wide tag resource without limit (tag values are capped per account).
    The instance and slot are in the exact name and the description.
    """
    return {TAG_DEPLOYMENT: deployment, TAG_POLICY: policy}


def _tag_map(tags: Iterable[Tag]) -> dict[str, str]:
    return {t.key: t.value for t in tags}


def is_ours(
    tags: Iterable[Tag],
    deployment: str,
    policy: str | None = None,
    *,
    instance_id: str | None = None,
    slot: datetime | None = None,
) -> bool:
    """True when the tags prove this deployment made the image (optionally under `policy`).

    Images made before deployments existed carry policy, instance and slot tags and no
    deployment tag: they count as the `default` deployment's, but only when every one of those
    tags is there (and, when given, matches the instance and slot). A bare policy tag is not proof.
    """
    found = _tag_map(tags)
    if policy is not None and found.get(TAG_POLICY) != policy:
        return False
    if TAG_POLICY not in found:
        return False
    if TAG_DEPLOYMENT in found:
        return found[TAG_DEPLOYMENT] == deployment
    return deployment == DEFAULT_DEPLOYMENT and _legacy_match(found, instance_id, slot)


def _legacy_match(found: dict[str, str], instance_id: str | None, slot: datetime | None) -> bool:
    if TAG_INSTANCE not in found or TAG_SLOT not in found:
        return False
    if instance_id is not None and found[TAG_INSTANCE] != instance_id:
        return False
    return slot is None or found[TAG_SLOT] == slot_stamp(slot)


def policy_of(tags: Iterable[Tag]) -> str | None:
    """The policy named by an image's tags, if any."""
    return _tag_map(tags).get(TAG_POLICY)


def description(policy: str, instance_id: str, slot: datetime) -> str:
    """A human-readable ImageDescription (max 256 characters)."""
    return f"cvm-backup policy {policy}, instance {instance_id}, slot {slot_stamp(slot)}"[:256]


_DESCRIPTION = re.compile(
    r"cvm-backup policy (?P<policy>[a-z0-9-]{1,20}), instance (?P<instance>ins-[a-z0-9]{1,32}),"
    r" slot (?P<slot>\d{8}T\d{4}Z)"
)


@dataclass(frozen=True, slots=True)
class Origin:
    """Which policy, instance and slot an image of ours was made for."""

    policy: str
    instance_id: str
    slot: datetime


def origin(name: str, description: str) -> Origin | None:
    """Policy, instance and slot of an image of ours, from its description, checked by its name.

    The name is the key (it must be exactly what `image_name` gives for the parsed origin), so a
    description copied onto another image does not make that image ours.
    """
    found = _DESCRIPTION.fullmatch(description[:256])
    if found is None:
        return None
    slot = datetime.strptime(found["slot"], _SLOT_FORMAT).replace(tzinfo=UTC)
    made = Origin(found["policy"], found["instance"], slot)
    return made if image_name(made.policy, made.instance_id, slot) == name else None
