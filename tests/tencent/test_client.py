"""CvmClient behaviour against a loopback fake of the Tencent API."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from orchestrator.tencent.client import CallWithheld, CvmClient
from orchestrator.tencent.errors import ErrorClass, TencentError
from orchestrator.tencent.models import Filter
from tests.fixtures.tencent import SECRET_ID, SECRET_KEY, TOKEN, RecordingLimiter
from tests.tencent import fake_api as f
from tests.tencent.sdk_oracle import sdk_request, signed_headers


def _image(n: int, name: str | None = None) -> f.Json:
    return {
        "ImageId": f"img-{n:08d}",
        "ImageName": name or f"bk-{n}",
        "ImageState": "NORMAL",
        "ImageType": "PRIVATE_IMAGE",
        "CreatedTime": "2024-05-01T03:00:00Z",
        "ImageSize": 50,
        "Tags": [{"Key": "cvm-backup", "Value": "p1"}],
    }


def _instance(n: int) -> f.Json:
    return {"InstanceId": f"ins-{n:08d}", "InstanceName": f"web-{n}", "InstanceState": "RUNNING"}


async def test_wire_headers_match_the_sdk(client: CvmClient, fake: f.FakeApi) -> None:
    """The headers and body on the wire are the ones the SDK computes for the same instant."""
    fake.script("DescribeImages", f.ok(ImageSet=[], TotalCount=0))
    await client.describe_images("ap-guangzhou", filters=[Filter("image-name", ("名前",))])
    (got,) = fake.received
    req = sdk_request(
        secret_id=SECRET_ID,
        secret_key=SECRET_KEY,
        token=TOKEN,
        host=fake.url.removeprefix("http://"),
        action="DescribeImages",
        region="ap-guangzhou",
        timestamp=int(got.headers["X-TC-Timestamp"]),
        params=got.params,
        language="en-US",
    )
    assert got.body == req.data.encode()
    assert b"\\u540d" in got.body  # non-ASCII escaped, as the SDK does
    for name, value in signed_headers(req).items():
        assert got.headers[name] == value, name
    assert got.headers["X-TC-TraceId"]


async def test_create_image_request_shape(client: CvmClient, fake: f.FakeApi) -> None:
    """CreateImage sends string flags, the tag specification and disks; returns the ImageId."""
    fake.script("CreateImage", f.ok(ImageId="img-abc"))
    result = await client.create_image(
        "ap-guangzhou",
        instance_id="ins-1",
        name="cvmbk-p-ins-1-20240501T0300Z",
        description="nightly",
        force_poweroff=True,
        data_disk_ids=["disk-1", "disk-2"],
        tags={"cvm-backup": "p", "slot": "20240501T0300Z"},
    )
    assert result.image_id == "img-abc"
    assert result.request_id.startswith("req-")
    assert not result.dry_run
    assert fake.calls("CreateImage")[0].params == {
        "ImageName": "cvmbk-p-ins-1-20240501T0300Z",
        "InstanceId": "ins-1",
        "ImageDescription": "nightly",
        "ForcePoweroff": "true",
        "Sysprep": "false",
        "DataDiskIds": ["disk-1", "disk-2"],
        "TagSpecification": [
            {
                "ResourceType": "image",
                "Tags": [
                    {"Key": "cvm-backup", "Value": "p"},
                    {"Key": "slot", "Value": "20240501T0300Z"},
                ],
            }
        ],
    }


async def test_create_image_without_image_id(client: CvmClient, fake: f.FakeApi) -> None:
    """A success without ImageId (the older API) gives image_id None, to be resolved by name."""
    fake.script("CreateImage", f.ok())
    result = await client.create_image("ap-guangzhou", instance_id="ins-1", name="n")
    assert result.image_id is None
    assert not result.dry_run


async def test_create_image_dry_run(client: CvmClient, fake: f.FakeApi) -> None:
    """DryRunOperation is a successful DryRun, not an error."""
    fake.script("CreateImage", f.error("DryRunOperation", "would have succeeded"))
    result = await client.create_image("ap-guangzhou", instance_id="ins-1", name="n", dry_run=True)
    assert result.dry_run
    assert result.image_id is None
    assert result.request_id.startswith("req-")
    assert fake.calls("CreateImage")[0].params["DryRun"] is True


async def test_guard_saying_no_at_the_grant_withholds_the_call(
    client: CvmClient, fake: f.FakeApi
) -> None:
    """A guard asked after the limiter's grant can withhold CreateImage: nothing is sent."""
    fake.script("CreateImage", f.ok(ImageId="img-abc"))
    with pytest.raises(CallWithheld):
        await client.create_image(
            "ap-guangzhou", instance_id="ins-1", name="n", guard=lambda: False
        )
    assert fake.calls("CreateImage") == []
    result = await client.create_image(
        "ap-guangzhou", instance_id="ins-1", name="n", guard=lambda: True
    )
    assert result.image_id == "img-abc"


async def test_business_error_carries_code_message_and_request_id(
    client: CvmClient, fake: f.FakeApi
) -> None:
    """A Tencent error answer raises once, with its code, message and request id."""
    fake.script("CreateImage", f.error("InvalidImageName.Duplicate", "name exists"))
    with pytest.raises(TencentError) as info:
        await client.create_image("ap-guangzhou", instance_id="ins-1", name="n")
    assert info.value.code == "InvalidImageName.Duplicate"
    assert info.value.message == "name exists"
    assert (info.value.request_id or "").startswith("req-")
    assert len(fake.calls("CreateImage")) == 1


async def test_http_500_on_create_is_not_retried(client: CvmClient, fake: f.FakeApi) -> None:
    """HTTP 500 on CreateImage is a transient ServerNetworkError, raised without in-call retry."""
    fake.script("CreateImage", f.http(500))
    with pytest.raises(TencentError) as info:
        await client.create_image("ap-guangzhou", instance_id="ins-1", name="n")
    assert info.value.code == "ServerNetworkError"
    assert info.value.error_class is ErrorClass.TRANSIENT
    assert "500" in info.value.message
    assert len(fake.calls("CreateImage")) == 1


async def test_http_500_on_describe_is_retried(
    client: CvmClient, fake: f.FakeApi, limiter: RecordingLimiter
) -> None:
    """Read-only actions retry transient errors in-call and reacquire the limiter each attempt."""
    fake.script("DescribeImageQuota", f.http(502), f.http(503), f.ok(ImageNumQuota=20))
    assert await client.describe_image_quota("ap-guangzhou") == 20
    assert len(fake.calls("DescribeImageQuota")) == 3
    assert limiter.acquired == [("acct-a", "DescribeImageQuota")] * 3


async def test_transient_describe_gives_up_after_three(client: CvmClient, fake: f.FakeApi) -> None:
    """The in-call budget for transient errors is three attempts."""
    fake.script("DescribeImageQuota", *[f.http(500)] * 4)
    with pytest.raises(TencentError) as info:
        await client.describe_image_quota("ap-guangzhou")
    assert info.value.code == "ServerNetworkError"
    assert len(fake.calls("DescribeImageQuota")) == 3


@pytest.mark.parametrize(
    "body",
    [
        b"<html>gateway</html>",
        b"[]",
        b'{"Other": {}}',
        b'{"Response": {}}',
        b'{"Response": "x"}',
        b'{"Response": {"Error": "broken", "RequestId": "r"}}',
    ],
)
async def test_garbage_200_is_invalid_response(
    client: CvmClient, fake: f.FakeApi, body: bytes
) -> None:
    """A 200 whose body is not a Tencent answer is a transient InvalidResponse."""
    fake.script("CreateImage", f.raw(body))
    with pytest.raises(TencentError) as info:
        await client.create_image("ap-guangzhou", instance_id="ins-1", name="n")
    assert info.value.code == "InvalidResponse"
    assert info.value.error_class is ErrorClass.TRANSIENT


async def test_bad_field_shape_is_invalid_response(client: CvmClient, fake: f.FakeApi) -> None:
    """A Tencent-looking answer with a malformed field is InvalidResponse, not a crash."""
    fake.script("DescribeImages", *[f.ok(ImageSet=[{"NoId": 1}], TotalCount=1)] * 3)
    with pytest.raises(TencentError) as info:
        await client.describe_images("ap-guangzhou")
    assert info.value.code == "InvalidResponse"
    assert info.value.request_id


async def test_dropped_connection_on_create(client: CvmClient, fake: f.FakeApi) -> None:
    """A dropped CreateImage is a ClientNetworkError, not retried (the image may exist)."""
    fake.script("CreateImage", f.drop(), f.ok(ImageId="img-x"))
    with pytest.raises(TencentError) as info:
        await client.create_image("ap-guangzhou", instance_id="ins-1", name="n")
    assert info.value.code == "ClientNetworkError"
    assert len(fake.calls("CreateImage")) == 1


