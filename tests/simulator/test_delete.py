"""DeleteImages rules: all or nothing, no images in progress, DryRun, DeleteBindedSnap."""

from __future__ import annotations

from dataclasses import replace

from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.runner import Simulator, run_simulator
from tests.fixtures.sim import FOREIGN_IMAGE, TEST_REGION, TEST_SECRET_ID
from tests.simulator.helpers import error_code, raw_call, wait_for_state


async def _image(sim: Simulator, name: str = "bk", index: int = 0) -> str:
    instance_id = sim.config.instances[index].instance_id
    answer = await raw_call(sim, "CreateImage", {"InstanceId": instance_id, "ImageName": name})
    return str(answer.body["Response"]["ImageId"])


async def _delete(sim: Simulator, ids: list[str], **params: object) -> str | None:
    return error_code(await raw_call(sim, "DeleteImages", {"ImageIds": ids, **params}))


async def test_creating_image_cannot_be_deleted(simulator: Simulator) -> None:
    """An image still CREATING answers InvalidImageId.IncorrectState."""
    image_id = await _image(simulator)
    assert await _delete(simulator, [image_id]) == "InvalidImageId.IncorrectState"
    await wait_for_state(simulator, image_id, "NORMAL")
    assert await _delete(simulator, [image_id]) is None


async def test_unknown_and_deleted_images_are_not_found(simulator: Simulator) -> None:
    """Unknown ids, and ids deleted already, answer InvalidImageId.NotFound."""
    assert await _delete(simulator, ["img-nothere"]) == "InvalidImageId.NotFound"
    assert await _delete(simulator, [FOREIGN_IMAGE.image_id]) is None
    assert await _delete(simulator, [FOREIGN_IMAGE.image_id]) == "InvalidImageId.NotFound"


async def test_delete_is_all_or_nothing(simulator: Simulator) -> None:
    """One bad id in a batch leaves every image of the batch in place."""
    answer = await _delete(simulator, [FOREIGN_IMAGE.image_id, "img-nothere"])
    assert answer == "InvalidImageId.NotFound"
    assert simulator.state.images[FOREIGN_IMAGE.image_id].alive
    assert simulator.state.deletions == []


async def test_dry_run_deletes_nothing(simulator: Simulator) -> None:
    """DryRun answers DryRunOperation and keeps the image."""
    assert await _delete(simulator, [FOREIGN_IMAGE.image_id], DryRun=True) == "DryRunOperation"
    assert simulator.state.images[FOREIGN_IMAGE.image_id].alive


async def test_deletion_is_recorded_and_frees_quota(sim_config: SimConfig) -> None:
    """A deletion records DeleteBindedSnap and its time, and frees a quota slot."""
    async with run_simulator(replace(sim_config, quota={TEST_REGION: 1})) as sim:
        instance_id = sim.config.instances[0].instance_id
        full = await raw_call(sim, "CreateImage", {"InstanceId": instance_id, "ImageName": "a"})
        assert error_code(full) == "ImageQuotaLimitExceeded"
        assert await _delete(sim, [FOREIGN_IMAGE.image_id], DeleteBindedSnap=True) is None
        (deletion,) = sim.state.deletions
        assert (deletion.image_id, deletion.delete_binded_snap) == (FOREIGN_IMAGE.image_id, True)
        assert deletion.at.endswith("Z")
        assert sim.state.images[FOREIGN_IMAGE.image_id].deleted_time == deletion.at
        assert await _image(sim, "a")


async def test_deleted_name_can_be_reused_but_is_flagged(simulator: Simulator) -> None:
    """Like the real API a deleted image's name is free again; the reuse is reported."""
    image_id = await _image(simulator, "again")
    await wait_for_state(simulator, image_id, "NORMAL")
    assert await _delete(simulator, [image_id]) is None
    assert simulator.state.image_named(TEST_SECRET_ID, TEST_REGION, "again") is None
    await _image(simulator, "again", index=1)
    assert simulator.state.duplicates == ["again"]


async def test_delete_requires_ids(simulator: Simulator) -> None:
    """DeleteImages without ImageIds is a MissingParameter."""
    assert await _delete(simulator, []) == "MissingParameter"
