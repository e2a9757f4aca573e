"""The real API's less kind behaviours (docs/design.md#tencent-cloud-api-notes), over HTTP.

Timed transitions run on an injected monotonic clock (`FrozenClock`) that moves only when a
test advances it, so nothing here sleeps or depends on how fast the machine is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any

import pytest

from orchestrator.simulator.config import NO_LIMITS, SimConfig, SimInstance
from orchestrator.simulator.runner import Simulator, run_simulator
from orchestrator.tencent.client import CvmClient
from orchestrator.tencent.credentials import Credentials, StaticCredentials
from orchestrator.tencent.errors import (
    ErrorClass,
    PauseScope,
    TencentError,
    classify,
    pause_scope,
)
from orchestrator.tencent.models import DataDisk
from tests.fixtures.sim import FOREIGN_IMAGE, TEST_REGION, TEST_SECRET_ID, TEST_SECRET_KEY
from tests.simulator.helpers import FrozenClock, error_code, raw_call

Json = dict[str, Any]
OTHER_REGION = "ap-shanghai"
DELETE_DELAY = 30.0
LIST_LAG = 10.0
# Longer than any create_delay of the test config: an image made before is NORMAL after it.
CREATED = 1.0
CAM_DENIAL = "UnauthorizedOperation.PermissionDenied"


@pytest.fixture
def clock() -> FrozenClock:
    """The simulator's monotonic clock, moved only by the test."""
    return FrozenClock()


def _unlimited(config: SimConfig, **changes: Any) -> SimConfig:
    # The rate windows read the frozen clock too: without limits no call is ever throttled.
    return replace(config, limits=NO_LIMITS, **changes)


def _sim(
    config: SimConfig, clock: FrozenClock, **changes: Any
) -> AbstractAsyncContextManager[Simulator]:
    """A simulator on the frozen clock, with these SimConfig changes and no rate limits."""
    return run_simulator(_unlimited(config, **changes), mono=clock)


async def _ok(sim: Simulator, action: str, params: Json, region: str = TEST_REGION) -> Json:
    answer = await raw_call(sim, action, params, region=region)
    assert error_code(answer) is None, answer.body
    response: Json = answer.body["Response"]
    return response


async def _code(sim: Simulator, action: str, params: Json, region: str = TEST_REGION) -> str | None:
    return error_code(await raw_call(sim, action, params, region=region))


async def _create(sim: Simulator, name: str, index: int = 0, **params: Any) -> str:
    instance_id = sim.config.instances[index].instance_id
    made = await _ok(sim, "CreateImage", {"InstanceId": instance_id, "ImageName": name, **params})
    return str(made["ImageId"])


async def _create_code(sim: Simulator, name: str, index: int = 0, **params: Any) -> str | None:
    instance_id = sim.config.instances[index].instance_id
    return await _code(sim, "CreateImage", {"InstanceId": instance_id, "ImageName": name, **params})


async def _listed(sim: Simulator, params: Json) -> tuple[int, list[str]]:
    """TotalCount and ImageIds of a DescribeImages answer."""
    found = await _ok(sim, "DescribeImages", {**params, "Limit": 100})
    return found["TotalCount"], [i["ImageId"] for i in found["ImageSet"]]


def _name_filter(name: str) -> Json:
    return {"Filters": [{"Name": "image-name", "Values": [name]}]}


PRIVATE = {"Filters": [{"Name": "image-type", "Values": ["PRIVATE_IMAGE"]}]}


@pytest.fixture
async def frozen(sim_config: SimConfig, clock: FrozenClock) -> AsyncIterator[Simulator]:
    """The test simulator on the frozen clock, without rate limits."""
    async with _sim(sim_config, clock) as sim:
        yield sim


# -- delete_delay -------------------------------------------------------------------------------


