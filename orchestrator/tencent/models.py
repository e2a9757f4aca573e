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
    """A CreateImage success; `image_id` is None for the older API (seed 002): resolve by name."""

    image_id: str | None
    request_id: str
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class Image:
    image_id: str
    name: str
    state: str
    image_type: str
    created_time: datetime | None
    size_gib: int | None
    tags: tuple[Tag, ...] = ()
    description: str = ""

    def tag(self, key: str) -> str | None:
        """The value of one tag, if the image carries it."""
        return next((t.value for t in self.tags if t.key == key), None)


@dataclass(frozen=True, slots=True)
class ImagePage:
    images: list[Image]
    total_count: int
    request_id: str


@dataclass(frozen=True, slots=True)
class Instance:
    instance_id: str
    name: str
    state: str
    tags: tuple[Tag, ...] = ()
    data_disk_ids: tuple[str, ...] = field(default=())
    os_name: str = ""


@dataclass(frozen=True, slots=True)
class InstancePage:
    instances: list[Instance]
    total_count: int
    request_id: str
