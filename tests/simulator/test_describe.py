"""DescribeImages and DescribeInstances: ids, filters, pagination and answer shapes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from orchestrator.simulator.config import NO_LIMITS, SimConfig
from orchestrator.simulator.runner import Simulator, run_simulator
from tests.fixtures.sim import FOREIGN_IMAGE, make_sim_config
from tests.simulator.helpers import error_code, raw_call, sdk_call, sdk_client

Json = dict[str, Any]


async def _ok(sim: Simulator, action: str, params: Json) -> Json:
    answer = await raw_call(sim, action, params)
    assert error_code(answer) is None, answer.body
    response: Json = answer.body["Response"]
    return response


async def _make_images(sim: Simulator, names: list[str], tags: dict[str, str]) -> list[str]:
    ids = []
    specs = sim.config.instances
    for n, name in enumerate(names):
        spec = [
            {"ResourceType": "image", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
        ]
        response = await _ok(
            sim,
            "CreateImage",
            {"InstanceId": specs[n].instance_id, "ImageName": name, "TagSpecification": spec},
        )
        ids.append(response["ImageId"])
    return ids


def _names(response: Json) -> list[str]:
    return [i["ImageName"] for i in response["ImageSet"]]


async def test_image_name_filter_is_fuzzy(simulator: Simulator) -> None:
    """image-name matches substrings, so exact matching is the client's job."""
    await _make_images(simulator, ["bk-1", "bk-10", "other"], {})
    found = await _ok(
        simulator, "DescribeImages", {"Filters": [{"Name": "image-name", "Values": ["bk-1"]}]}
    )
    assert sorted(_names(found)) == ["bk-1", "bk-10"]


async def test_tag_filters(simulator: Simulator) -> None:
    """tag:KEY matches the value, tag-key matches presence; filters are ANDed."""
    await _make_images(simulator, ["a", "b"], {"cvm-backup": "p1"})
    tag_value = {"Filters": [{"Name": "tag:cvm-backup", "Values": ["p1"]}]}
    assert sorted(_names(await _ok(simulator, "DescribeImages", tag_value))) == ["a", "b"]
    tag_key = {"Filters": [{"Name": "tag-key", "Values": ["owner"]}]}
    assert _names(await _ok(simulator, "DescribeImages", tag_key)) == [FOREIGN_IMAGE.name]
    both = {
        "Filters": [
            {"Name": "tag:cvm-backup", "Values": ["p1"]},
            {"Name": "image-name", "Values": ["a"]},
        ]
    }
    assert _names(await _ok(simulator, "DescribeImages", both)) == ["a"]


async def test_image_ids_unknown_are_absent(simulator: Simulator) -> None:
    """Unknown ids in ImageIds are simply left out."""
    (image_id,) = await _make_images(simulator, ["a"], {})
    found = await _ok(simulator, "DescribeImages", {"ImageIds": [image_id, "img-nothere"]})
    assert [i["ImageId"] for i in found["ImageSet"]] == [image_id]
    assert found["TotalCount"] == 1


async def test_ids_and_filters_together_are_refused(simulator: Simulator) -> None:
    """ImageIds and Filters cannot be combined."""
    answer = await raw_call(
        simulator,
        "DescribeImages",
        {"ImageIds": ["img-1"], "Filters": [{"Name": "image-type", "Values": ["PRIVATE_IMAGE"]}]},
    )
    assert error_code(answer) == "InvalidParameter.InvalidParameterCoexistImageIdsFilters"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"Limit": 101}, "InvalidParameterValue.LimitExceeded"),
        (
            {"Filters": [{"Name": "image-id", "Values": ["img-1"]}] * 11},
            "InvalidParameterValue.LimitExceeded",
        ),
        (
            {"Filters": [{"Name": "image-id", "Values": ["img-1"] * 6}]},
            "InvalidFilterValue.LimitExceeded",
        ),
        ({"Filters": [{"Name": "image-state", "Values": ["NORMAL"]}]}, "InvalidFilter"),
        ({"ImageIds": ["bad-id"]}, "InvalidImageId.Malformed"),
        ({"Offset": -1}, "InvalidParameter"),
    ],
)
async def test_describe_images_limits(simulator: Simulator, params: Json, expected: str) -> None:
    """Limits on Limit, filters, values and ids answer the documented codes."""
    assert error_code(await raw_call(simulator, "DescribeImages", params)) == expected


