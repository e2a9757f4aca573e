"""The official SDK and our client read the same answers to the same values."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException
from tencentcloud.cvm.v20170312 import models as sdk_models
from tencentcloud.cvm.v20170312.cvm_client import CvmClient as SdkCvmClient

from orchestrator.tencent.client import CvmClient
from orchestrator.tencent.errors import TencentError
from orchestrator.tencent.models import Image, Instance
from tests.tencent import fake_api as f
from tests.tencent.sdk_oracle import sdk_client

IMAGES = [
    {
        "ImageId": "img-0yc6rie8",
        "ImageName": "cvmbk-web-ins-1-20240501T0300Z",
        "ImageDescription": "夜间备份",
        "ImageState": "NORMAL",
        "ImageType": "PRIVATE_IMAGE",
        "CreatedTime": "2020-09-22T00:00:00+00:00",
        "ImageSize": 50,
        "Architecture": "x86_64",
        "OsName": "TencentOS Server 3.1",
        "Tags": [{"Key": "cvm-backup", "Value": "web"}, {"Key": "slot", "Value": ""}],
        "SnapshotSet": [{"SnapshotId": "snap-1", "DiskUsage": "SYSTEM_DISK", "DiskSize": 50}],
        "SomeFieldTheSdkDoesNotKnow": 1,
    },
    {
        "ImageId": "img-2",
        "ImageName": "creating",
        "ImageState": "CREATING",
        "ImageType": "PRIVATE_IMAGE",
        "CreatedTime": "2022-03-21T08:41:45Z",
        "ImageSize": None,
        "Tags": None,
    },
]

INSTANCES = [
    {
        "InstanceId": "ins-6pb6lrmy",
        "InstanceName": "web-1",
        "InstanceState": "RUNNING",
        "OsName": "CentOS 7.9",
        "Tags": [{"Key": "backup", "Value": "nightly"}],
        "DataDisks": [{"DiskId": "disk-a", "DiskSize": 100}, {"DiskId": "disk-b"}],
        "LatestOperation": None,
    },
    {"InstanceId": "ins-2", "InstanceName": "", "InstanceState": "STOPPED", "DataDisks": None},
]


def _serve(fake: f.FakeApi, action: str, response: dict[str, Any]) -> None:
    body = {"Response": {**response, "RequestId": "req-canned-1"}}
    fake.defaults[action] = f.raw(json.dumps(body).encode())


def _error_body(code: str, message: str) -> bytes:
    error = {"Error": {"Code": code, "Message": message}, "RequestId": "req-canned-2"}
    return json.dumps({"Response": error}).encode()


@pytest.fixture
def sdk(fake: f.FakeApi) -> Iterator[SdkCvmClient]:
    """The official sync client pointed at the fake over plain http."""
    client = sdk_client(fake.url.removeprefix("http://"), protocol="http")
    yield client
    client.request.conn._session.close()


async def _sdk_call(sdk: SdkCvmClient, action: str, **fields: Any) -> Any:
    request = getattr(sdk_models, f"{action}Request")()
    request._deserialize(fields)
    method: Callable[[Any], Any] = getattr(sdk, action)
    return await asyncio.to_thread(method, request)


def _same_image(ours: Image, theirs: Any) -> None:
    assert ours.image_id == theirs.ImageId
    assert ours.name == theirs.ImageName
    assert ours.state == theirs.ImageState
    assert ours.image_type == theirs.ImageType
    assert ours.size_gib == theirs.ImageSize
    assert ours.description == (theirs.ImageDescription or "")
    assert ours.created_time == datetime.fromisoformat(theirs.CreatedTime)
    assert [(t.key, t.value) for t in ours.tags] == [(t.Key, t.Value) for t in theirs.Tags or ()]


def _same_instance(ours: Instance, theirs: Any) -> None:
    assert ours.instance_id == theirs.InstanceId
    assert ours.name == theirs.InstanceName
    assert ours.state == theirs.InstanceState
    assert ours.os_name == (theirs.OsName or "")
    assert [(t.key, t.value) for t in ours.tags] == [(t.Key, t.Value) for t in theirs.Tags or ()]
    assert list(ours.data_disk_ids) == [d.DiskId for d in theirs.DataDisks or ()]


async def test_describe_images_same_values(
    client: CvmClient, fake: f.FakeApi, sdk: SdkCvmClient
) -> None:
    """DescribeImages decodes to the same images, count and request id."""
    _serve(fake, "DescribeImages", {"ImageSet": IMAGES, "TotalCount": 2})
    ours = await client.describe_images("ap-guangzhou")
    theirs = await _sdk_call(sdk, "DescribeImages", Limit=100)
    assert (ours.total_count, ours.request_id) == (theirs.TotalCount, theirs.RequestId)
    assert len(ours.images) == len(theirs.ImageSet) == 2
    for mine, sdks in zip(ours.images, theirs.ImageSet, strict=True):
        _same_image(mine, sdks)


async def test_describe_instances_same_values(
    client: CvmClient, fake: f.FakeApi, sdk: SdkCvmClient
) -> None:
    """DescribeInstances decodes to the same instances, tags and data disks."""
    _serve(fake, "DescribeInstances", {"InstanceSet": INSTANCES, "TotalCount": 2})
    ours = await client.describe_instances("ap-guangzhou")
    theirs = await _sdk_call(sdk, "DescribeInstances")
    assert (ours.total_count, ours.request_id) == (theirs.TotalCount, theirs.RequestId)
    for mine, sdks in zip(ours.instances, theirs.InstanceSet, strict=True):
        _same_instance(mine, sdks)


@pytest.mark.parametrize("fields", [{"ImageId": "img-new"}, {}])
async def test_create_image_same_values(
    client: CvmClient, fake: f.FakeApi, sdk: SdkCvmClient, fields: dict[str, Any]
) -> None:
    """CreateImage: the same ImageId (or the same absence of one, the older API) and request id."""
    _serve(fake, "CreateImage", fields)
    ours = await client.create_image("ap-guangzhou", instance_id="ins-1", name="n")
    theirs = await _sdk_call(sdk, "CreateImage", InstanceId="ins-1", ImageName="n")
    assert (ours.image_id, ours.request_id) == (theirs.ImageId, theirs.RequestId)


async def test_quota_same_value(client: CvmClient, fake: f.FakeApi, sdk: SdkCvmClient) -> None:
    """DescribeImageQuota: the same quota."""
    _serve(fake, "DescribeImageQuota", {"ImageNumQuota": 20})
    theirs = await _sdk_call(sdk, "DescribeImageQuota")
    assert await client.describe_image_quota("ap-guangzhou") == theirs.ImageNumQuota == 20


@pytest.mark.parametrize(
    "step",
    [
        f.raw(_error_body("InvalidInstanceId.NotFound", "实例不存在")),
        f.raw(_error_body("DryRunOperation", "would have succeeded")),
        f.http(503),
    ],
)
async def test_errors_same_code_message_request_id(
    client: CvmClient, fake: f.FakeApi, sdk: SdkCvmClient, step: f.Step
) -> None:
    """Error answers raise the same code, message and request id in both clients."""
    fake.defaults["DeleteImages"] = step
    with pytest.raises(TencentCloudSDKException) as sdk_info:
        await _sdk_call(sdk, "DeleteImages", ImageIds=["img-1"])
    with pytest.raises(TencentError) as our_info:
        await client.call("DeleteImages", "ap-guangzhou", {"ImageIds": ["img-1"]})
    theirs, ours = sdk_info.value, our_info.value
    assert ours.code == theirs.get_code()
    if theirs.get_code() != "ServerNetworkError":  # the SDK's message is then the raw body
        assert (ours.message, ours.request_id) == (theirs.get_message(), theirs.get_request_id())
