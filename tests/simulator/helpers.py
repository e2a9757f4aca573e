"""Clients for the simulator tests: the official SDK, and raw signed HTTP for edge cases."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from tencentcloud.common import credential
from tencentcloud.common.exception.tencent_cloud_sdk_exception import (
    TencentCloudSDKException,
)
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.cvm.v20170312 import cvm_client, models

from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.signing import build_headers
from tests.fixtures.sim import TEST_REGION, TEST_SECRET_ID, TEST_SECRET_KEY

Json = dict[str, Any]
WAIT = 5.0


class Target(Protocol):
    """Where a simulator listens: a Simulator, or a process's address."""

    @property
    def url(self) -> str: ...

    @property
    def endpoint(self) -> str: ...


@dataclass(frozen=True)
class Address:
    """A simulator running elsewhere (a subprocess)."""

    url: str

    @property
    def endpoint(self) -> str:
        """`127.0.0.1:PORT`."""
        return self.url.removeprefix("http://")


def sdk_client(
    sim: Simulator,
    *,
    secret_id: str = TEST_SECRET_ID,
    secret_key: str = TEST_SECRET_KEY,
    token: str | None = None,
    region: str = TEST_REGION,
    unsigned_payload: bool = False,
) -> cvm_client.CvmClient:
    """The official sync CvmClient pointed at the simulator."""
    profile = ClientProfile(httpProfile=HttpProfile(protocol="http", endpoint=sim.endpoint))
    profile.unsignedPayload = unsigned_payload
    cred = credential.Credential(secret_id, secret_key, token)
    return cvm_client.CvmClient(cred, region, profile)


async def sdk_call(client: cvm_client.CvmClient, action: str, params: Json | None = None) -> Json:
    """One SDK call in a worker thread; the response as a dict."""
    request = getattr(models, f"{action}Request")()
    request.from_json_string(json.dumps(params or {}))
    response = await asyncio.to_thread(getattr(client, action), request)
    result: Json = json.loads(response.to_json_string())
    return result


async def sdk_error(client: cvm_client.CvmClient, action: str, params: Json | None = None) -> str:
    """The error code of an SDK call that must fail."""
    try:
        await sdk_call(client, action, params)
    except TencentCloudSDKException as exc:
        return str(exc.get_code())
    raise AssertionError(f"{action} succeeded")


@dataclass
class RawAnswer:
    """An HTTP answer, undecoded."""

    status: int
    content_type: str | None
    body: Json


async def raw_call(
    sim: Target,
    action: str,
    payload: bytes | Json,
    *,
    secret_key: str = TEST_SECRET_KEY,
    region: str | None = TEST_REGION,
    timestamp: int | None = None,
    token: str | None = None,
) -> RawAnswer:
    """A call signed by our own signer, for bodies and headers the SDK would never send."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = build_headers(
        secret_id=TEST_SECRET_ID,
        secret_key=secret_key,
        token=token,
        service="cvm",
        host=sim.endpoint,
        action=action,
        version="2017-03-12",
        region=region,
        timestamp=int(time.time()) if timestamp is None else timestamp,
        payload=body,
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(sim.url + "/", data=body, headers=headers) as resp,
    ):
        return RawAnswer(resp.status, resp.headers.get("Content-Type"), await resp.json())


def error_code(answer: RawAnswer) -> str | None:
    """The Response.Error.Code of an answer, None for a success."""
    error = answer.body["Response"].get("Error")
    return None if error is None else str(error["Code"])


async def wait_for_state(sim: Simulator, image_id: str, state: str) -> None:
    """Poll the store until an image reaches a state (at most WAIT seconds)."""
    async with asyncio.timeout(WAIT):
        while True:
            if sim.state.images[image_id].state == state:
                return
            await asyncio.sleep(0.01)


class FrozenClock:
    """A monotonic clock that moves only when told, for exact rate-window tests."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds
