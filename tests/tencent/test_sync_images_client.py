"""CvmClient.sync_images: the wire format (the official SDK as oracle), results, error classes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import pytest
from tencentcloud.cvm.v20170312 import models as sdk_models

from orchestrator.limiter import Limiters
from orchestrator.simulator.config import Faults, SimConfig
from orchestrator.simulator.runner import Simulator, run_simulator
from orchestrator.tencent import decode
from orchestrator.tencent.client import CvmClient
from orchestrator.tencent.credentials import Credentials, StaticCredentials
from orchestrator.tencent.errors import ErrorClass, TencentError, classify
from orchestrator.tencent.models import ImageCopy, SyncImagesResult
from tests.fixtures.sim import FOREIGN_IMAGE, TEST_REGION, TEST_SECRET_ID, TEST_SECRET_KEY
from tests.fixtures.tencent import SECRET_ID, SECRET_KEY, TOKEN, RecordingLimiter
from tests.tencent import fake_api as f
from tests.tencent.sdk_oracle import sdk_request, signed_headers

DEST = "ap-shanghai"
SOURCE = FOREIGN_IMAGE.image_id
NAME = "cvmbk-p-ins-1-20240501T0300Z"


def _sdk_params(**fields: Any) -> dict[str, Any]:
    """What the official SDK's SyncImagesRequest serializes the same arguments to."""
    request = sdk_models.SyncImagesRequest()
    request.from_json_string(json.dumps(fields))
    params: dict[str, Any] = request._serialize()
    return params


# -- against the loopback fake: the request and the answer ---------------------------------


async def test_request_matches_the_sdk_model(client: CvmClient, fake: f.FakeApi) -> None:
    """The parameters sent are exactly what the SDK's SyncImagesRequest serializes them to."""
    fake.script("SyncImages", f.ok(ImageSet=[{"ImageId": "img-copy0001", "Region": DEST}]))
    await client.sync_images(TEST_REGION, "img-src00001", [DEST], image_name=NAME)
    (got,) = fake.calls("SyncImages")
    assert got.params == {
        "ImageIds": ["img-src00001"],
        "DestinationRegions": [DEST],
        "ImageName": NAME,
        "ImageSetRequired": True,
    }
    assert got.params == _sdk_params(**got.params)
    assert isinstance(got.params["ImageSetRequired"], bool)  # a JSON boolean, unlike ForcePoweroff


async def test_wire_headers_match_the_sdk(client: CvmClient, fake: f.FakeApi) -> None:
    """Body and signed headers of SyncImages are the ones the SDK computes for that instant."""
    fake.script("SyncImages", f.ok(ImageSet=[]))
    await client.sync_images(TEST_REGION, "img-src00001", [DEST, "ap-beijing"], dry_run=False)
    (got,) = fake.calls("SyncImages")
    req = sdk_request(
        secret_id=SECRET_ID,
        secret_key=SECRET_KEY,
        token=TOKEN,
        host=fake.url.removeprefix("http://"),
        action="SyncImages",
        region=TEST_REGION,
        timestamp=int(got.headers["X-TC-Timestamp"]),
        params=got.params,
        language="en-US",
    )
    assert got.body == req.data.encode()
    for header, value in signed_headers(req).items():
        assert got.headers[header] == value, header


async def test_result_pairs_each_destination_with_its_copy(
    client: CvmClient, fake: f.FakeApi
) -> None:
    """ImageSet becomes one ImageCopy per destination, with the request id."""
    pairs = [
        {"ImageId": "img-copy0001", "Region": DEST},
        {"ImageId": "img-copy0002", "Region": "x"},
    ]
    fake.script("SyncImages", f.ok(ImageSet=pairs))
    result = await client.sync_images(TEST_REGION, "img-src00001", [DEST, "x"])
    assert result.copies == (ImageCopy(DEST, "img-copy0001"), ImageCopy("x", "img-copy0002"))
    assert result.image_id(DEST) == "img-copy0001"
    assert result.image_id("ap-nowhere") is None
    assert result.request_id.startswith("req-")
    assert not result.dry_run


