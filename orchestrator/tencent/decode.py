"""Turn the JSON `Response` objects of CVM actions into our typed models.

A field of the wrong shape means the answer did not come from a Tencent API we understand, so
decoding failures become the transient `InvalidResponse` error rather than a crash.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from orchestrator.tencent.errors import TencentError
from orchestrator.tencent.models import (
    DataDisk,
    Image,
    ImageCopy,
    ImagePage,
    Instance,
    InstancePage,
    Json,
    Tag,
    parse_time,
)

T = TypeVar("T")


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def tags(items: Any) -> tuple[Tag, ...]:
    """Tags from a `[{"Key", "Value"}]` list (None counts as no tags)."""
    return tuple(Tag(str(t["Key"]), _str(t.get("Value"))) for t in items or ())


# What a state we cannot read becomes: recordable (the images table takes [A-Z_]+), never
# deletable and never "ready", so a job with such an image keeps waiting instead of failing.
UNKNOWN_STATE = "UNKNOWN"
_STATE_RE = re.compile(r"[A-Z][A-Z_]{0,31}")


def image_state(value: Any) -> str:
    """An ImageState normalised for every reader: upper-case letters and '_', else UNKNOWN."""
    text = value.strip().upper() if isinstance(value, str) else ""
    return text if _STATE_RE.fullmatch(text) else UNKNOWN_STATE


MAX_PERCENT = 100


def sync_percent(value: Any) -> int | None:
    """Image.SyncPercent: 0-100, else None (it is informational: never fail a page on it)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        percent = int(value)
    except ValueError:
        return None
    return percent if 0 <= percent <= MAX_PERCENT else None


def image(data: Json) -> Image:
    """One `Image` of a DescribeImages answer."""
    return Image(
        image_id=str(data["ImageId"]),
        name=_str(data.get("ImageName")),
        state=image_state(data.get("ImageState")),
        image_type=_str(data.get("ImageType")),
        created_time=parse_time(data.get("CreatedTime")),
        size_gib=_opt_int(data.get("ImageSize")),
        tags=tags(data.get("Tags")),
        description=_str(data.get("ImageDescription")),
        sync_percent=sync_percent(data.get("SyncPercent")),
    )


def data_disks(items: Any) -> tuple[DataDisk, ...]:
    """The `DataDisks` of an instance that have an id, each with its `DiskType`."""
    return tuple(
        DataDisk(str(d["DiskId"]), _str(d.get("DiskType"))) for d in items or () if d.get("DiskId")
    )


def instance(data: Json) -> Instance:
    """One `Instance` of a DescribeInstances answer; local data disks are kept apart."""
    disks = data_disks(data.get("DataDisks"))
    return Instance(
        instance_id=str(data["InstanceId"]),
        name=_str(data.get("InstanceName")),
        state=_str(data.get("InstanceState")),
        tags=tags(data.get("Tags")),
        data_disk_ids=tuple(d.disk_id for d in disks if d.imageable),
        os_name=_str(data.get("OsName")),
        left_out_disks=tuple(d for d in disks if not d.imageable),
    )


def image_page(response: Json) -> ImagePage:
    """A DescribeImages answer."""
    return ImagePage(
        images=[image(i) for i in response.get("ImageSet") or ()],
        total_count=int(response.get("TotalCount") or 0),
        request_id=str(response["RequestId"]),
    )


def instance_page(response: Json) -> InstancePage:
    """A DescribeInstances answer."""
    return InstancePage(
        instances=[instance(i) for i in response.get("InstanceSet") or ()],
        total_count=int(response.get("TotalCount") or 0),
        request_id=str(response["RequestId"]),
    )


def sync_images(response: Json) -> tuple[ImageCopy, ...]:
    """The `ImageSet` of a SyncImages answer; absent or null (older APIs) is no copies.

    A pair without an id or a region is left out: that copy is found by name instead.
    """
    pairs = ((c.get("Region"), c.get("ImageId")) for c in response.get("ImageSet") or ())
    return tuple(
        ImageCopy(region=str(region), image_id=str(image_id))
        for region, image_id in pairs
        if region and image_id
    )


def checked(action: str, decode: Callable[[Json], T], response: Json) -> T:
    """`decode(response)`, with any shape error reported as `InvalidResponse`."""
    try:
        return decode(response)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TencentError(
            "InvalidResponse",
            f"{action}: unexpected answer shape ({type(exc).__name__}: {exc})",
            response.get("RequestId") if isinstance(response, dict) else None,
        ) from None
