"""The wire: content type, envelopes, signature checks, bad input, the inspection endpoint."""

from __future__ import annotations

import json
import time

import aiohttp

from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.signing import build_headers
from tests.fixtures.sim import TEST_SECRET_ID, TEST_SECRET_KEY
from tests.simulator.helpers import error_code, raw_call, sdk_call, sdk_client


async def test_content_type_is_exactly_application_json(simulator: Simulator) -> None:
    """Answers, errors included, carry `application/json` with no charset (the SDK needs it)."""
    ok = await raw_call(simulator, "DescribeImageQuota", {})
    bad = await raw_call(simulator, "DescribeImageQuota", {}, secret_key="wrong")
    assert (ok.status, ok.content_type) == (200, "application/json")
    assert (bad.status, bad.content_type) == (200, "application/json")
    assert set(bad.body["Response"]) == {"Error", "RequestId"}


async def test_expired_timestamp(simulator: Simulator) -> None:
    """A timestamp more than 300 s off answers AuthFailure.SignatureExpire."""
    old = int(time.time()) - 301
    answer = await raw_call(simulator, "DescribeImageQuota", {}, timestamp=old)
    assert error_code(answer) == "AuthFailure.SignatureExpire"
    recent = int(time.time()) - 200
    assert error_code(await raw_call(simulator, "DescribeImageQuota", {}, timestamp=recent)) is None


async def test_unknown_action(simulator: Simulator) -> None:
    """An action the simulator does not implement answers InvalidAction."""
    assert error_code(await raw_call(simulator, "RunInstances", {})) == "InvalidAction"


async def test_bad_json_body(simulator: Simulator) -> None:
    """A body that is not a JSON object answers InvalidParameter."""
    assert error_code(await raw_call(simulator, "DescribeImages", b"{nope")) == "InvalidParameter"
    assert error_code(await raw_call(simulator, "DescribeImages", b"[1]")) == "InvalidParameter"


async def test_missing_region(simulator: Simulator) -> None:
    """CVM calls without X-TC-Region answer MissingParameter."""
    answer = await raw_call(simulator, "DescribeImages", {}, region=None)
    assert error_code(answer) == "MissingParameter"


async def test_missing_authorization(simulator: Simulator) -> None:
    """A request without Authorization is refused."""
    headers = {"Content-Type": "application/json", "X-TC-Action": "DescribeImageQuota"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(simulator.url + "/", data=b"{}", headers=headers) as resp,
    ):
        body = await resp.json()
    assert body["Response"]["Error"]["Code"] == "AuthFailure.InvalidAuthorization"


async def test_secret_key_never_echoed(simulator: Simulator) -> None:
    """No answer, state dump or repr contains the secret key."""
    await raw_call(simulator, "DescribeImageQuota", {}, secret_key="wrong")
    await raw_call(simulator, "DescribeImageQuota", {})
    async with aiohttp.ClientSession() as session, session.get(simulator.url + "/_sim/state") as r:
        dump = await r.text()
    assert TEST_SECRET_KEY not in dump
    assert TEST_SECRET_KEY not in repr(simulator) + repr(simulator.config)


async def test_state_endpoint(simulator: Simulator) -> None:
    """GET /_sim/state shows images, deletions, calls with request ids, throttling, duplicates."""
    client = sdk_client(simulator)
    instance_id = simulator.config.instances[0].instance_id
    made = await sdk_call(client, "CreateImage", {"InstanceId": instance_id, "ImageName": "s1"})
    async with aiohttp.ClientSession() as session, session.get(simulator.url + "/_sim/state") as r:
        assert r.headers["Content-Type"] == "application/json"
        state = json.loads(await r.text())
    (image,) = [i for i in state["images"] if i["image_id"] == made["ImageId"]]
    assert (image["name"], image["instance_id"], image["state"]) == ("s1", instance_id, "CREATING")
    assert image["created"].endswith("Z")
    assert image["deleted"] is None
    (call,) = state["calls"]
    assert call["request_id"] == made["RequestId"]
    assert (call["action"], call["account"], call["code"]) == ("CreateImage", TEST_SECRET_ID, "OK")
    assert state["max_window"] == {"CreateImage": 1}
    assert (state["violations"], state["duplicates"], state["deletions"]) == ({}, [], [])


async def test_state_without_calls(simulator: Simulator) -> None:
    """`?calls=0` leaves the (possibly long) call list out."""
    await raw_call(simulator, "DescribeImageQuota", {})
    url = simulator.url + "/_sim/state?calls=0"
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        state = await r.json()
    assert "calls" not in state
    assert state["call_count"] == 1


async def test_sdk_async_client_query_form(simulator: Simulator) -> None:
    """A `POST /?` (the SDK async client's URL) is the same endpoint."""
    headers = build_headers(
        secret_id=TEST_SECRET_ID,
        secret_key=TEST_SECRET_KEY,
        token=None,
        service="cvm",
        host=simulator.endpoint,
        action="DescribeImageQuota",
        version="2017-03-12",
        region="ap-guangzhou",
        timestamp=int(time.time()),
        payload=b"{}",
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(simulator.url + "/?", data=b"{}", headers=headers) as resp,
    ):
        body = await resp.json()
    assert "ImageNumQuota" in body["Response"]


async def test_sdk_unsigned_payload(simulator: Simulator) -> None:
    """The SDK's unsigned-payload signing mode verifies too."""
    client = sdk_client(simulator, unsigned_payload=True)
    assert (await sdk_call(client, "DescribeImageQuota"))["ImageNumQuota"] > 0


async def test_wrong_api_version(simulator: Simulator) -> None:
    """Only API version 2017-03-12 exists."""
    headers = build_headers(
        secret_id=TEST_SECRET_ID,
        secret_key=TEST_SECRET_KEY,
        token=None,
        service="cvm",
        host=simulator.endpoint,
        action="DescribeImageQuota",
        version="2020-01-01",
        region="ap-guangzhou",
        timestamp=int(time.time()),
        payload=b"{}",
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(simulator.url + "/", data=b"{}", headers=headers) as resp,
    ):
        body = await resp.json()
    assert body["Response"]["Error"]["Code"] == "NoSuchVersion"