@pytest.mark.parametrize(
    "fields",
    [{}, {"ImageSet": None}, {"ImageSet": []}, {"ImageSet": [{"Region": DEST}]}],
    ids=["absent", "null", "empty", "no-id"],
)
async def test_no_image_set_means_look_up_by_name(
    client: CvmClient, fake: f.FakeApi, fields: dict[str, Any]
) -> None:
    """An answer without usable ImageSet pairs (older APIs) is a success with no copies."""
    fake.script("SyncImages", f.ok(**fields))
    result = await client.sync_images(TEST_REGION, "img-src00001", [DEST], image_name=NAME)
    assert result.copies == ()
    assert result.image_id(DEST) is None


async def test_malformed_image_set_is_invalid_response(client: CvmClient, fake: f.FakeApi) -> None:
    """An ImageSet that is not a list of objects is the transient InvalidResponse, not a crash."""
    fake.script("SyncImages", f.ok(ImageSet=["img-copy0001"]))
    with pytest.raises(TencentError) as info:
        await client.sync_images(TEST_REGION, "img-src00001", [DEST])
    assert info.value.code == "InvalidResponse"
    assert info.value.error_class is ErrorClass.TRANSIENT


async def test_dry_run(client: CvmClient, fake: f.FakeApi) -> None:
    """DryRun sends DryRun=true; DryRunOperation is a successful DryRun with no copies."""
    fake.script("SyncImages", f.error("DryRunOperation", "would have succeeded"))
    result = await client.sync_images(TEST_REGION, "img-src00001", [DEST], dry_run=True)
    assert result == SyncImagesResult(copies=(), request_id=result.request_id, dry_run=True)
    assert result.request_id.startswith("req-")
    assert fake.calls("SyncImages")[0].params["DryRun"] is True


async def test_dry_run_operation_to_a_real_call_is_an_error(
    client: CvmClient, fake: f.FakeApi
) -> None:
    """DryRunOperation answering a call that was not a DryRun is not taken as success."""
    fake.script("SyncImages", f.error("DryRunOperation", "odd"))
    with pytest.raises(TencentError):
        await client.sync_images(TEST_REGION, "img-src00001", [DEST])


async def test_destinations_are_required_and_deduplicated(
    client: CvmClient, fake: f.FakeApi
) -> None:
    """No destination is a caller bug (ValueError, nothing sent); repeats are sent once."""
    with pytest.raises(ValueError, match="destination"):
        await client.sync_images(TEST_REGION, "img-src00001", [])
    assert fake.calls("SyncImages") == []
    fake.script("SyncImages", f.ok(ImageSet=[]))
    await client.sync_images(TEST_REGION, "img-src00001", [DEST, DEST])
    assert fake.calls("SyncImages")[0].params["DestinationRegions"] == [DEST]


async def test_goes_through_the_limiter_as_sync_images(
    client: CvmClient, fake: f.FakeApi, limiter: RecordingLimiter
) -> None:
    """Every attempt waits on the shared limiter under (account, "SyncImages")."""
    fake.script("SyncImages", f.ok(ImageSet=[]))
    await client.sync_images(TEST_REGION, "img-src00001", [DEST])
    assert limiter.acquired == [("acct-a", "SyncImages")]


async def test_throttling_is_retried(
    client: CvmClient, fake: f.FakeApi, limiter: RecordingLimiter
) -> None:
    """RequestLimitExceeded was not executed: retried, and the limiter told to slow down."""
    fake.script("SyncImages", f.error("RequestLimitExceeded"), f.ok(ImageSet=[]))
    await client.sync_images(TEST_REGION, "img-src00001", [DEST])
    assert len(fake.calls("SyncImages")) == 2
    assert limiter.throttles == [("acct-a", "SyncImages")]


@pytest.mark.parametrize("step", [f.error("InternalError"), f.http(502)], ids=["internal", "502"])
async def test_transient_failure_is_not_resent(
    client: CvmClient, fake: f.FakeApi, step: f.Step
) -> None:
    """A transient failure may have started a copy (no client token): raised, never resent."""
    fake.script("SyncImages", step, f.ok(ImageSet=[]))
    with pytest.raises(TencentError) as info:
        await client.sync_images(TEST_REGION, "img-src00001", [DEST])
    assert info.value.error_class is ErrorClass.TRANSIENT
    assert len(fake.calls("SyncImages")) == 1


