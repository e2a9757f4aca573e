"""SyncImages in the simulator: copies SYNCING then NORMAL, destination rules, faults, limits."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator.errors import UsageError
from orchestrator.simulator.command import build_config, register
from orchestrator.simulator.config import Faults, SimConfig, SimImageSeed
from orchestrator.simulator.fleet import config_from_mapping, config_to_mapping
from orchestrator.simulator.records import SimImage
from orchestrator.simulator.runner import Simulator, run_simulator
from tests.fixtures.sim import FOREIGN_IMAGE, TEST_REGION
from tests.simulator.helpers import (
    FrozenClock,
    error_code,
    raw_call,
    sdk_call,
    sdk_client,
    sdk_error,
    wait_for_state,
)

DEST = "ap-shanghai"
OTHER = "ap-beijing"
SOURCE = FOREIGN_IMAGE.image_id  # a NORMAL image of the account, not made by CreateImage
# Long enough that a copy is still SYNCING when the test looks; the frozen-clock tests move time.
SLOW = (2.0, 2.0)


def _sync_body(**params: Any) -> dict[str, Any]:
    return {
        "ImageIds": [SOURCE],
        "DestinationRegions": [DEST],
        "ImageName": "cp-1",
        "ImageSetRequired": True,
        **params,
    }


async def _sync(sim: Simulator, **params: Any) -> tuple[str | None, dict[str, Any]]:
    answer = await raw_call(sim, "SyncImages", _sync_body(**params))
    return error_code(answer), answer.body["Response"]


async def _listed(sim: Simulator, region: str, **params: Any) -> list[dict[str, Any]]:
    answer = await raw_call(sim, "DescribeImages", params, region=region)
    images: list[dict[str, Any]] = answer.body["Response"]["ImageSet"]
    return images


def _copies(sim: Simulator) -> list[SimImage]:
    return [c for c in sim.state.iter_copies() if c.alive]


@pytest.fixture
def slow_config(sim_config: SimConfig) -> SimConfig:
    """The test fleet with copies that stay SYNCING for two (simulated) seconds."""
    return replace(sim_config, sync_delay=SLOW)


async def test_copy_is_syncing_then_normal_with_rising_percent(slow_config: SimConfig) -> None:
    """A copy is SYNCING in the destination, its SyncPercent rises, then it is NORMAL at 100."""
    clock = FrozenClock()
    async with run_simulator(slow_config, mono=clock) as sim:
        code, response = await _sync(sim)
        assert code is None
        ((pair),) = response["ImageSet"]
        assert pair["Region"] == DEST
        copy = sim.state.images[pair["ImageId"]]
        assert (copy.copy_of, copy.copy_of_region, copy.name) == (SOURCE, TEST_REGION, "cp-1")
        (listed,) = await _listed(sim, DEST)
        assert (listed["ImageState"], listed["SyncPercent"]) == ("SYNCING", 0)
        clock.advance(1.0)
        (listed,) = await _listed(sim, DEST)
        assert (listed["ImageState"], listed["SyncPercent"]) == ("SYNCING", 50)
        clock.advance(1.0)
        (listed,) = await _listed(sim, DEST)
        assert (listed["ImageState"], listed["SyncPercent"]) == ("NORMAL", 100)
        assert sim.state.images[SOURCE].state == "NORMAL"
        assert sim.state.images[SOURCE].syncing == 0


async def test_copy_of_a_created_image(simulator: Simulator) -> None:
    """An image made by CreateImage can be synced once NORMAL; the copy keeps its instance."""
    instance_id = simulator.config.instances[0].instance_id
    made = await raw_call(simulator, "CreateImage", {"InstanceId": instance_id, "ImageName": "bk"})
    image_id = made.body["Response"]["ImageId"]
    await wait_for_state(simulator, image_id, "NORMAL")
    code, response = await _sync(simulator, ImageIds=[image_id], ImageName=None)
    assert code is None
    copy = simulator.state.images[response["ImageSet"][0]["ImageId"]]
    assert (copy.name, copy.instance_id) == ("bk", instance_id)  # the name defaults to the source's
    await wait_for_state(simulator, copy.image_id, "NORMAL")
    assert [i.image_id for i in simulator.state.iter_ours()] == [image_id]  # copies are apart


async def test_copies_carry_no_tags_unless_configured(sim_config: SimConfig) -> None:
    """A copy has no tags by default (the real API does not say); sync_copies_tags copies them."""
    async with run_simulator(sim_config) as sim:
        await _sync(sim)
        (copy,) = _copies(sim)
        assert copy.tags == {}
        assert await _listed(sim, DEST, Filters=[{"Name": "tag:owner", "Values": ["x"]}]) == []
    async with run_simulator(replace(sim_config, sync_copies_tags=True)) as sim:
        await _sync(sim)
        (copy,) = _copies(sim)
        assert copy.tags == dict(FOREIGN_IMAGE.tags)
        tagged = await _listed(
            sim, DEST, Filters=[{"Name": "tag:owner", "Values": ["someone-else"]}]
        )
        assert [i["ImageId"] for i in tagged] == [copy.image_id]


async def test_one_copy_per_destination(simulator: Simulator) -> None:
    """Several destinations give one copy each, in the order asked."""
    code, response = await _sync(simulator, DestinationRegions=[DEST, OTHER, DEST])
    assert code is None
    assert [p["Region"] for p in response["ImageSet"]] == [DEST, OTHER]
    assert sorted(c.region for c in _copies(simulator)) == sorted([DEST, OTHER])


async def test_full_destination_quota(sim_config: SimConfig) -> None:
    """A full destination answers ImageQuotaLimitExceeded; a SYNCING copy already counts there."""
    config = replace(sim_config, sync_delay=SLOW, quota={TEST_REGION: 50, DEST: 1})
    async with run_simulator(config) as sim:
        assert (await _sync(sim))[0] is None
        code, _ = await _sync(sim, ImageName="cp-2")
        assert code == "ImageQuotaLimitExceeded"
        # All or nothing: one full destination makes no copy in the others either.
        code, _ = await _sync(sim, ImageName="cp-3", DestinationRegions=[OTHER, DEST])
        assert code == "ImageQuotaLimitExceeded"
        assert [c.name for c in _copies(sim)] == ["cp-1"]


async def test_source_must_be_normal(simulator: Simulator) -> None:
    """A source still CREATING answers InvalidImageId.IncorrectState; an unknown one NotFound."""
    instance_id = simulator.config.instances[0].instance_id
    made = await raw_call(simulator, "CreateImage", {"InstanceId": instance_id, "ImageName": "bk"})
    creating = made.body["Response"]["ImageId"]
    code, _ = await _sync(simulator, ImageIds=[creating])
    assert code == "InvalidImageId.IncorrectState"
    code, _ = await _sync(simulator, ImageIds=["img-nothere"])
    assert code == "InvalidImageId.NotFound"
    assert _copies(simulator) == []


async def test_a_syncing_copy_cannot_be_synced_again(slow_config: SimConfig) -> None:
    """A copy still SYNCING is not NORMAL, so it cannot be the source of another sync."""
    async with run_simulator(slow_config) as sim:
        _, response = await _sync(sim)
        copy_id = response["ImageSet"][0]["ImageId"]
        answer = await raw_call(
            sim,
            "SyncImages",
            _sync_body(ImageIds=[copy_id], DestinationRegions=[OTHER]),
            region=DEST,
        )
        assert error_code(answer) == "InvalidImageId.IncorrectState"


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        (TEST_REGION, "InvalidParameterValue.InvalidRegion"),
        ("eu-nowhere", "InvalidRegion.NotFound"),
        ("ap-nanjing", "UnsupportedOperation.Region"),
    ],
)
async def test_refused_destinations(sim_config: SimConfig, destination: str, expected: str) -> None:
    """The source's own region, an unknown region and an unsupported one are refused."""
    config = replace(
        sim_config,
        regions=(TEST_REGION, DEST, "ap-nanjing"),
        sync_unsupported_regions=("ap-nanjing",),
    )
    async with run_simulator(config) as sim:
        code, _ = await _sync(sim, DestinationRegions=[DEST, destination])
        assert code == expected
        assert _copies(sim) == []