async def test_dropped_connection_on_describe_is_retried(
    client: CvmClient, fake: f.FakeApi
) -> None:
    """A dropped Describe* call is retried in-call."""
    fake.script("DescribeImages", f.drop(), f.ok(ImageSet=[_image(1)], TotalCount=1))
    page = await client.describe_images("ap-guangzhou")
    assert [i.image_id for i in page.images] == ["img-00000001"]
    assert len(fake.calls("DescribeImages")) == 2


async def test_timeout_is_client_network_error(
    make_client: Callable[..., CvmClient], fake: f.FakeApi
) -> None:
    """No answer within the timeout is a ClientNetworkError."""
    release = asyncio.Event()
    fake.script("DeleteImages", f.hang(release))
    async with make_client(timeout=0.2) as client:
        with pytest.raises(TencentError) as info:
            await client.delete_images("ap-guangzhou", ["img-1"])
    release.set()
    assert info.value.code == "ClientNetworkError"


async def test_connection_refused_is_client_network_error(
    make_client: Callable[..., CvmClient],
) -> None:
    """Nothing listening is a ClientNetworkError."""
    async with make_client(endpoint="http://127.0.0.1:1") as client:
        with pytest.raises(TencentError) as info:
            await client.create_image("ap-guangzhou", instance_id="ins-1", name="n")
    assert info.value.code == "ClientNetworkError"


async def test_throttle_then_success(
    client: CvmClient, fake: f.FakeApi, limiter: RecordingLimiter
) -> None:
    """A throttled CreateImage tells the limiter, reacquires, and is retried (it never ran)."""
    fake.script(
        "CreateImage",
        f.error("RequestLimitExceeded", "too fast"),
        f.error("RequestLimitExceeded.UinLimitExceeded", "too fast"),
        f.ok(ImageId="img-1"),
    )
    result = await client.create_image("ap-guangzhou", instance_id="ins-1", name="n")
    assert result.image_id == "img-1"
    assert limiter.throttles == [("acct-a", "CreateImage")] * 2
    assert limiter.acquired == [("acct-a", "CreateImage")] * 3


async def test_throttle_budget_is_bounded(
    client: CvmClient, fake: f.FakeApi, limiter: RecordingLimiter
) -> None:
    """After five throttled retries the throttle error is raised to the engine."""
    fake.script("DeleteImages", *[f.error("RequestLimitExceeded")] * 7)
    with pytest.raises(TencentError) as info:
        await client.delete_images("ap-guangzhou", ["img-1"])
    assert info.value.error_class is ErrorClass.THROTTLED
    assert len(fake.calls("DeleteImages")) == 6
    assert len(limiter.throttles) == 6


async def test_works_without_limiter(
    make_client: Callable[..., CvmClient], fake: f.FakeApi
) -> None:
    """The limiter is optional; throttles are still retried."""
    fake.script("DescribeImageQuota", f.error("RequestLimitExceeded"), f.ok(ImageNumQuota=7))
    async with make_client(limiter=None) as client:
        assert await client.describe_image_quota("ap-guangzhou") == 7


async def test_iter_images_paginates(client: CvmClient, fake: f.FakeApi) -> None:
    """iter_images walks Offset/Limit 100 pages until TotalCount."""
    images = [_image(n) for n in range(250)]
    fake.defaults["DescribeImages"] = f.paginated("ImageSet", images, "ImageId", "ImageIds")
    tag = [Filter("tag:cvm-backup", ("p1",))]
    got = [i.image_id async for i in client.iter_images("ap-guangzhou", filters=tag)]
    assert got == [i["ImageId"] for i in images]
    sent = [(r.params["Offset"], r.params["Limit"]) for r in fake.calls("DescribeImages")]
    assert sent == [(0, 100), (100, 100), (200, 100)]
    assert fake.calls("DescribeImages")[0].params["Filters"] == [
        {"Name": "tag:cvm-backup", "Values": ["p1"]}
    ]


async def test_images_by_ids_batches(client: CvmClient, fake: f.FakeApi) -> None:
    """images_by_ids asks for at most 100 distinct ids per call and skips unknown ids."""
    images = [_image(n) for n in range(200)]
    fake.defaults["DescribeImages"] = f.paginated("ImageSet", images, "ImageId", "ImageIds")
    wanted = [f"img-{n:08d}" for n in range(230)] + ["img-00000001"]
    got = await client.images_by_ids("ap-guangzhou", wanted)
    assert [i.image_id for i in got] == [i["ImageId"] for i in images]
    assert [len(r.params["ImageIds"]) for r in fake.calls("DescribeImages")] == [100, 100, 30]