# -- error classes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("ImageQuotaLimitExceeded", ErrorClass.QUOTA),
        ("InvalidImageId.IncorrectState", ErrorClass.BUSY),
        ("FailedOperation.InvalidImageState", ErrorClass.BUSY),
        ("InvalidParameterValue.InvalidImageState", ErrorClass.BUSY),
        ("InvalidImageName.Duplicate", ErrorClass.ALREADY_DONE),
        ("InvalidImageId.NotFound", ErrorClass.GONE),
        ("InvalidImageId.TooLarge", ErrorClass.PERMANENT),
        ("InvalidRegion.NotFound", ErrorClass.PERMANENT),
        ("InvalidRegion.Unavailable", ErrorClass.PERMANENT),
        ("UnsupportedOperation.Region", ErrorClass.PERMANENT),
        ("UnsupportedOperation.EncryptedImagesNotSupported", ErrorClass.PERMANENT),
        ("UnsupportedOperation.LocationImageNotSupported", ErrorClass.PERMANENT),
        ("UnsupportedOperation.SyncEncryptImageNotSupport", ErrorClass.PERMANENT),
        ("InvalidParameterValue.InvalidRegion", ErrorClass.PERMANENT),
        ("InvalidParameterValue.LimitExceeded", ErrorClass.PERMANENT),
        ("InvalidParameter.InstanceImageNotSupport", ErrorClass.PERMANENT),
        ("RequestLimitExceeded.UinLimitExceeded", ErrorClass.THROTTLED),
        ("InternalError", ErrorClass.TRANSIENT),
        ("AuthFailure.SignatureFailure", ErrorClass.ACCOUNT),
        ("UnauthorizedOperation.PermissionDenied", ErrorClass.ACCOUNT),
        ("InvalidAccount.InsufficientBalance", ErrorClass.ACCOUNT),
        ("SomethingNew.Unheard", ErrorClass.PERMANENT),
    ],
)
async def test_sync_images_error_classes(
    client: CvmClient, fake: f.FakeApi, code: str, expected: ErrorClass
) -> None:
    """A SyncImages answer is classed for SyncImages (the source, the destination)."""
    assert classify(code, "SyncImages") is expected
    if expected is ErrorClass.THROTTLED:
        return  # retried in-call: covered by test_throttling_is_retried
    fake.script("SyncImages", f.error(code))
    with pytest.raises(TencentError) as info:
        await client.sync_images(TEST_REGION, "img-src00001", [DEST])
    assert info.value.action == "SyncImages"
    assert info.value.error_class is expected


def test_other_actions_keep_their_classes() -> None:
    """SyncImages' meanings do not leak: a DeleteImages IncorrectState stays permanent."""
    assert classify("InvalidImageId.IncorrectState") is ErrorClass.PERMANENT
    assert classify("InvalidImageId.IncorrectState", "DeleteImages") is ErrorClass.PERMANENT
    assert classify("InvalidImageId.NotFound", "CreateImage") is ErrorClass.PERMANENT
    unset = TencentError("InvalidImageId.IncorrectState", "m")
    assert unset.error_class is ErrorClass.PERMANENT


# -- the Image model -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        (0, 0),
        (42, 42),
        ("42", 42),
        (100, 100),
        (101, None),
        (-1, None),
        (True, None),
        ("soon", None),
        ([1], None),
    ],
)
def test_sync_percent_is_bounded_and_lenient(raw: object, expected: int | None) -> None:
    """Image.SyncPercent is kept when it is 0-100, else None; it never fails the page."""
    data = {"ImageId": "img-1", "ImageState": "SYNCING", "SyncPercent": raw}
    image = decode.image(data)
    assert image.state == "SYNCING"
    assert image.sync_percent == expected


# -- against the simulator: the real round trip -------------------------------------------


Start = Callable[..., Awaitable[tuple[Simulator, CvmClient]]]


@pytest.fixture
async def sim_client(sim_config: SimConfig) -> AsyncIterator[Start]:
    """Start a simulator with changes to the test config, and our client for it."""
    async with AsyncExitStack() as stack:

        async def start(**changes: Any) -> tuple[Simulator, CvmClient]:
            sim = await stack.enter_async_context(run_simulator(replace(sim_config, **changes)))
            creds = StaticCredentials(Credentials(TEST_SECRET_ID, TEST_SECRET_KEY))
            client = CvmClient(credentials=creds, endpoint=sim.url)
            return sim, await stack.enter_async_context(client)

        yield start