async def test_pagination() -> None:
    """Limit defaults to 20; Offset pages through; TotalCount counts every match."""
    config = replace(make_sim_config(instances=25), limits=NO_LIMITS)
    async with run_simulator(config) as sim:
        await _make_images(sim, [f"p{n:02d}" for n in range(25)], {"k": "v"})
        query: Json = {"Filters": [{"Name": "tag-key", "Values": ["k"]}]}
        first = await _ok(sim, "DescribeImages", query)
        second = await _ok(sim, "DescribeImages", {**query, "Offset": 20, "Limit": 100})
        assert (first["TotalCount"], len(first["ImageSet"]), len(second["ImageSet"])) == (25, 20, 5)
        assert set(_names(first)) | set(_names(second)) == {f"p{n:02d}" for n in range(25)}
        assert _names(first)[0] == "p24"


async def test_image_shape(simulator: Simulator) -> None:
    """An Image has the real fields and the `...Z` time form."""
    found = await _ok(simulator, "DescribeImages", {"ImageIds": [FOREIGN_IMAGE.image_id]})
    image = found["ImageSet"][0]
    assert image["ImageType"] == "PRIVATE_IMAGE"
    assert image["Tags"] == [{"Key": "owner", "Value": "someone-else"}]
    assert image["CreatedTime"].endswith("Z")
    assert {"ImageId", "ImageName", "ImageState", "SnapshotSet", "ImageSize"} <= set(image)


async def test_images_are_per_account(sim_config: SimConfig) -> None:
    """Another account does not see, name-clash with or count the first account's images."""
    config = replace(sim_config, credentials={**sim_config.credentials, "AKIDother": "k2"})
    async with run_simulator(config) as sim:
        await _make_images(sim, ["shared-name"], {})
        other = sdk_client(sim, secret_id="AKIDother", secret_key="k2")
        listed = await sdk_call(other, "DescribeImages", {})
        assert listed["TotalCount"] == 0
        instance_id = sim.config.instances[1].instance_id
        made = await sdk_call(
            other, "CreateImage", {"InstanceId": instance_id, "ImageName": "shared-name"}
        )
        assert sim.state.images[made["ImageId"]].account == "AKIDother"


async def test_describe_instances_filters(simulator: Simulator) -> None:
    """DescribeInstances filters by tag, state, zone and id."""
    spec = simulator.config.instances[0]
    simulator.set_instance_state(spec.instance_id, "STOPPED")
    by_state = await _ok(
        simulator,
        "DescribeInstances",
        {"Filters": [{"Name": "instance-state", "Values": ["STOPPED"]}]},
    )
    assert [i["InstanceId"] for i in by_state["InstanceSet"]] == [spec.instance_id]
    by_tag = await _ok(
        simulator, "DescribeInstances", {"Filters": [{"Name": "tag:role", "Values": ["web"]}]}
    )
    assert all({"Key": "role", "Value": "web"} in i["Tags"] for i in by_tag["InstanceSet"])
    assert by_tag["TotalCount"] == sum(
        1 for s in simulator.config.instances if s.tags["role"] == "web"
    )
    by_zone = await _ok(
        simulator, "DescribeInstances", {"Filters": [{"Name": "zone", "Values": [spec.zone]}]}
    )
    assert spec.instance_id in [i["InstanceId"] for i in by_zone["InstanceSet"]]


async def test_describe_instances_by_ids_and_shape(simulator: Simulator) -> None:
    """InstanceIds lists those instances with their disks, state and times."""
    spec = simulator.config.instances[0]
    found = await _ok(
        simulator, "DescribeInstances", {"InstanceIds": [spec.instance_id, "ins-gone0000"]}
    )
    (instance,) = found["InstanceSet"]
    assert instance["InstanceName"] == spec.name
    assert instance["InstanceState"] == "RUNNING"
    assert [d["DiskId"] for d in instance["DataDisks"]] == list(spec.data_disk_ids)
    assert instance["CreatedTime"].endswith("Z")
    assert instance["OsName"]


async def test_describe_instances_pagination_and_limit(simulator: Simulator) -> None:
    """Limit and Offset page; Limit over 100 is refused."""
    page = await _ok(simulator, "DescribeInstances", {"Limit": 2, "Offset": 4})
    assert (page["TotalCount"], len(page["InstanceSet"])) == (5, 1)
    too_many = await raw_call(simulator, "DescribeInstances", {"Limit": 101})
    assert error_code(too_many) == "InvalidParameterValue.LimitExceeded"


async def test_instance_without_data_disks_answers_null(sim_config: SimConfig) -> None:
    """As on the real API, DataDisks is null for an instance without data disks."""
    bare = replace(sim_config.instances[0], data_disk_ids=())
    async with run_simulator(replace(sim_config, instances=(bare,))) as sim:
        found = await _ok(sim, "DescribeInstances", {})
        assert found["InstanceSet"][0]["DataDisks"] is None
