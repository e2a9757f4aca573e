"""The official SDK (tencentcloud-sdk-python-cvm) against the simulator: the wire-format oracle."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest
from tencentcloud.common.exception.tencent_cloud_sdk_exception import (
    TencentCloudSDKException,
)
from tencentcloud.cvm.v20170312 import models

from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.runner import Simulator, run_simulator
from tests.fixtures.sim import FOREIGN_IMAGE, TEST_QUOTA, TEST_SECRET_ID
from tests.simulator.helpers import FrozenClock, sdk_call, sdk_client, sdk_error, wait_for_state


async def test_sdk_calls_all_five_actions(simulator: Simulator) -> None:
    """CreateImage, DescribeImages, DeleteImages, DescribeImageQuota and DescribeInstances work."""
    client = sdk_client(simulator)
    instances = await sdk_call(client, "DescribeInstances", {"Limit": 100})
    first = instances["InstanceSet"][0]["InstanceId"]
    assert instances["TotalCount"] == 5
    created = await sdk_call(
        client, "CreateImage", {"InstanceId": first, "ImageName": "bk-1", "ForcePoweroff": "true"}
    )
    image_id = created["ImageId"]
    assert image_id.startswith("img-")
    uuid.UUID(created["RequestId"])
    await wait_for_state(simulator, image_id, "NORMAL")
    found = await sdk_call(client, "DescribeImages", {"ImageIds": [image_id]})
    assert found["ImageSet"][0]["ImageState"] == "NORMAL"
    assert (await sdk_call(client, "DescribeImageQuota"))["ImageNumQuota"] == TEST_QUOTA
    await sdk_call(client, "DeleteImages", {"ImageIds": [image_id], "DeleteBindedSnap": True})
    assert simulator.state.deletions[0].image_id == image_id
    assert simulator.state.deletions[0].delete_binded_snap is True


async def test_sdk_wrong_key_gets_signature_failure(simulator: Simulator) -> None:
    """A request signed with the wrong secret key is refused with AuthFailure.SignatureFailure."""
    client = sdk_client(simulator, secret_key="not-the-key")
    assert await sdk_error(client, "DescribeImageQuota") == "AuthFailure.SignatureFailure"


async def test_sdk_unknown_secret_id(simulator: Simulator) -> None:
    """An unknown SecretId is refused with AuthFailure.SecretIdNotFound."""
    client = sdk_client(simulator, secret_id="AKIDnobody")
    assert await sdk_error(client, "DescribeImageQuota") == "AuthFailure.SecretIdNotFound"


async def test_sdk_sees_request_limit_exceeded(sim_config: SimConfig) -> None:
    """The 11th DescribeImageQuota call inside one second is throttled with the real message."""
    clock = FrozenClock()
    async with run_simulator(sim_config, mono=clock) as sim:
        client = sdk_client(sim)
        for _ in range(10):
            await sdk_call(client, "DescribeImageQuota")
        with pytest.raises(TencentCloudSDKException) as caught:
            await sdk_call(client, "DescribeImageQuota")
        assert caught.value.get_code() == "RequestLimitExceeded"
        assert "equals to `11` in a second" in caught.value.get_message()
        assert "frequency limit `10`" in caught.value.get_message()
        clock.advance(1.0)
        await sdk_call(client, "DescribeImageQuota")
        assert sim.state.violations == {"DescribeImageQuota": 1}
        assert sim.state.max_window("DescribeImageQuota") == 11


async def test_sdk_duplicate_name(simulator: Simulator) -> None:
    """Reusing an image name answers InvalidImageName.Duplicate, even from another instance."""
    client = sdk_client(simulator)
    ids = [i.instance_id for i in simulator.config.instances]
    await sdk_call(client, "CreateImage", {"InstanceId": ids[0], "ImageName": "nightly"})
    code = await sdk_error(client, "CreateImage", {"InstanceId": ids[1], "ImageName": "nightly"})
    assert code == "InvalidImageName.Duplicate"
    assert simulator.state.duplicates == []


async def test_sdk_quota_exceeded(sim_config: SimConfig) -> None:
    """At quota (the foreign image and CREATING images count) CreateImage is refused."""
    async with run_simulator(replace(sim_config, quota={"ap-guangzhou": 3})) as sim:
        client = sdk_client(sim)
        ids = [i.instance_id for i in sim.config.instances]
        for n in range(2):
            await sdk_call(client, "CreateImage", {"InstanceId": ids[n], "ImageName": f"q{n}"})
        code = await sdk_error(client, "CreateImage", {"InstanceId": ids[2], "ImageName": "q2"})
        assert code == "ImageQuotaLimitExceeded"
        assert FOREIGN_IMAGE.image_id in sim.state.live_images(TEST_SECRET_ID, "ap-guangzhou")


async def test_sdk_mutex_for_busy_instance(sim_config: SimConfig) -> None:
    """Imaging an instance whose last image is still CREATING: MutexOperation.TaskRunning."""
    async with run_simulator(replace(sim_config, create_delay=(30.0, 30.0))) as sim:
        client = sdk_client(sim)
        instance_id = sim.config.instances[0].instance_id
        await sdk_call(client, "CreateImage", {"InstanceId": instance_id, "ImageName": "a"})
        code = await sdk_error(client, "CreateImage", {"InstanceId": instance_id, "ImageName": "b"})
        assert code == "MutexOperation.TaskRunning"


async def test_sdk_token_is_checked_when_configured(sim_config: SimConfig) -> None:
    """With a configured session token, the SDK's X-TC-Token must match it."""
    config = replace(sim_config, tokens={TEST_SECRET_ID: "session-token"})
    async with run_simulator(config) as sim:
        good = sdk_client(sim, token="session-token")
        assert (await sdk_call(good, "DescribeImageQuota"))["ImageNumQuota"] == TEST_QUOTA
        bad = sdk_client(sim, token="stale-token")
        assert await sdk_error(bad, "DescribeImageQuota") == "AuthFailure.TokenFailure"