async def _wait_normal(client: CvmClient, region: str, image_id: str) -> int | None:
    """Poll DescribeImages (at most 5 s) until the copy is NORMAL; its last SyncPercent."""
    async with asyncio.timeout(5.0):
        while True:
            (image,) = await client.images_by_ids(region, [image_id])
            if image.state == "NORMAL":
                return image.sync_percent
            await asyncio.sleep(0.02)


async def test_copy_against_the_simulator(sim_client: Start) -> None:
    """A copy comes back with its id, is SYNCING with a percent, then NORMAL at 100."""
    _, client = await sim_client(sync_delay=(0.3, 0.3))
    result = await client.sync_images(TEST_REGION, SOURCE, [DEST], image_name=NAME)
    copy_id = result.image_id(DEST)
    assert copy_id is not None
    (image,) = await client.images_by_ids(DEST, [copy_id])
    assert (image.name, image.state) == (NAME, "SYNCING")
    assert image.sync_percent is not None
    assert 0 <= image.sync_percent < 100
    assert await _wait_normal(client, DEST, copy_id) == 100


async def test_dropped_answer_is_resolved_by_exact_name(sim_client: Start) -> None:
    """The answer is lost after the copy was made: the name look-up finds the one copy."""
    sim, client = await sim_client()
    sim.set_faults(Faults(drop_rate=1.0, after_create=1.0), action="SyncImages")
    with pytest.raises(TencentError) as info:
        await client.sync_images(TEST_REGION, SOURCE, [DEST], image_name=NAME)
    assert info.value.error_class is ErrorClass.TRANSIENT
    sim.clear_faults()
    (copy,) = await client.find_images_by_name(DEST, NAME)
    with pytest.raises(TencentError) as again:
        await client.sync_images(TEST_REGION, SOURCE, [DEST], image_name=NAME)
    assert again.value.error_class is ErrorClass.ALREADY_DONE
    assert [c.image_id for c in sim.state.iter_copies()] == [copy.image_id]


async def test_older_api_without_image_set(sim_client: Start) -> None:
    """An answer without ImageSet is resolved by the name look-up in the destination."""
    sim, client = await sim_client(sync_image_set=False)
    result = await client.sync_images(TEST_REGION, SOURCE, [DEST], image_name=NAME)
    assert result.copies == ()
    (copy,) = await client.find_images_by_name(DEST, NAME)
    assert sim.state.images[copy.image_id].copy_of == SOURCE


async def test_simulator_refusals_reach_the_client_classified(
    sim_client: Start,
) -> None:
    """The simulator's refusals arrive with the classes the engine branches on."""
    _, client = await sim_client(quota={TEST_REGION: 50, DEST: 0})
    cases = [
        ([DEST], ErrorClass.QUOTA),
        ([TEST_REGION], ErrorClass.PERMANENT),
    ]
    for destinations, expected in cases:
        with pytest.raises(TencentError) as info:
            await client.sync_images(TEST_REGION, SOURCE, destinations, image_name=NAME)
        assert info.value.error_class is expected, destinations
    with pytest.raises(TencentError) as gone:
        await client.sync_images(TEST_REGION, "img-nothere", ["ap-beijing"])
    assert gone.value.error_class is ErrorClass.GONE


async def test_shared_limiter_keeps_sync_images_under_the_limit(sim_config: SimConfig) -> None:
    """25 concurrent SyncImages DryRuns through the real limiters: zero throttles at 10/s."""
    async with (
        run_simulator(sim_config) as sim,
        CvmClient(
            credentials=StaticCredentials(Credentials(TEST_SECRET_ID, TEST_SECRET_KEY)),
            endpoint=sim.url,
            limiter=Limiters(),
        ) as client,
    ):
        calls = [
            client.sync_images(TEST_REGION, SOURCE, [DEST], image_name=NAME, dry_run=True)
            for _ in range(25)
        ]
        results = await asyncio.gather(*calls)
        assert all(r.dry_run for r in results)
        assert sim.state.count_calls("SyncImages") == 25
        assert sim.state.violations == {}
        assert sim.state.max_window("SyncImages") <= 10
