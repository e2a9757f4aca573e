"""Typed results of the CVM actions cvm-backup uses (a subset of the SDK's models)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

Json = dict[str, Any]


def parse_time(value: str | None) -> datetime | None:
    """Parse Tencent timestamps: both `...Z` and `...+00:00` forms occur in real answers."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class Tag:
    key: str
    value: str


@dataclass(frozen=True, slots=True)
class Filter:
    """A DescribeImages / DescribeInstances filter: Values are ORed, Filters are ANDed."""

    name: str
    values: tuple[str, ...]

    def to_json(self) -> Json:
        return {"Name": self.name, "Values": list(self.values)}


@dataclass(frozen=True, slots=True)
class CreateImageResult:
    """A CreateImage success; `image_id` is None for the older API: resolve by name.

    docs/design.md#the-older-createimage-answer.
    """

    image_id: str | None
    request_id: str
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class ImageCopy:
    """One copy a SyncImages call started: its image id in the destination region."""

    region: str
    image_id: str


@dataclass(frozen=True, slots=True)
class SyncImagesResult:
    """A SyncImages success: the copies' ids per destination, or none of them.

    The ids come back at once while each copy runs on (SYNCING, then NORMAL, in its region).
    `copies` is empty for a DryRun, and for an API that answers without `ImageSet` (before
    `ImageSetRequired`, SDK 1.0.547, or when a region is left out of it): then the caller finds
    the copy by its exact name in the destination (`CvmClient.find_images_by_name`), the same
    look-up that resolves a lost answer, so name copies deterministically.
    """

    copies: tuple[ImageCopy, ...]
    request_id: str
    dry_run: bool = False

    def image_id(self, region: str) -> str | None:
        """The copy's image id in `region`, None when the answer did not say."""
        return next((c.image_id for c in self.copies if c.region == region), None)


@dataclass(frozen=True, slots=True)
class Image:
    image_id: str
    name: str
    state: str  # CREATING, NORMAL, CREATEFAILED, SYNCING (a copy on its way), ...; see decode
    image_type: str
    created_time: datetime | None
    size_gib: int | None
    tags: tuple[Tag, ...] = ()
    description: str = ""
    # How far a SYNCING copy has come, 0-100; None when the API does not say (most images).
    sync_percent: int | None = None

    def tag(self, key: str) -> str | None:
        """The value of one tag, if the image carries it."""
        return next((t.value for t in self.tags if t.key == key), None)


@dataclass(frozen=True, slots=True)
class ImagePage:
    images: list[Image]
    total_count: int
    request_id: str


# CreateImage takes only cloud disks in DataDiskIds; local ones (LOCAL_BASIC, LOCAL_SSD,
# `ldisk-...`) answer InvalidParameter.LocalDataDiskNotSupport (docs/design.md#local-disks).
CLOUD_DISK_PREFIX = "CLOUD_"


@dataclass(frozen=True, slots=True)
class DataDisk:
    """One data disk of an instance, as DescribeInstances lists it."""

    disk_id: str
    disk_type: str  # CLOUD_PREMIUM, CLOUD_SSD, LOCAL_BASIC, ...; "" when the answer omits it

    @property
    def imageable(self) -> bool:
        """Whether CreateImage accepts the disk (an untyped one is tried: the API decides)."""
        return not self.disk_type or self.disk_type.startswith(CLOUD_DISK_PREFIX)

    @property
    def why_left_out(self) -> str:
        """Why a disk that is not imageable stays out of a whole-machine image."""
        kind = "a local disk" if self.disk_type.startswith("LOCAL_") else "not a cloud disk"
        return f"{kind} ({self.disk_type}): CreateImage images CLOUD_* data disks only"


@dataclass(frozen=True, slots=True)
class Instance:
    instance_id: str
    name: str
    state: str
    tags: tuple[Tag, ...] = ()
    # The data disks a whole-machine image includes (DataDiskIds): the cloud ones only.
    data_disk_ids: tuple[str, ...] = field(default=())
    os_name: str = ""
    # The data disks left out of it (local disks), with their types: `plan` says why.
    left_out_disks: tuple[DataDisk, ...] = ()

    @property
    def local_disk_ids(self) -> tuple[str, ...]:
        """Ids of the data disks a whole-machine image leaves out."""
        return tuple(d.disk_id for d in self.left_out_disks)


@dataclass(frozen=True, slots=True)
class InstancePage:
    instances: list[Instance]
    total_count: int
    request_id: str