async def test_name_taken_in_the_destination(sim_config: SimConfig) -> None:
    """An image of the copy's name in the destination answers InvalidImageName.Duplicate."""
    taken = SimImageSeed(image_id="img-taken001", name="cp-1", region=DEST)
    async with run_simulator(replace(sim_config, images=(*sim_config.images, taken))) as sim:
        code, _ = await _sync(sim)
        assert code == "InvalidImageName.Duplicate"
        assert _copies(sim) == []
        # The same name in another region is no conflict.
        assert (await _sync(sim, DestinationRegions=[OTHER]))[0] is None


async def test_without_the_name_check_a_second_call_duplicates(sim_config: SimConfig) -> None:
    """With sync_checks_names off, calling again makes a second copy, and it is flagged."""
    async with run_simulator(replace(sim_config, sync_checks_names=False)) as sim:
        assert (await _sync(sim))[0] is None
        assert (await _sync(sim))[0] is None
        assert len(_copies(sim)) == 2
        assert sim.state.duplicates == ["cp-1"]


async def test_dry_run(simulator: Simulator) -> None:
    """DryRun answers DryRunOperation after every check and makes no copy."""
    assert (await _sync(simulator, DryRun=True))[0] == "DryRunOperation"
    assert _copies(simulator) == []
    code, _ = await _sync(simulator, DryRun=True, DestinationRegions=[TEST_REGION])
    assert code == "InvalidParameterValue.InvalidRegion"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"ImageIds": [SOURCE, "img-second1"]}, "InvalidParameterValue.LimitExceeded"),
        ({"ImageIds": None}, "MissingParameter"),
        ({"ImageIds": ["bad-id"]}, "InvalidImageId.Malformed"),
        ({"DestinationRegions": []}, "MissingParameter"),
        ({"DestinationRegions": [f"ap-r{n}" for n in range(31)]}, "LimitExceeded"),
        ({"ImageName": "n" * 61}, "InvalidParameter.ValueTooLarge"),
        ({"ImageName": ""}, "InvalidParameterValue"),
        ({"Encrypt": True}, "UnsupportedOperation.SyncEncryptImageNotSupport"),
        ({"Bogus": 1}, "UnknownParameter"),
    ],
)
async def test_bad_parameters(simulator: Simulator, changes: dict[str, Any], expected: str) -> None:
    """Malformed or out-of-bounds parameters are refused with the API's codes, making nothing."""
    body = {k: v for k, v in _sync_body(**changes).items() if v is not None}
    code = error_code(await raw_call(simulator, "SyncImages", body))
    assert code is not None
    assert code.endswith(expected)
    assert _copies(simulator) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"ImageIds": "img-src00001"},
        {"DestinationRegions": [1]},
        {"DestinationRegions": DEST},
        {"ImageName": 5},
        {"DryRun": "yes"},
        {"ImageSetRequired": 1},
        {"Encrypt": "false"},
        {"KmsKeyId": 3},
    ],
)
async def test_hostile_shapes_are_invalid_parameters(
    simulator: Simulator, changes: dict[str, Any]
) -> None:
    """Wrongly typed parameters answer InvalidParameter, never an internal error."""
    code = error_code(await raw_call(simulator, "SyncImages", _sync_body(**changes)))
    assert code == "InvalidParameter"
    assert _copies(simulator) == []