async def test_find_images_by_name_is_exact(client: CvmClient, fake: f.FakeApi) -> None:
    """The fuzzy image-name filter is narrowed to an exact match client-side."""
    images = [_image(1, "bk-1"), _image(2, "bk-10"), _image(3, "xbk-1"), _image(4, "other")]
    fake.defaults["DescribeImages"] = f.paginated("ImageSet", images, "ImageId", "ImageIds")
    found = await client.find_images_by_name("ap-guangzhou", "bk-1")
    assert [i.image_id for i in found] == ["img-00000001"]
    params = fake.calls("DescribeImages")[0].params
    assert params["Filters"] == [{"Name": "image-name", "Values": ["bk-1"]}]


async def test_iter_instances_by_ids_and_filters(client: CvmClient, fake: f.FakeApi) -> None:
    """iter_instances chunks ids by 100, and paginates filters."""
    instances = [_instance(n) for n in range(150)]
    handler = f.paginated("InstanceSet", instances, "InstanceId", "InstanceIds")
    fake.defaults["DescribeInstances"] = handler
    ids = [i["InstanceId"] for i in instances]
    got = [i.instance_id async for i in client.iter_instances("ap-guangzhou", instance_ids=ids)]
    assert got == ids
    by_filter = client.iter_instances("ap-guangzhou", filters=[Filter("tag:backup", ("x",))])
    assert [i.instance_id async for i in by_filter] == ids
    sizes = [len(r.params.get("InstanceIds", ())) for r in fake.calls("DescribeInstances")]
    assert sizes == [100, 50, 0, 0]


async def test_delete_images_request_and_dry_run(client: CvmClient, fake: f.FakeApi) -> None:
    """DeleteImages deletes bound snapshots by default; a DryRunOperation answer is ok."""
    fake.script("DeleteImages", f.ok(), f.error("DryRunOperation"))
    request_id = await client.delete_images("ap-guangzhou", ["img-1", "img-2"])
    assert request_id.startswith("req-")
    dry_id = await client.delete_images("ap-guangzhou", ["img-1"], dry_run=True)
    assert dry_id.startswith("req-")
    first, second = (r.params for r in fake.calls("DeleteImages"))
    assert first == {"ImageIds": ["img-1", "img-2"], "DeleteBindedSnap": True}
    assert second == {"ImageIds": ["img-1"], "DeleteBindedSnap": True, "DryRun": True}


async def test_ids_and_filters_together_refused(client: CvmClient) -> None:
    """ImageIds and Filters cannot be combined (the API refuses it); we refuse before calling."""
    with pytest.raises(ValueError, match="cannot be combined"):
        await client.describe_images("ap-guangzhou", image_ids=["img-1"], filters=[Filter("a", ())])


async def test_unopened_client_refuses(make_client: Callable[..., CvmClient]) -> None:
    """A client used outside `async with` says so instead of leaking a session."""
    with pytest.raises(RuntimeError, match="not open"):
        await make_client().call("DescribeImageQuota", "ap-guangzhou", {})


async def test_call_returns_raw_response(client: CvmClient, fake: f.FakeApi) -> None:
    """call() returns the raw Response object of any action."""
    fake.script("DescribeZones", f.ok(ZoneSet=[{"Zone": "ap-guangzhou-3"}], TotalCount=1))
    response: dict[str, Any] = await client.call("DescribeZones", "ap-guangzhou", {})
    assert response["ZoneSet"] == [{"Zone": "ap-guangzhou-3"}]
    assert fake.received[0].headers["X-TC-Region"] == "ap-guangzhou"


async def test_retries_are_logged_per_attempt(
    client: CvmClient, fake: f.FakeApi, debug_logs: None
) -> None:
    """Each failed attempt is an api.error with its attempt number; the success names its own."""
    fake.script("DescribeImageQuota", f.error("RequestLimitExceeded"), f.ok(ImageNumQuota=1))
    with capture_logs() as events:
        await client.describe_image_quota("ap-guangzhou")
    error, call = (e for e in events if e["event"].startswith("api."))
    assert (error["event"], error["attempt"], error["code"]) == (
        "api.error",
        1,
        "RequestLimitExceeded",
    )
    assert error["retry_in"] is not None
    assert (call["event"], call["attempt"]) == ("api.call", 2)