async def test_deleted_image_is_listed_deleting_until_the_delay(
    sim_config: SimConfig, clock: FrozenClock
) -> None:
    """delete_delay: a deleted image is listed as DELETING, then disappears after the delay."""
    foreign = FOREIGN_IMAGE.image_id
    async with _sim(sim_config, clock, delete_delay=DELETE_DELAY) as sim:
        assert await _code(sim, "DeleteImages", {"ImageIds": [foreign]}) is None
        found = await _ok(sim, "DescribeImages", {"ImageIds": [foreign]})
        listed = [(i["ImageId"], i["ImageState"]) for i in found["ImageSet"]]
        assert listed == [(foreign, "DELETING")]
        assert await _listed(sim, _name_filter(FOREIGN_IMAGE.name)) == (1, [foreign])
        # Recorded once, when DeleteImages answered; the image itself still exists.
        assert [d.image_id for d in sim.state.deletions] == [foreign]
        assert sim.state.images[foreign].alive
        clock.advance(DELETE_DELAY - 0.1)
        assert await _listed(sim, {"ImageIds": [foreign]}) == (1, [foreign])
        clock.advance(0.1)
        assert await _listed(sim, {"ImageIds": [foreign]}) == (0, [])
        assert await _listed(sim, PRIVATE) == (0, [])
        assert not sim.state.images[foreign].alive


async def test_deleting_image_holds_its_quota_slot_and_name(
    sim_config: SimConfig, clock: FrozenClock
) -> None:
    """delete_delay: a DELETING image still fills the quota and its name is still taken."""
    config = {"delete_delay": DELETE_DELAY, "quota": {TEST_REGION: 1}}
    async with _sim(sim_config, clock, **config) as sim:
        assert await _code(sim, "DeleteImages", {"ImageIds": [FOREIGN_IMAGE.image_id]}) is None
        assert (await _ok(sim, "DescribeImageQuota", {}))["ImageNumQuota"] == 1
        assert await _create_code(sim, "fresh") == "ImageQuotaLimitExceeded"
        assert await _create_code(sim, FOREIGN_IMAGE.name) == "InvalidImageName.Duplicate"
        clock.advance(DELETE_DELAY)
        # Gone: the slot and the name are free again.
        image_id = await _create(sim, FOREIGN_IMAGE.name)
        assert sim.state.images[image_id].name == FOREIGN_IMAGE.name
        assert sim.state.duplicates == [FOREIGN_IMAGE.name]


async def test_deleting_image_cannot_be_deleted_again(
    sim_config: SimConfig, clock: FrozenClock
) -> None:
    """delete_delay: DeleteImages on a DELETING image answers InvalidImageId.IncorrectState."""
    async with _sim(sim_config, clock, delete_delay=DELETE_DELAY) as sim:
        image_id = await _create(sim, "ours")
        clock.advance(CREATED)
        assert await _code(sim, "DeleteImages", {"ImageIds": [image_id]}) is None
        again = await _code(sim, "DeleteImages", {"ImageIds": [image_id]})
        assert again == "InvalidImageId.IncorrectState"
        # All or nothing: a batch with a DELETING image deletes nothing else either.
        both = {"ImageIds": [FOREIGN_IMAGE.image_id, image_id]}
        assert await _code(sim, "DeleteImages", both) == "InvalidImageId.IncorrectState"
        assert sim.state.images[FOREIGN_IMAGE.image_id].state == "NORMAL"
        assert [d.image_id for d in sim.state.deletions] == [image_id]
        clock.advance(DELETE_DELAY)
        gone = await _code(sim, "DeleteImages", {"ImageIds": [image_id]})
        assert gone == "InvalidImageId.NotFound"


async def test_without_delete_delay_deletion_is_immediate(frozen: Simulator) -> None:
    """delete_delay 0 (the default): a deleted image is never listed as DELETING."""
    assert await _code(frozen, "DeleteImages", {"ImageIds": [FOREIGN_IMAGE.image_id]}) is None
    assert await _listed(frozen, {"ImageIds": [FOREIGN_IMAGE.image_id]}) == (0, [])


# -- list_lag -----------------------------------------------------------------------------------


async def test_new_image_is_unlisted_for_the_lag(sim_config: SimConfig, clock: FrozenClock) -> None:
    """list_lag: a new image is absent by id, by filters and from TotalCount, then listed."""
    tags = [{"ResourceType": "image", "Tags": [{"Key": "cvm-backup", "Value": "p1"}]}]
    async with _sim(sim_config, clock, list_lag=LIST_LAG) as sim:
        image_id = await _create(sim, "lagging", TagSpecification=tags)
        by_tag = {"Filters": [{"Name": "tag:cvm-backup", "Values": ["p1"]}]}
        by_id_filter = {"Filters": [{"Name": "image-id", "Values": [image_id]}]}
        queries = [{"ImageIds": [image_id]}, _name_filter("lagging"), by_tag, by_id_filter]
        for query in queries:
            assert await _listed(sim, query) == (0, []), query
        assert await _listed(sim, PRIVATE) == (1, [FOREIGN_IMAGE.image_id])
        clock.advance(LIST_LAG - 0.1)
        assert await _listed(sim, {"ImageIds": [image_id]}) == (0, [])
        clock.advance(0.1)
        for query in queries:
            assert await _listed(sim, query) == (1, [image_id]), query
        assert await _listed(sim, PRIVATE) == (2, [image_id, FOREIGN_IMAGE.image_id])