async def test_name_of_sixty_characters_is_accepted(simulator: Simulator) -> None:
    """A copy name of exactly 60 characters passes (the API's bound)."""
    assert (await _sync(simulator, ImageName="n" * 60))[0] is None


async def test_image_set_only_when_required(sim_config: SimConfig) -> None:
    """Without ImageSetRequired the ImageSet is empty; the older API answers without one."""
    async with run_simulator(sim_config) as sim:
        code, response = await _sync(sim, ImageSetRequired=False)
        assert (code, response["ImageSet"]) == (None, [])
    async with run_simulator(replace(sim_config, sync_image_set=False)) as sim:
        code, response = await _sync(sim)
        assert code is None
        assert set(response) == {"RequestId"}
        assert len(_copies(sim)) == 1


async def test_dropped_answer_leaves_exactly_one_copy(simulator: Simulator) -> None:
    """An answer lost after the copy was made: a name look-up finds it, a resend is Duplicate."""
    simulator.set_faults(Faults(drop_rate=1.0, after_create=1.0), action="SyncImages")
    with pytest.raises(aiohttp.ClientError):
        await raw_call(simulator, "SyncImages", _sync_body())
    simulator.clear_faults()
    found = await _listed(simulator, DEST, Filters=[{"Name": "image-name", "Values": ["cp-1"]}])
    assert [i["ImageName"] for i in found] == ["cp-1"]
    assert (await _sync(simulator))[0] == "InvalidImageName.Duplicate"
    assert len(_copies(simulator)) == 1
    assert simulator.state.duplicates == []
    assert simulator.state.count_calls("SyncImages", "DROPPED") == 1


