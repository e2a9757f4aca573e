"""Secrets never show in reprs, error text or the client's log events."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from orchestrator.tencent.client import CvmClient
from orchestrator.tencent.credentials import (
    ChainCredentials,
    Credentials,
    CredentialsError,
    EnvCredentials,
    StaticCredentials,
)
from orchestrator.tencent.errors import TencentError
from tests.fixtures.tencent import SECRET_ID, SECRET_KEY, TOKEN
from tests.tencent import fake_api as f


def _assert_clean(text: str) -> None:
    assert SECRET_KEY not in text
    assert TOKEN not in text


def test_credentials_repr_hides_secrets() -> None:
    """repr and str of Credentials and providers show neither the key nor the token."""
    creds = Credentials(SECRET_ID, SECRET_KEY, TOKEN)
    for text in (repr(creds), str(creds), repr(StaticCredentials(creds)), f"{creds}"):
        _assert_clean(text)
        assert SECRET_ID not in text  # even the id is masked
    assert "***" in repr(creds)


async def test_client_and_error_text_hide_secrets(
    make_client: Callable[..., CvmClient], fake: f.FakeApi, debug_logs: None
) -> None:
    """The client's repr, its errors and every log event carry no key or token."""
    fake.script("CreateImage", f.http(500), f.error("AuthFailure.SignatureFailure", "bad sig"))
    fake.script("DescribeImageQuota", f.ok(ImageNumQuota=3))
    errors: list[TencentError] = []
    with capture_logs() as events:
        async with make_client() as client:
            _assert_clean(repr(client) + str(client))
            for _ in range(2):
                with pytest.raises(TencentError) as info:
                    await client.create_image("ap-guangzhou", instance_id="ins-1", name="n")
                errors.append(info.value)
            await client.describe_image_quota("ap-guangzhou")
    for err in errors:
        _assert_clean(repr(err) + str(err) + repr(err.args))
    _assert_clean(repr(events))
    names = [e["event"] for e in events]
    assert names.count("api.error") == 2
    assert names.count("api.call") == 1
    call = next(e for e in events if e["event"] == "api.call")
    assert call["action"] == "DescribeImageQuota"
    assert call["region"] == "ap-guangzhou"
    assert call["request_id"].startswith("req-")
    codes = [e["code"] for e in events if e["event"] == "api.error"]
    assert codes == ["ServerNetworkError", "AuthFailure.SignatureFailure"]


async def test_credentials_errors_hide_secrets() -> None:
    """A chain failure names what was tried, never a value it read."""
    env = {"TENCENTCLOUD_SECRET_ID": SECRET_ID, "TENCENTCLOUD_SECRET_KEY": ""}
    chain = ChainCredentials([EnvCredentials(env=env)])
    with pytest.raises(CredentialsError) as info:
        await chain.get()
    assert SECRET_ID not in str(info.value)
    _assert_clean(repr(chain))
