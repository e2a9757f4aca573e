"""Images and instances in the exact JSON shapes of the real API (cvm v20170312 models)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.simulator.config import CLOUD_DISK_TYPE
from orchestrator.simulator.records import InstanceRecord, SimImage

Json = dict[str, Any]
SYSTEM_DISK_GIB = 50
DATA_DISK_GIB = 100


def tags_json(tags: Mapping[str, str]) -> list[Json]:
    """Tags as the API lists them."""
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def system_disk_id(record: InstanceRecord) -> str:
    """The instance's system disk id (derived from the instance id when not configured)."""
    return record.spec.system_disk_id or "disk-" + record.spec.instance_id.removeprefix("ins-")


def _snapshots(image: SimImage) -> list[Json]:
    suffix = image.image_id.removeprefix("img-")
    system = {"SnapshotId": f"snap-{suffix}", "DiskUsage": "SYSTEM_DISK", "DiskSize": 50}
    data = [
        {"SnapshotId": f"snap-{suffix}{n}", "DiskUsage": "DATA_DISK", "DiskSize": DATA_DISK_GIB}
        for n, _ in enumerate(image.data_disk_ids)
    ]
    return [system, *data]


def image_json(image: SimImage, now: float) -> Json:
    """One Image of a DescribeImages answer at monotonic `now` (a copy's SyncPercent)."""
    return {
        "ImageId": image.image_id,
        "OsName": "TencentOS Server 3.1 (TK4)",
        "ImageType": "PRIVATE_IMAGE",
        "CreatedTime": image.created_time,
        "ImageName": image.name,
        "ImageDescription": image.description,
        "ImageSize": SYSTEM_DISK_GIB,
        "Architecture": "x86_64",
        "ImageState": image.state,
        "Platform": "TencentOS",
        "ImageCreator": image.account,
        "ImageSource": "CREATE_IMAGE",
        "SyncPercent": image.sync_percent(now),
        "IsSupportCloudinit": True,
        "SnapshotSet": _snapshots(image),
        "Tags": tags_json(image.tags),
        "LicenseType": "TencentCloud",
        "ImageFamily": "",
        "ImageDeprecated": False,
    }


def _disk(disk_id: str, disk_type: str) -> Json:
    return {"DiskType": disk_type, "DiskId": disk_id, "DiskSize": DATA_DISK_GIB}


def _data_disks(record: InstanceRecord) -> list[Json] | None:
    spec = record.spec
    disks = [_disk(d, CLOUD_DISK_TYPE) for d in spec.data_disk_ids]
    disks += [_disk(d, spec.local_disk_type) for d in spec.local_data_disk_ids]
    # The real API answers null, not [], for an instance without data disks.
    return disks or None


def instance_json(record: InstanceRecord) -> Json:
    """One Instance of a DescribeInstances answer."""
    spec = record.spec
    return {
        "Placement": {"Zone": spec.zone, "ProjectId": 0},
        "InstanceId": spec.instance_id,
        "InstanceType": "S5.MEDIUM2",
        "CPU": 2,
        "Memory": 2,
        "RestrictState": "NORMAL",
        "InstanceName": spec.name,
        "InstanceChargeType": "POSTPAID_BY_HOUR",
        "SystemDisk": {
            "DiskType": CLOUD_DISK_TYPE,
            "DiskId": system_disk_id(record),
            "DiskSize": SYSTEM_DISK_GIB,
        },
        "DataDisks": _data_disks(record),
        "ImageId": "img-tencentos",
        "OsName": spec.os_name,
        "InstanceState": record.state,
        "Tags": tags_json(spec.tags),
        "CreatedTime": spec.created_time,
        "Uuid": spec.instance_id,
        "LatestOperation": None,
        "LatestOperationState": None,
        "LatestOperationRequestId": None,
        "DisableApiTermination": False,
    }
