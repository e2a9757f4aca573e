"""Turn the JSON `Response` objects of CVM actions into our typed models.

A field of the wrong shape means the answer did not come from a Tencent API we understand, so
decoding failures become the transient `InvalidResponse` error rather than a crash.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from orchestrator.tencent.errors import TencentError
from orchestrator.tencent.models import (
    Image,
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


def image(data: Json) -> Image:
    """One `Image` of a DescribeImages answer."""
    return Image(
        image_id=str(data["ImageId"]),
        name=_str(data.get("ImageName")),
        state=_str(data.get("ImageState")),
        image_type=_str(data.get("ImageType")),
        created_time=parse_time(data.get("CreatedTime")),
        size_gib=_opt_int(data.get("ImageSize")),
        tags=tags(data.get("Tags")),
        description=_str(data.get("ImageDescription")),
    )


def instance(data: Json) -> Instance:
    """One `Instance` of a DescribeInstances answer."""
    disks = data.get("DataDisks") or ()
    return Instance(
        instance_id=str(data["InstanceId"]),
        name=_str(data.get("InstanceName")),
        state=_str(data.get("InstanceState")),
        tags=tags(data.get("Tags")),
        data_disk_ids=tuple(str(d["DiskId"]) for d in disks if d.get("DiskId")),
        os_name=_str(data.get("OsName")),
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