async def test_fault_before_the_work_makes_no_copy(simulator: Simulator) -> None:
    """An InternalError drawn before the work leaves nothing; after_create makes the copy."""
    simulator.set_faults(Faults(internal_error_rate=1.0), action="SyncImages")
    assert (await _sync(simulator))[0] == "InternalError"
    assert _copies(simulator) == []
    simulator.set_faults(Faults(internal_error_rate=1.0, after_create=1.0), action="SyncImages")
    assert (await _sync(simulator))[0] == "InternalError"
    assert len(_copies(simulator)) == 1


async def test_source_not_deletable_while_syncing(slow_config: SimConfig) -> None:
    """DeleteImages refuses a source while its sync runs, and accepts it once the copy is done."""
    clock = FrozenClock()
    async with run_simulator(slow_config, mono=clock) as sim:
        await _sync(sim)
        answer = await raw_call(sim, "DeleteImages", {"ImageIds": [SOURCE]})
        assert error_code(answer) == "InvalidImageId.IncorrectState"
        assert sim.state.images[SOURCE].alive
        clock.advance(SLOW[1])
        assert error_code(await raw_call(sim, "DeleteImages", {"ImageIds": [SOURCE]})) is None


async def test_source_deletable_while_syncing_when_configured(sim_config: SimConfig) -> None:
    """With source_busy_while_syncing off the source goes at once, and the copy still finishes."""
    config = replace(sim_config, sync_delay=SLOW, source_busy_while_syncing=False)
    clock = FrozenClock()
    async with run_simulator(config, mono=clock) as sim:
        await _sync(sim)
        assert error_code(await raw_call(sim, "DeleteImages", {"ImageIds": [SOURCE]})) is None
        clock.advance(SLOW[1])
        (copy,) = _copies(sim)
        assert copy.state == "NORMAL"


async def test_syncing_copy_cannot_be_deleted_and_delete_delay_applies(
    sim_config: SimConfig,
) -> None:
    """A SYNCING copy is refused by DeleteImages; a NORMAL one is DELETING for delete_delay."""
    config = replace(sim_config, sync_delay=SLOW, delete_delay=5.0)
    clock = FrozenClock()
    async with run_simulator(config, mono=clock) as sim:
        _, response = await _sync(sim)
        copy_id = response["ImageSet"][0]["ImageId"]
        delete = {"ImageIds": [copy_id]}
        answer = await raw_call(sim, "DeleteImages", delete, region=DEST)
        assert error_code(answer) == "InvalidImageId.IncorrectState"
        clock.advance(SLOW[1])
        assert error_code(await raw_call(sim, "DeleteImages", delete, region=DEST)) is None
        assert [i["ImageState"] for i in await _listed(sim, DEST)] == ["DELETING"]
        clock.advance(5.0)
        assert await _listed(sim, DEST) == []


async def test_list_lag_applies_to_copies(sim_config: SimConfig) -> None:
    """A new copy is missing from the destination's listing for list_lag, its name already taken."""
    clock = FrozenClock()
    async with run_simulator(replace(sim_config, list_lag=3.0), mono=clock) as sim:
        assert (await _sync(sim))[0] is None
        assert await _listed(sim, DEST) == []
        assert (await _sync(sim))[0] == "InvalidImageName.Duplicate"
        clock.advance(3.0)
        assert [i["ImageName"] for i in await _listed(sim, DEST)] == ["cp-1"]


async def test_rate_limit_counts_sync_images(sim_config: SimConfig) -> None:
    """The 11th SyncImages in one second is throttled, counted and recorded as a violation."""
    clock = FrozenClock()
    async with run_simulator(sim_config, mono=clock) as sim:
        for _ in range(10):
            assert (await _sync(sim, DryRun=True))[0] == "DryRunOperation"
        assert (await _sync(sim, DryRun=True))[0] == "RequestLimitExceeded"
        clock.advance(1.0)
        assert (await _sync(sim, DryRun=True))[0] == "DryRunOperation"
        assert sim.state.violations == {"SyncImages": 1}
        assert sim.state.max_window("SyncImages") == 11
        assert sim.state.count_calls("SyncImages") == 12
        assert sim.state.count_calls("SyncImages", "RequestLimitExceeded") == 1


