"""CreateImage rules and the CREATING -> NORMAL / CREATEFAILED life of an image."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchestrator.simulator.config import SimConfig, SimInstance
from orchestrator.simulator.runner import Simulator, run_simulator
from tests.simulator.helpers import error_code, raw_call, wait_for_state


def _first(sim: Simulator) -> SimInstance:
    return sim.config.instances[0]


async def _create(sim: Simulator, **params: object) -> tuple[str | None, dict[str, object]]:
    answer = await raw_call(sim, "CreateImage", {"ImageName": "bk", **params})
    return error_code(answer), answer.body["Response"]


async def test_image_becomes_normal(simulator: Simulator) -> None:
    """A new image is CREATING, then NORMAL after the configured delay."""
    code, response = await _create(simulator, InstanceId=_first(simulator).instance_id)
    assert code is None
    image = simulator.state.images[str(response["ImageId"])]
    assert image.state == "CREATING"
    assert image.instance_id == _first(simulator).instance_id
    await wait_for_state(simulator, image.image_id, "NORMAL")


async def test_failing_instance_makes_createfailed_images(sim_config: SimConfig) -> None:
    """An instance configured to fail ends its images in CREATEFAILED."""
    failing = replace(sim_config.instances[0], behaviour="fail")
    config = replace(sim_config, instances=(failing, *sim_config.instances[1:]))
    async with run_simulator(config) as sim:
        _, response = await _create(sim, InstanceId=failing.instance_id)
        await wait_for_state(sim, str(response["ImageId"]), "CREATEFAILED")


async def test_mutex_ends_when_image_is_done(simulator: Simulator) -> None:
    """After the first image is NORMAL, the instance can be imaged again."""
    instance_id = _first(simulator).instance_id
    _, response = await _create(simulator, InstanceId=instance_id, ImageName="one")
    await wait_for_state(simulator, str(response["ImageId"]), "NORMAL")
    code, _ = await _create(simulator, InstanceId=instance_id, ImageName="two")
    assert code is None


async def test_legacy_mode_answers_without_image_id(sim_config: SimConfig) -> None:
    """The global legacy mode answers success with RequestId only, as the older API did."""
    async with run_simulator(replace(sim_config, legacy=True)) as sim:
        code, response = await _create(sim, InstanceId=_first(sim).instance_id, ImageName="old")
        assert code is None
        assert set(response) == {"RequestId"}
        (image,) = sim.state.images_named("old")
        assert image.legacy


async def test_legacy_instance(sim_config: SimConfig) -> None:
    """A per-instance legacy behaviour affects that instance only."""
    legacy = replace(sim_config.instances[0], behaviour="legacy")
    config = replace(sim_config, instances=(legacy, *sim_config.instances[1:]))
    async with run_simulator(config) as sim:
        _, old = await _create(sim, InstanceId=legacy.instance_id, ImageName="a")
        _, new = await _create(sim, InstanceId=config.instances[1].instance_id, ImageName="b")
        assert "ImageId" not in old
        assert "ImageId" in new


async def test_dry_run_creates_nothing(simulator: Simulator) -> None:
    """DryRun answers DryRunOperation after validating, and makes no image."""
    code, _ = await _create(simulator, InstanceId=_first(simulator).instance_id, DryRun=True)
    assert code == "DryRunOperation"
    assert list(simulator.state.iter_ours()) == []


async def test_dry_run_still_validates(simulator: Simulator) -> None:
    """A DryRun for a missing instance reports the real error, not DryRunOperation."""
    code, _ = await _create(simulator, InstanceId="ins-missing0", DryRun=True)
    assert code == "InvalidInstanceId.NotFound"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"ImageName": "x" * 61}, "InvalidParameter.ValueTooLarge"),
        ({"ImageName": ""}, "MissingParameter"),
        ({"InstanceId": "ins-missing0"}, "InvalidInstanceId.NotFound"),
        ({"ForcePoweroff": True}, "InvalidParameter"),
        ({"ForcePoweroff": "yes"}, "InvalidParameterValue"),
        ({"DataDiskIds": ["disk-other"]}, "InvalidParameter.DataDiskNotBelongSpecifiedInstance"),
        ({"Reboot": "true"}, "UnknownParameter"),
        ({"SnapshotIds": ["snap-1"]}, "InvalidParameter.SpecifyOneParameter"),
    ],
)
async def test_parameter_errors(
    simulator: Simulator, params: dict[str, object], expected: str
) -> None:
    """Bad parameters get the real error codes."""
    params = {"InstanceId": _first(simulator).instance_id, **params}
    code, _ = await _create(simulator, **params)
    assert code == expected


async def test_sixty_character_name_is_fine(simulator: Simulator) -> None:
    """Exactly 60 characters is the longest accepted name."""
    code, _ = await _create(simulator, InstanceId=_first(simulator).instance_id, ImageName="x" * 60)
    assert code is None


async def test_system_disk_is_not_a_data_disk(simulator: Simulator) -> None:
    """Naming the system disk among DataDiskIds is refused."""
    spec = _first(simulator)
    code, _ = await _create(
        simulator, InstanceId=spec.instance_id, DataDiskIds=[spec.system_disk_id]
    )
    assert code == "InvalidParameter.DataDiskIdContainsRootDisk"


async def test_options_and_tags_are_recorded(simulator: Simulator) -> None:
    """ForcePoweroff, Sysprep, DataDiskIds and TagSpecification end up on the image."""
    spec = _first(simulator)
    tags = [{"Key": "cvm-backup", "Value": "p1"}, {"Key": "slot", "Value": "20261123T0200Z"}]
    _, response = await _create(
        simulator,
        InstanceId=spec.instance_id,
        ForcePoweroff="true",
        Sysprep="false",
        DataDiskIds=list(spec.data_disk_ids),
        TagSpecification=[{"ResourceType": "image", "Tags": tags}],
    )
    image = simulator.state.images[str(response["ImageId"])]
    assert (image.force_poweroff, image.sysprep) == ("true", "false")
    assert image.data_disk_ids == spec.data_disk_ids
    assert image.tags == {"cvm-backup": "p1", "slot": "20261123T0200Z"}


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("TERMINATING", "UnsupportedOperation.InstanceStateTerminating"),
        ("REBOOTING", "UnsupportedOperation.InstanceStateRebooting"),
        ("STARTING", "UnsupportedOperation.InstanceStateStarting"),
        ("STOPPING", "UnsupportedOperation.InstanceStateStopping"),
        ("STOPPED", None),
    ],
)
async def test_instance_state_rules(simulator: Simulator, state: str, expected: str | None) -> None:
    """Only RUNNING and STOPPED instances can be imaged; other states get their own code."""
    instance_id = _first(simulator).instance_id
    simulator.set_instance_state(instance_id, state)
    code, _ = await _create(simulator, InstanceId=instance_id)
    assert code == expected


async def test_busy_period(simulator: Simulator) -> None:
    """A busy instance answers OperationDenied.InstanceOperationInProgress until it is free."""
    instance_id = _first(simulator).instance_id
    simulator.set_busy(instance_id, 60)
    code, _ = await _create(simulator, InstanceId=instance_id)
    assert code == "OperationDenied.InstanceOperationInProgress"
    simulator.set_busy(instance_id, 0)
    code, _ = await _create(simulator, InstanceId=instance_id)
    assert code is None


async def test_busy_behaviour_from_fleet(sim_config: SimConfig) -> None:
    """A fleet instance with behaviour "busy" is busy from the start."""
    busy = replace(sim_config.instances[0], behaviour="busy", busy_seconds=60)
    async with run_simulator(replace(sim_config, instances=(busy,))) as sim:
        code, _ = await _create(sim, InstanceId=busy.instance_id)
        assert code == "OperationDenied.InstanceOperationInProgress"


async def test_removed_instance_is_not_found(simulator: Simulator) -> None:
    """An instance removed at run time is gone for CreateImage."""
    instance_id = _first(simulator).instance_id
    simulator.remove_instance(instance_id)
    code, _ = await _create(simulator, InstanceId=instance_id)
    assert code == "InvalidInstanceId.NotFound"


async def test_other_region_does_not_see_instance(simulator: Simulator) -> None:
    """Instances are regional: the same id in another region is not found."""
    answer = await raw_call(
        simulator,
        "CreateImage",
        {"ImageName": "bk", "InstanceId": _first(simulator).instance_id},
        region="ap-shanghai",
    )
    assert error_code(answer) == "InvalidInstanceId.NotFound"