async def test_sdk_parses_a_deleting_image(sim_config: SimConfig) -> None:
    """The SDK's Image model reads ImageState DELETING (delete_delay) like any other state."""
    clock = FrozenClock()
    config = replace(sim_config, delete_delay=30.0)
    async with run_simulator(config, mono=clock) as sim:
        client = sdk_client(sim)
        await sdk_call(client, "DeleteImages", {"ImageIds": [FOREIGN_IMAGE.image_id]})
        request = models.DescribeImagesRequest()
        request.ImageIds = [FOREIGN_IMAGE.image_id]
        response = await asyncio.to_thread(client.DescribeImages, request)
        (image,) = response.ImageSet
        assert (image.ImageId, image.ImageState, response.TotalCount) == (
            FOREIGN_IMAGE.image_id,
            "DELETING",
            1,
        )
        code = await sdk_error(client, "DeleteImages", {"ImageIds": [FOREIGN_IMAGE.image_id]})
        assert code == "InvalidImageId.IncorrectState"


async def test_sdk_reads_local_disks_and_their_refusal(sim_config: SimConfig) -> None:
    """The SDK reads LOCAL_SSD data disks and the LocalDataDiskNotSupport error of CreateImage."""
    spec = replace(
        sim_config.instances[0], local_data_disk_ids=("ldisk-sdk1",), local_disk_type="LOCAL_SSD"
    )
    async with run_simulator(replace(sim_config, instances=(spec,))) as sim:
        client = sdk_client(sim)
        request = models.DescribeInstancesRequest()
        request.InstanceIds = [spec.instance_id]
        response = await asyncio.to_thread(client.DescribeInstances, request)
        disks = [(d.DiskId, d.DiskType) for d in response.InstanceSet[0].DataDisks]
        assert disks == [(spec.data_disk_ids[0], "CLOUD_PREMIUM"), ("ldisk-sdk1", "LOCAL_SSD")]
        with pytest.raises(TencentCloudSDKException) as caught:
            await sdk_call(
                client,
                "CreateImage",
                {"InstanceId": spec.instance_id, "ImageName": "x", "DataDiskIds": ["ldisk-sdk1"]},
            )
        assert caught.value.get_code() == "InvalidParameter.LocalDataDiskNotSupport"
        assert "ldisk-sdk1" in caught.value.get_message()
        assert caught.value.get_request_id()