async def test_unlisted_image_takes_its_name_and_quota_slot(
    sim_config: SimConfig, clock: FrozenClock
) -> None:
    """list_lag: while unlisted, the image's name is taken and it counts against the quota."""
    async with _sim(sim_config, clock, list_lag=LIST_LAG, quota={TEST_REGION: 2}) as sim:
        await _create(sim, "lagging")
        assert await _listed(sim, _name_filter("lagging")) == (0, [])
        assert await _create_code(sim, "lagging", index=1) == "InvalidImageName.Duplicate"
        assert await _create_code(sim, "another", index=1) == "ImageQuotaLimitExceeded"
        assert sim.state.duplicates == []


# -- local data disks ---------------------------------------------------------------------------


def _with_local_disks(config: SimConfig, disk_type: str) -> SimConfig:
    spec = replace(
        config.instances[0],
        data_disk_ids=("disk-cloud1",),
        local_data_disk_ids=("ldisk-local1", "ldisk-local2"),
        local_disk_type=disk_type,
    )
    return _unlimited(config, instances=(spec, *config.instances[1:]))


@pytest.fixture(params=["LOCAL_BASIC", "LOCAL_SSD"])
async def local_sim(
    request: pytest.FixtureRequest, sim_config: SimConfig
) -> AsyncIterator[Simulator]:
    """A simulator whose first instance has one cloud and two local data disks."""
    async with run_simulator(_with_local_disks(sim_config, request.param)) as sim:
        yield sim


async def test_local_disks_are_listed_with_their_type(local_sim: Simulator) -> None:
    """Local data disks: DescribeInstances lists them as LOCAL_BASIC / LOCAL_SSD disks."""
    spec = local_sim.config.instances[0]
    found = await _ok(local_sim, "DescribeInstances", {"InstanceIds": [spec.instance_id]})
    disks = [(d["DiskId"], d["DiskType"]) for d in found["InstanceSet"][0]["DataDisks"]]
    assert disks == [
        ("disk-cloud1", "CLOUD_PREMIUM"),
        ("ldisk-local1", spec.local_disk_type),
        ("ldisk-local2", spec.local_disk_type),
    ]


async def test_create_image_refuses_local_disks(local_sim: Simulator) -> None:
    """Local data disks: CreateImage with one in DataDiskIds answers LocalDataDiskNotSupport."""
    mixed = ["disk-cloud1", "ldisk-local2"]
    code = await _create_code(local_sim, "with-local", DataDiskIds=mixed)
    assert code == "InvalidParameter.LocalDataDiskNotSupport"
    assert local_sim.state.image_named(TEST_SECRET_ID, TEST_REGION, "with-local") is None
    assert await _create_code(local_sim, "cloud-only", DataDiskIds=["disk-cloud1"]) is None


@pytest.fixture
async def ours(local_sim: Simulator) -> AsyncIterator[CvmClient]:
    """Our client pointed at the simulator with local disks."""
    creds = StaticCredentials(Credentials(TEST_SECRET_ID, TEST_SECRET_KEY))
    async with CvmClient(credentials=creds, endpoint=local_sim.url) as client:
        yield client


