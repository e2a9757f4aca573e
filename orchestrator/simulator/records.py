"""The records the simulator keeps: images, instances, deletions and calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from orchestrator.simulator.config import SimInstance

# States in which DeleteImages refuses an image (Chinese DeleteImages docstring); DELETING is
# refused too: a listed-but-deleting image must not be deleted again (docs/design.md#delete-delay).
UNDELETABLE = frozenset({"CREATING", "SYNCING", "IMPORTING", "DELETING"})
SYNCING = "SYNCING"


def iso(epoch: float) -> str:
    """Tencent's time form, `2026-11-23T10:00:00Z`."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class SimImage:
    """One custom image, alive or deleted.

    `ours` marks images made through the API (CreateImage, or SyncImages for a copy), not
    seeded. A copy names its source (`copy_of`, `copy_of_region`) and syncs from `sync_started`
    to `sync_until` (monotonic seconds); `syncing` counts the running syncs this image is the
    source of.
    """

    image_id: str
    name: str
    account: str
    region: str
    state: str
    created_time: str
    instance_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    ours: bool = True
    force_poweroff: str | None = None
    sysprep: str | None = None
    data_disk_ids: tuple[str, ...] = ()
    legacy: bool = False
    final_state: str = "NORMAL"
    deleted_time: str | None = None
    seq: int = 0
    copy_of: str | None = None
    copy_of_region: str = ""
    sync_started: float = 0.0
    sync_until: float = 0.0
    syncing: int = 0

    @property
    def alive(self) -> bool:
        """Whether the image still exists (was not deleted)."""
        return self.deleted_time is None

    def sync_percent(self, now: float) -> int | None:
        """Image.SyncPercent at monotonic `now`: a copy's progress, None for other images."""
        if self.copy_of is None:
            return None
        if self.state != SYNCING:
            return 100
        span = self.sync_until - self.sync_started
        done = (now - self.sync_started) / span if span > 0 else 1.0
        # 100 only once NORMAL: a SYNCING copy at 100% would be a contradiction to a reader.
        return max(0, min(99, int(100 * done)))

    def to_json(self) -> dict[str, Any]:
        """The inspection form (not the API form: see render.py)."""
        return {
            "image_id": self.image_id,
            "name": self.name,
            "account": self.account,
            "region": self.region,
            "state": self.state,
            "instance_id": self.instance_id,
            "tags": dict(self.tags),
            "ours": self.ours,
            "force_poweroff": self.force_poweroff,
            "sysprep": self.sysprep,
            "data_disk_ids": list(self.data_disk_ids),
            "legacy": self.legacy,
            "created": self.created_time,
            "deleted": self.deleted_time,
            "copy_of": (
                None
                if self.copy_of is None
                else {"image_id": self.copy_of, "region": self.copy_of_region}
            ),
            "syncing": self.syncing,
        }


@dataclass(slots=True)
class InstanceRecord:
    """An instance and what can change about it while the simulator runs."""

    spec: SimInstance
    state: str
    busy_until: float = 0.0
    creating: str | None = None
    # When a short-lived state (Simulator.set_instance_state with seconds) ends, 0 for none,
    # and the state it becomes then.
    revert_at: float = 0.0
    revert_to: str = "RUNNING"

    def visible_to(self, account: str, region: str) -> bool:
        """Whether an account sees this instance in a region."""
        owner = self.spec.account
        return self.spec.region == region and owner in (None, account)


@dataclass(frozen=True, slots=True)
class Deletion:
    """One image removed by DeleteImages."""

    image_id: str
    account: str
    delete_binded_snap: bool
    at: str

    def to_json(self) -> dict[str, Any]:
        """The inspection form."""
        return {
            "image_id": self.image_id,
            "account": self.account,
            "delete_binded_snap": self.delete_binded_snap,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True)
class Call:
    """One answered (or dropped) API call; `code` is "OK" for a success."""

    action: str
    account: str
    region: str
    code: str
    request_id: str
    t: float

    def to_json(self) -> dict[str, Any]:
        """The inspection form."""
        return {
            "action": self.action,
            "account": self.account,
            "region": self.region,
            "code": self.code,
            "request_id": self.request_id,
            "t": self.t,
        }