async def test_inspection_shows_copies_and_their_source(simulator: Simulator) -> None:
    """`GET /_sim/state` lists each copy with its source, and the image rows say so too."""
    _, response = await _sync(simulator)
    copy_id = response["ImageSet"][0]["ImageId"]
    async with aiohttp.ClientSession() as session, session.get(simulator.url + "/_sim/state") as r:
        body = await r.json()
    (copy,) = body["copies"]
    assert copy["image_id"] == copy_id
    assert (copy["source_image_id"], copy["source_region"]) == (SOURCE, TEST_REGION)
    assert (copy["region"], copy["name"]) == (DEST, "cp-1")
    rows = {i["image_id"]: i for i in body["images"]}
    assert rows[copy_id]["copy_of"] == {"image_id": SOURCE, "region": TEST_REGION}
    assert rows[SOURCE]["copy_of"] is None


async def test_official_sdk_calls_sync_images(slow_config: SimConfig) -> None:
    """The official SDK sends SyncImages and decodes ImageSet and Image.SyncPercent from us."""
    async with run_simulator(slow_config) as sim:
        client = sdk_client(sim)
        params = {
            "ImageIds": [SOURCE],
            "DestinationRegions": [DEST],
            "ImageName": "sdk-copy",
            "ImageSetRequired": True,
        }
        answer = await sdk_call(client, "SyncImages", params)
        ((pair),) = answer["ImageSet"]
        assert pair["Region"] == DEST
        listed = await sdk_call(sdk_client(sim, region=DEST), "DescribeImages", {})
        (image,) = listed["ImageSet"]
        assert (image["ImageId"], image["ImageState"]) == (pair["ImageId"], "SYNCING")
        assert isinstance(image["SyncPercent"], int)
        assert await sdk_error(client, "SyncImages", {**params, "DryRun": True}) == (
            "InvalidImageName.Duplicate"
        )


def test_fleet_file_options_round_trip(tmp_path: Path) -> None:
    """The SyncImages options load from a fleet file and survive the JSON form."""
    data = {
        "sync_delay": [1.0, 2.0],
        "sync_copies_tags": True,
        "sync_checks_names": False,
        "source_busy_while_syncing": False,
        "sync_unsupported_regions": ["ap-nanjing"],
        "sync_image_set": False,
    }
    config = config_from_mapping(data, tmp_path / "fleet.toml")
    assert config.sync_delay == (1.0, 2.0)
    assert config.sync_unsupported_regions == ("ap-nanjing",)
    assert (config.sync_copies_tags, config.sync_checks_names) == (True, False)
    assert (config.source_busy_while_syncing, config.sync_image_set) == (False, False)
    mapping = json.loads(json.dumps(config_to_mapping(config)))
    assert config_from_mapping(mapping, tmp_path / "fleet.json") == config
    assert SimConfig().limit("SyncImages") == 10


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"sync_delay": [2.0, 1.0]}, "sync_delay"),
        ({"sync_delay": [0.0, float("inf")]}, "sync_delay"),
        ({"create_delay": [0.0, 86401.0]}, "create_delay"),
        ({"sync_copies_tags": "yes"}, "sync_copies_tags"),
        ({"sync_unsupported_regions": [1]}, "sync_unsupported_regions"),
    ],
)
def test_bad_fleet_sync_options_name_the_field(
    tmp_path: Path, data: dict[str, Any], field: str
) -> None:
    """A bad SyncImages option in a fleet file is a usage error naming the file and field."""
    path = tmp_path / "fleet.toml"
    with pytest.raises(UsageError, match=f"{path}: {field}: "):
        config_from_mapping(data, path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser


def test_sync_delay_flag_reaches_the_config() -> None:
    """`cvm-backup simulator --sync-delay MIN:MAX` sets how long copies stay SYNCING."""
    parser = _parser()
    args = parser.parse_args(["simulator", "--sync-delay", "0.5:1.5"])
    assert build_config(args).sync_delay == (0.5, 1.5)
    assert build_config(parser.parse_args(["simulator"])).sync_delay == SimConfig().sync_delay


@pytest.mark.parametrize("value", ["0:inf", "0:nan", "2:1", "0:86401", "soon"])
def test_bad_sync_delay_flags_are_usage_errors(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--sync-delay takes finite MIN:MAX seconds within a day; anything else exits 2."""
    parser = _parser()
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["simulator", "--sync-delay", value])
    assert done.value.code == 2
    assert "--sync-delay" in capsys.readouterr().err
