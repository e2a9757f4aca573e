"""Our client and the official SDK decode the same simulator answers to the same values."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.client import CvmClient
from orchestrator.tencent.credentials import Credentials, StaticCredentials
from orchestrator.tencent.errors import TencentError
from orchestrator.tencent.models import Filter, parse_time
from tests.fixtures.sim import TEST_REGION, TEST_SECRET_ID, TEST_SECRET_KEY
from tests.simulator.helpers import sdk_call, sdk_client


@pytest.fixture
async def ours(simulator: Simulator) -> AsyncIterator[CvmClient]:
    """Our client pointed at the simulator."""
    creds = StaticCredentials(Credentials(TEST_SECRET_ID, TEST_SECRET_KEY))
    async with CvmClient(credentials=creds, endpoint=simulator.url) as client:
        yield client


def _sdk_tags(item: dict[str, Any]) -> set[tuple[str, str]]:
    return {(t["Key"], t["Value"]) for t in item.get("Tags") or []}


async def test_images_decode_alike(simulator: Simulator, ours: CvmClient) -> None:
    """DescribeImages: ids, names, states, types, times, sizes and tags agree, image by image."""
    before = (await ours.describe_images(TEST_REGION, limit=1)).total_count
    instance = (await ours.describe_instances(TEST_REGION, limit=1)).instances[0].instance_id
    await ours.create_image(TEST_REGION, instance_id=instance, name="parity-1", tags={"k": "v"})
    page = await ours.describe_images(
        TEST_REGION, filters=[Filter("image-type", ("PRIVATE_IMAGE",))]
    )
    sdk = await sdk_call(
        sdk_client(simulator),
        "DescribeImages",
        {"Filters": [{"Name": "image-type", "Values": ["PRIVATE_IMAGE"]}], "Limit": 100},
    )
    assert page.total_count == sdk["TotalCount"] == before + 1
    theirs = {i["ImageId"]: i for i in sdk["ImageSet"]}
    assert {i.image_id for i in page.images} == set(theirs)
    for image in page.images:
        other = theirs[image.image_id]
        assert (image.name, image.state, image.image_type) == (
            other["ImageName"],
            other["ImageState"],
            other["ImageType"],
        )
        assert image.created_time == parse_time(other["CreatedTime"])
        assert image.size_gib == other["ImageSize"]
        assert {(t.key, t.value) for t in image.tags} == _sdk_tags(other)


async def test_instances_decode_alike(simulator: Simulator, ours: CvmClient) -> None:
    """DescribeInstances: ids, names, states and tags agree."""
    page = await ours.describe_instances(TEST_REGION)
    sdk = await sdk_call(sdk_client(simulator), "DescribeInstances", {"Limit": 100})
    assert page.total_count == sdk["TotalCount"]
    theirs = {i["InstanceId"]: i for i in sdk["InstanceSet"]}
    for instance in page.instances:
        other = theirs[instance.instance_id]
        assert (instance.name, instance.state) == (other["InstanceName"], other["InstanceState"])
        assert {(t.key, t.value) for t in instance.tags} == _sdk_tags(other)


async def test_quota_and_errors_decode_alike(simulator: Simulator, ours: CvmClient) -> None:
    """DescribeImageQuota agrees, and an error carries the same code and message in both."""
    sdk = sdk_client(simulator)
    quota = await sdk_call(sdk, "DescribeImageQuota")
    assert await ours.describe_image_quota(TEST_REGION) == quota["ImageNumQuota"]
    with pytest.raises(TencentError) as info:
        await ours.create_image(TEST_REGION, instance_id="ins-missing0", name="parity-x")
    from tencentcloud.common.exception.tencent_cloud_sdk_exception import (
        TencentCloudSDKException,
    )

    with pytest.raises(TencentCloudSDKException) as theirs:
        await sdk_call(sdk, "CreateImage", {"InstanceId": "ins-missing0", "ImageName": "parity-y"})
    assert info.value.code == theirs.value.get_code() == "InvalidInstanceId.NotFound"
    assert info.value.message == theirs.value.get_message()
