"""The official SDK, used as an oracle for signing and decoding."""

from __future__ import annotations

from typing import Any
from unittest import mock

from tencentcloud.common.credential import Credential
from tencentcloud.common.http.request import RequestInternal
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile
from tencentcloud.cvm.v20170312.cvm_client import CvmClient as SdkCvmClient

# Headers the SDK adds that are not signed and vary per SDK build or per call.
UNSIGNED_EXTRAS = frozenset({"X-TC-RequestClient", "X-TC-TraceId"})


def sdk_client(
    endpoint: str,
    *,
    secret_id: str = "AKIDoracle",  # noqa: S107 - a dummy for the oracle
    secret_key: str = "oracle-key",  # noqa: S107
    token: str | None = None,
    region: str | None = "ap-guangzhou",
    language: str = "en-US",
    protocol: str = "https",
) -> SdkCvmClient:
    """An official CVM client for `endpoint` (host[:port], no scheme)."""
    http = HttpProfile(protocol=protocol, endpoint=endpoint)
    profile = ClientProfile(httpProfile=http, language=language)
    return SdkCvmClient(Credential(secret_id, secret_key, token), region, profile)


def sdk_request(
    *,
    secret_id: str,
    secret_key: str,
    token: str | None,
    host: str,
    action: str,
    region: str | None,
    timestamp: int,
    params: dict[str, Any],
    language: str,
) -> RequestInternal:
    """The request the official CVM client builds, with its clock pinned to `timestamp`."""
    client = sdk_client(
        host,
        secret_id=secret_id,
        secret_key=secret_key,
        token=token,
        region=region,
        language=language,
    )
    req = RequestInternal(host, "POST", "/", header={})
    with mock.patch("tencentcloud.common.abstract_client.time.time", return_value=timestamp):
        client._build_req_with_tc3_signature(action, params, req)
    client.request.conn._session.close()
    return req


def signed_headers(req: RequestInternal) -> dict[str, str]:
    """The SDK request's headers without its unsigned per-build extras."""
    return {k: v for k, v in req.header.items() if k not in UNSIGNED_EXTRAS}
