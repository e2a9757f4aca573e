"""The script a user writes first: a sequential loop over the official SDK, then polling.

    for each instance: CreateImage (errors are printed and the loop goes on)
    until every image made is built: DescribeImages, 100 ids per call, once a second

No rate limiting, no retries (the SDK's default), no resolution by name: what the SDK gives
out of the box. The `pause` variant sleeps after each call, the first fix a user reaches for
after seeing RequestLimitExceeded (`time.sleep(0.1)`). The SDK is a test dependency, imported
only when the baseline runs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.bench.simside import REGION, SECRET_ID, SECRET_KEY

MISSING_SDK = (
    "baseline skipped: the official SDK is not installed "
    "(install cvm-backup[test] for the baseline)"
)
_POLL_EVERY = 1.0
_BATCH = 100


class SdkMissing(RuntimeError):
    """tencentcloud-sdk-python-cvm is not importable."""


@dataclass(slots=True)
class BaselineResult:
    """What the loop saw: images made, errors by code, and how long it took."""

    created: int = 0
    built: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    create_seconds: float = 0.0
    seconds: float = 0.0


def sdk_client(endpoint: str) -> Any:
    """The official sync CvmClient on the simulator, as its README shows (plus http)."""
    try:
        from tencentcloud.common import credential
        from tencentcloud.common.profile.client_profile import ClientProfile
        from tencentcloud.common.profile.http_profile import HttpProfile
        from tencentcloud.cvm.v20170312 import cvm_client
    except ImportError as exc:
        raise SdkMissing(MISSING_SDK) from exc
    profile = ClientProfile(httpProfile=HttpProfile(protocol="http", endpoint=endpoint))
    return cvm_client.CvmClient(credential.Credential(SECRET_ID, SECRET_KEY), REGION, profile)


def run_baseline(
    endpoint: str, instance_ids: Sequence[str], timeout: float, pause: float = 0.0
) -> BaselineResult:
    """The sequential loop (blocking: run it in a thread next to an in-process simulator)."""
    client = sdk_client(endpoint)
    result = BaselineResult()
    started = time.monotonic()
    stamp = time.strftime("%Y%m%d%H%M", time.gmtime())
    pending = []
    for instance_id in instance_ids:
        image_id = _create(client, instance_id, stamp, result)
        if image_id:
            pending.append(image_id)
        if pause:
            time.sleep(pause)
    result.created = len(pending)
    result.create_seconds = round(time.monotonic() - started, 2)
    result.built = _wait_built(client, pending, result, started + timeout)
    result.seconds = round(time.monotonic() - started, 2)
    return result


def _create(client: Any, instance_id: str, stamp: str, result: BaselineResult) -> str | None:
    from tencentcloud.common.exception.tencent_cloud_sdk_exception import (
        TencentCloudSDKException,
    )
    from tencentcloud.cvm.v20170312 import models

    request = models.CreateImageRequest()
    request.InstanceId = instance_id
    request.ImageName = f"backup-{instance_id}-{stamp}"
    try:
        image_id: str | None = client.CreateImage(request).ImageId
    except TencentCloudSDKException as exc:
        result.errors[str(exc.get_code())] += 1
        return None
    return image_id


def _wait_built(client: Any, image_ids: list[str], result: BaselineResult, deadline: float) -> int:
    """Poll until no image is CREATING; how many ended NORMAL."""
    pending, built = set(image_ids), 0
    while pending and time.monotonic() < deadline:
        time.sleep(_POLL_EVERY)
        for chunk in _chunks(sorted(pending)):
            for image_id, state in _describe(client, chunk, result).items():
                if state != "CREATING":
                    pending.discard(image_id)
                    built += state == "NORMAL"
    return built


def _describe(client: Any, ids: list[str], result: BaselineResult) -> dict[str, str]:
    from tencentcloud.common.exception.tencent_cloud_sdk_exception import (
        TencentCloudSDKException,
    )
    from tencentcloud.cvm.v20170312 import models

    request = models.DescribeImagesRequest()
    request.ImageIds = ids
    request.Limit = _BATCH
    try:
        images = client.DescribeImages(request).ImageSet or []
    except TencentCloudSDKException as exc:
        result.errors[f"DescribeImages:{exc.get_code()}"] += 1
        return {}
    return {image.ImageId: image.ImageState for image in images}


def _chunks(ids: list[str]) -> list[list[str]]:
    return [ids[i : i + _BATCH] for i in range(0, len(ids), _BATCH)]