async def test_client_leaves_local_disks_out_of_data_disk_ids(
    local_sim: Simulator, ours: CvmClient
) -> None:
    """Local data disks: our decode keeps CLOUD_* disks in data_disk_ids, the rest apart."""
    spec = local_sim.config.instances[0]
    page = await ours.describe_instances(TEST_REGION, instance_ids=[spec.instance_id])
    (instance,) = page.instances
    assert instance.data_disk_ids == ("disk-cloud1",)
    assert instance.left_out_disks == (
        DataDisk("ldisk-local1", spec.local_disk_type),
        DataDisk("ldisk-local2", spec.local_disk_type),
    )
    assert instance.local_disk_ids == ("ldisk-local1", "ldisk-local2")
    # Everything DescribeInstances lists is refused; what the decode keeps is accepted.
    with pytest.raises(TencentError) as refused:
        await ours.create_image(
            TEST_REGION,
            instance_id=spec.instance_id,
            name="with-local",
            data_disk_ids=(*instance.data_disk_ids, *instance.local_disk_ids),
        )
    assert refused.value.code == "InvalidParameter.LocalDataDiskNotSupport"
    made = await ours.create_image(
        TEST_REGION,
        instance_id=spec.instance_id,
        name="whole",
        data_disk_ids=instance.data_disk_ids,
    )
    assert made.image_id is not None
    assert local_sim.state.images[made.image_id].data_disk_ids == ("disk-cloud1",)


# -- short-lived instance states ----------------------------------------------------------------

SHORT_LIVED = [
    ("ENTER_RESCUE_MODE", "UnsupportedOperation.InstanceStateEnterRescueMode"),
    ("RESCUE_MODE", "UnsupportedOperation.InstanceStateRescueMode"),
    ("EXIT_RESCUE_MODE", "UnsupportedOperation.InstanceStateExitRescueMode"),
    ("ENTER_SERVICE_LIVE_MIGRATE", "UnsupportedOperation.InstanceStateEnterServiceLiveMigrate"),
    ("SERVICE_LIVE_MIGRATE", "UnsupportedOperation.InstanceStateServiceLiveMigrate"),
    ("EXIT_SERVICE_LIVE_MIGRATE", "UnsupportedOperation.InstanceStateServiceLiveMigrate"),
    ("FREEZING", "UnsupportedOperation.InstanceStateFreezing"),
]


async def _instance_state(sim: Simulator, instance_id: str) -> str:
    found = await _ok(sim, "DescribeInstances", {"InstanceIds": [instance_id]})
    return str(found["InstanceSet"][0]["InstanceState"])


@pytest.mark.parametrize(("state", "expected"), SHORT_LIVED)
async def test_short_lived_state_refuses_then_reverts(
    frozen: Simulator, clock: FrozenClock, state: str, expected: str
) -> None:
    """Short-lived states: CreateImage answers the state's code (BUSY), then it reverts."""
    instance_id = frozen.config.instances[0].instance_id
    frozen.set_instance_state(instance_id, state, seconds=60.0)
    assert await _instance_state(frozen, instance_id) == state
    code = await _create_code(frozen, "bk")
    assert code == expected
    assert classify(expected) is ErrorClass.BUSY
    clock.advance(59.9)
    assert await _create_code(frozen, "bk") == expected
    clock.advance(0.1)
    assert await _instance_state(frozen, instance_id) == "RUNNING"
    assert await _create_code(frozen, "bk") is None


async def test_short_lived_state_reverts_to_then(frozen: Simulator, clock: FrozenClock) -> None:
    """Short-lived states: with `then`, the instance returns to that state, not RUNNING."""
    instance_id = frozen.config.instances[0].instance_id
    frozen.set_instance_state(instance_id, "SERVICE_LIVE_MIGRATE", seconds=5.0, then="STOPPED")
    clock.advance(5.0)
    assert await _instance_state(frozen, instance_id) == "STOPPED"


async def test_later_state_change_cancels_the_revert(frozen: Simulator, clock: FrozenClock) -> None:
    """Short-lived states: a state set after a short-lived one is not undone by its revert."""
    instance_id = frozen.config.instances[0].instance_id
    frozen.set_instance_state(instance_id, "RESCUE_MODE", seconds=10.0)
    clock.advance(5.0)
    frozen.set_instance_state(instance_id, "FREEZING")
    clock.advance(10.0)
    assert await _instance_state(frozen, instance_id) == "FREEZING"
    # A second short-lived state replaces the first one's end time as well.
    frozen.set_instance_state(instance_id, "RESCUE_MODE", seconds=10.0)
    clock.advance(5.0)
    frozen.set_instance_state(instance_id, "SERVICE_LIVE_MIGRATE", seconds=10.0)
    clock.advance(5.0)
    assert await _instance_state(frozen, instance_id) == "SERVICE_LIVE_MIGRATE"
    clock.advance(5.0)
    assert await _instance_state(frozen, instance_id) == "RUNNING"


async def test_replacement_due_at_the_same_instant_keeps_its_then(
    frozen: Simulator, clock: FrozenClock
) -> None:
    """Short-lived states: a replacement ending at the same instant returns to its own `then`."""
    instance_id = frozen.config.instances[0].instance_id
    frozen.set_instance_state(instance_id, "RESCUE_MODE", seconds=10.0)
    frozen.set_instance_state(instance_id, "SERVICE_LIVE_MIGRATE", seconds=10.0, then="STOPPED")
    clock.advance(10.0)
    assert await _instance_state(frozen, instance_id) == "STOPPED"


# -- scoped CAM denials -------------------------------------------------------------------------


def _two_regions(config: SimConfig) -> SimConfig:
    there = SimInstance(instance_id="ins-shanghai1", region=OTHER_REGION, zone=f"{OTHER_REGION}-1")
    return _unlimited(config, instances=(*config.instances, there))


@pytest.fixture
async def two_regions(sim_config: SimConfig) -> AsyncIterator[Simulator]:
    """A simulator with the test fleet plus one instance in OTHER_REGION."""
    async with run_simulator(_two_regions(sim_config)) as sim:
        yield sim


async def _create_in(sim: Simulator, region: str, name: str) -> Json:
    instance_id = next(s.instance_id for s in sim.config.instances if s.region == region)
    answer = await raw_call(
        sim, "CreateImage", {"InstanceId": instance_id, "ImageName": name}, region=region
    )
    response: Json = answer.body["Response"]
    return response


@pytest.mark.parametrize("code", [CAM_DENIAL, "AuthFailure.UnauthorizedOperation"])
async def test_cam_denial_in_one_region_only(two_regions: Simulator, code: str) -> None:
    """Scoped CAM denials: a region-scoped refusal answers there, and nowhere else."""
    two_regions.set_account_error(code, ("CreateImage",), region=TEST_REGION)
    refused = await _create_in(two_regions, TEST_REGION, "denied")
    assert refused["Error"]["Code"] == code
    # The message names what was refused, and where.
    assert "cvm:CreateImage" in refused["Error"]["Message"]
    assert f"`{TEST_REGION}`" in refused["Error"]["Message"]
    assert "ImageId" in await _create_in(two_regions, OTHER_REGION, "allowed")
    # Only the action named is refused, and nothing was made where it was.
    assert await _code(two_regions, "DescribeImages", {}) is None
    assert two_regions.state.image_named(TEST_SECRET_ID, TEST_REGION, "denied") is None
    assert pause_scope(code) is PauseScope.REGION
    two_regions.set_account_error(None, ("CreateImage",), region=TEST_REGION)
    assert "ImageId" in await _create_in(two_regions, TEST_REGION, "denied")


async def test_cam_denial_scopes_are_independent(two_regions: Simulator) -> None:
    """Scoped CAM denials: the most specific scope answers; lifting one leaves the others."""
    two_regions.set_account_error("InvalidAccount.InsufficientBalance")
    two_regions.set_account_error(CAM_DENIAL, region=TEST_REGION)
    here = await _create_in(two_regions, TEST_REGION, "a")
    there = await _create_in(two_regions, OTHER_REGION, "b")
    assert (here["Error"]["Code"], there["Error"]["Code"]) == (
        CAM_DENIAL,
        "InvalidAccount.InsufficientBalance",
    )
    two_regions.set_account_error(None)
    assert (await _create_in(two_regions, TEST_REGION, "a"))["Error"]["Code"] == CAM_DENIAL
    assert "ImageId" in await _create_in(two_regions, OTHER_REGION, "b")


async def test_cam_denial_for_another_account_only(two_regions: Simulator) -> None:
    """Scoped CAM denials: an account-scoped refusal leaves other accounts' calls alone."""
    two_regions.set_account_error(CAM_DENIAL, region=TEST_REGION, account="AKIDsomeoneelse")
    assert "ImageId" in await _create_in(two_regions, TEST_REGION, "mine")
    two_regions.set_account_error(CAM_DENIAL, region=TEST_REGION, account=TEST_SECRET_ID)
    assert (await _create_in(two_regions, TEST_REGION, "again"))["Error"]["Code"] == CAM_DENIAL


# -- regions, actions not offered, tag keys, filter limits --------------------------------------


async def test_unserved_region_answers_invalid_parameter_value(
    sim_config: SimConfig, clock: FrozenClock
) -> None:
    """Regions: a region the simulator does not serve answers InvalidParameterValue."""
    async with _sim(sim_config, clock, regions=(TEST_REGION,)) as sim:
        answer = await raw_call(sim, "DescribeImages", {}, region=OTHER_REGION)
        assert answer.body["Response"]["Error"] == {
            "Code": "InvalidParameterValue",
            "Message": "A value specified in `Region` is not valid",
        }
        assert await _code(sim, "DescribeImages", {}) is None
        # An instance added at run time makes its region served.
        sim.add_instance(SimInstance(instance_id="ins-added001", region=OTHER_REGION))
        assert await _code(sim, "DescribeImages", {}, region=OTHER_REGION) is None


async def test_malformed_region_answers_invalid_parameter_value(frozen: Simulator) -> None:
    """Regions: without a configured list, a malformed region answers InvalidParameterValue."""
    assert await _code(frozen, "DescribeImages", {}, region="moon") == "InvalidParameterValue"
    assert await _code(frozen, "DescribeImages", {}, region=OTHER_REGION) is None


async def test_action_not_offered_answers_unsupported_region(
    sim_config: SimConfig, clock: FrozenClock
) -> None:
    """actions_not_offered: that action answers UnsupportedRegion there; others still work."""
    not_offered = {OTHER_REGION: ("CreateImage",)}
    async with _sim(sim_config, clock, actions_not_offered=not_offered) as sim:
        params = {"InstanceId": sim.config.instances[0].instance_id, "ImageName": "x"}
        code = await _code(sim, "CreateImage", params, region=OTHER_REGION)
        assert code == "UnsupportedRegion"
        assert await _code(sim, "DescribeImages", {}, region=OTHER_REGION) is None
        assert await _code(sim, "CreateImage", params) is None


def _tag_filter(key: str, value: str = "daily") -> Json:
    return {"Filters": [{"Name": f"tag:{key}", "Values": [value]}]}


async def test_unknown_tag_key_answers_tag_key_not_found(
    sim_config: SimConfig, clock: FrozenClock
) -> None:
    """check_tag_keys: a tag:KEY filter of a key no resource carries answers TagKeyNotFound."""
    async with _sim(sim_config, clock, check_tag_keys=True) as sim:
        code = await _code(sim, "DescribeInstances", _tag_filter("nobody-has-this"))
        assert code == "InvalidParameterValue.TagKeyNotFound"
        found = await _ok(sim, "DescribeInstances", _tag_filter("backup"))
        assert found["TotalCount"] == len(sim.config.instances)
        # A key carried by an image only is known to the tag service as well.
        tags = [{"ResourceType": "image", "Tags": [{"Key": "cvm-backup", "Value": "p1"}]}]
        await _create(sim, "tagged", TagSpecification=tags)
        by_image_key = await _ok(sim, "DescribeInstances", _tag_filter("cvm-backup"))
        assert by_image_key["TotalCount"] == 0


async def test_unknown_tag_key_is_an_empty_answer_by_default(frozen: Simulator) -> None:
    """check_tag_keys off (the default): an unknown tag key simply matches nothing."""
    found = await _ok(frozen, "DescribeInstances", _tag_filter("nobody-has-this"))
    assert found["TotalCount"] == 0


@pytest.mark.parametrize("action", ["DescribeInstances", "DescribeImages"])
async def test_more_than_ten_filters_are_refused(frozen: Simulator, action: str) -> None:
    """Filters: 11 filters answer InvalidParameterValue.LimitExceeded; 10 are accepted."""
    name = "tag-key" if action == "DescribeImages" else "zone"
    ten = [{"Name": name, "Values": [f"v{n}"]} for n in range(10)]
    assert await _code(frozen, action, {"Filters": ten}) is None
    eleven = [*ten, {"Name": name, "Values": ["v10"]}]
    code = await _code(frozen, action, {"Filters": eleven})
    assert code == "InvalidParameterValue.LimitExceeded"
    six = [{"Name": name, "Values": [f"v{n}" for n in range(6)]}]
    assert await _code(frozen, action, {"Filters": six}) == "InvalidFilterValue.LimitExceeded"
