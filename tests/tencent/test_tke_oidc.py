"""TKE OIDC role credentials against a loopback STS fake, and beside the official SDK's provider."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from tencentcloud.common import credential as sdk_credential
from tencentcloud.common.profile.http_profile import HttpProfile

from orchestrator import cli
from orchestrator.errors import UsageError
from orchestrator.tencent.credentials import (
    CredentialsError,
    TkeOidcCredentials,
    default_chain,
)
from orchestrator.tencent.errors import ErrorClass

ROLE_ARN = "qcs::cam::uin/100000000001:roleName/cvm-backup"
PROVIDER_ID = "cls-abcd1234"
# Shaped like a JWT: three dot-separated base64url segments.
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmF0dXJlLXBhcnQtMDE"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
# Headers HTTP libraries add on their own; they say nothing about the STS request.
TRANSPORT_HEADERS = frozenset(
    {"accept", "accept-encoding", "connection", "content-length", "user-agent"}
)


class FakeSts:
    """AssumeRoleWithWebIdentity on loopback: records each request, answers keys or an error."""

    def __init__(self) -> None:
        # Whole seconds, so ExpiredTime is exactly now + expires_in; tests move it by hand.
        self.now = float(int(time.time()))
        self.expires_in = 7200
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.error: tuple[str, str] | None = None
        self.status = 200
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if self.status != 200:
            return web.Response(status=self.status, text="upstream trouble")
        if self.error is not None:
            code, message = self.error
            answer: dict[str, Any] = {"Error": {"Code": code, "Message": message}}
        else:
            n = len(self.requests)
            answer = {
                "Credentials": {
                    "Token": f"sts-token-{n}",
                    "TmpSecretId": f"AKIDsts{n:04d}",
                    "TmpSecretKey": f"sts-secret-key-{n}",
                },
                "ExpiredTime": int(self.now) + self.expires_in,
                "Expiration": "2030-01-01T00:00:00Z",
            }
        answer["RequestId"] = f"req-{len(self.requests)}"
        return web.json_response({"Response": answer})

    def params(self, index: int = -1) -> dict[str, Any]:
        """The JSON body of one recorded request."""
        params: dict[str, Any] = json.loads(self.requests[index][1])
        return params


@pytest.fixture
async def sts() -> AsyncIterator[FakeSts]:
    """A started STS fake."""
    fake = FakeSts()
    app = web.Application()
    app.router.add_post("/", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield fake
    await runner.cleanup()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    """A projected service-account token, as the kubelet writes it (no trailing newline)."""
    path = tmp_path / "token"
    path.write_text(TOKEN, encoding="ascii")
    return path


@pytest.fixture
def tke_env(token_file: Path) -> dict[str, str]:
    """The four variables TKE injects into a pod with an OIDC role."""
    return {
        "TKE_REGION": "ap-guangzhou",
        "TKE_PROVIDER_ID": PROVIDER_ID,
        "TKE_WEB_IDENTITY_TOKEN_FILE": str(token_file),
        "TKE_ROLE_ARN": ROLE_ARN,
    }


def _provider(sts: FakeSts, env: dict[str, str]) -> TkeOidcCredentials:
    return TkeOidcCredentials(env, sts_url=sts.url, clock=lambda: sts.now)


async def test_keys_from_an_unsigned_sts_call(sts: FakeSts, tke_env: dict[str, str]) -> None:
    """The pod's token buys temporary keys with an unsigned AssumeRoleWithWebIdentity."""
    creds = await _provider(sts, tke_env).get()
    assert (creds.secret_id, creds.secret_key, creds.token) == (
        "AKIDsts0001",
        "sts-secret-key-1",
        "sts-token-1",
    )
    assert creds.expires_at == sts.now + 7200
    assert creds.source == f"tke-oidc:{ROLE_ARN}"
    headers, _ = sts.requests[0]
    assert headers["Authorization"] == "SKIP"
    assert "X-TC-Token" not in headers
    assert headers["X-TC-Action"] == "AssumeRoleWithWebIdentity"
    assert headers["X-TC-Version"] == "2018-08-13"
    assert headers["X-TC-Region"] == "ap-guangzhou"
    params = sts.params()
    assert params["ProviderId"] == PROVIDER_ID
    assert params["WebIdentityToken"] == TOKEN
    assert params["RoleArn"] == ROLE_ARN
    assert params["DurationSeconds"] == 7200
    assert params["RoleSessionName"].startswith("cvm-backup-")


async def test_keys_cached_then_refreshed_a_tenth_before_expiry(
    sts: FakeSts, tke_env: dict[str, str], token_file: Path
) -> None:
    """Keys are reused until 720 s before expiry, then bought again with the rotated token."""
    provider = _provider(sts, tke_env)
    first = await provider.get()
    sts.now += 7200 - 721
    assert await provider.get() is first
    assert len(sts.requests) == 1
    await asyncio.to_thread(token_file.write_text, TOKEN + "rotated", "ascii")  # kubelet rotates it
    sts.now += 2  # now 719 s before expiry: inside the margin
    second = await provider.get()
    assert second.secret_id == "AKIDsts0002"
    assert second.expires_at == sts.now + 7200
    assert sts.params()["WebIdentityToken"] == TOKEN + "rotated"


async def test_refresh_failure_keeps_unexpired_keys(sts: FakeSts, tke_env: dict[str, str]) -> None:
    """STS down during a refresh keeps keys that have not expired; expired keys fail."""
    provider = _provider(sts, tke_env)
    first = await provider.get()
    sts.status = 503
    sts.now += 7200 - 100
    assert await provider.get() is first
    sts.now += 200
    with pytest.raises(CredentialsError, match="HTTP 503"):
        await provider.get()


async def test_missing_token_file_named(
    sts: FakeSts, tke_env: dict[str, str], tmp_path: Path
) -> None:
    """A token file that does not exist is refused with its path, and STS is not called."""
    tke_env["TKE_WEB_IDENTITY_TOKEN_FILE"] = str(tmp_path / "gone")
    with pytest.raises(CredentialsError, match=r"token file .*gone: No such file") as info:
        await _provider(sts, tke_env).get()
    assert info.value.error_class is ErrorClass.ACCOUNT
    assert not info.value.malformed
    assert sts.requests == []


async def test_unreadable_token_file_named(
    sts: FakeSts, tke_env: dict[str, str], tmp_path: Path
) -> None:
    """A token path that cannot be read (here a directory) is refused with the reason."""
    tke_env["TKE_WEB_IDENTITY_TOKEN_FILE"] = str(tmp_path)
    with pytest.raises(CredentialsError, match="Is a directory"):
        await _provider(sts, tke_env).get()
    assert sts.requests == []


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (b"\xff\xfe token", "not ASCII"), (b"a" * (64 * 1024 + 1), "larger than")],
)
async def test_token_file_that_holds_no_token(
    sts: FakeSts, tke_env: dict[str, str], token_file: Path, content: bytes, reason: str
) -> None:
    """An empty, binary or oversized token file is refused without sending anything."""
    await asyncio.to_thread(token_file.write_bytes, content)
    with pytest.raises(CredentialsError, match=reason):
        await _provider(sts, tke_env).get()
    assert sts.requests == []


async def test_missing_variables_listed(sts: FakeSts, tke_env: dict[str, str]) -> None:
    """Without the TKE variables the provider names every one that is missing."""
    del tke_env["TKE_REGION"], tke_env["TKE_ROLE_ARN"]
    with pytest.raises(CredentialsError, match="TKE_REGION, TKE_ROLE_ARN not set"):
        await _provider(sts, tke_env).get()


async def test_sts_error_answer_named_without_the_token(
    sts: FakeSts, tke_env: dict[str, str]
) -> None:
    """An STS error is a CredentialsError with code, message and request id, never the token."""
    # A hostile or careless answer that echoes what it was sent.
    sts.error = ("InvalidParameter.WebIdentityTokenError", f"token {TOKEN} is expired")
    with pytest.raises(CredentialsError) as info:
        await _provider(sts, tke_env).get()
    text = f"{info.value.message} {info.value!r} {info.value}"
    assert "InvalidParameter.WebIdentityTokenError" in text
    assert "req-1" in text
    assert ROLE_ARN in text
    for part in (TOKEN, *TOKEN.split(".")):
        assert part not in text
    assert info.value.error_class is ErrorClass.ACCOUNT


async def test_keys_expired_on_arrival_refused(sts: FakeSts, tke_env: dict[str, str]) -> None:
    """Keys that expired on arrival (a wrong clock) are refused, not fetched on every call."""
    sts.expires_in = -5
    with pytest.raises(CredentialsError, match="check the clock"):
        await _provider(sts, tke_env).get()


def test_sts_url_is_https_except_loopback(tke_env: dict[str, str]) -> None:
    """Plain http to a non-loopback STS URL is bad input naming CVM_BACKUP_STS_URL."""
    with pytest.raises(UsageError, match=r"CVM_BACKUP_STS_URL: .*only for loopback"):
        TkeOidcCredentials(tke_env, sts_url="http://sts.tencentcloudapi.com")
    with pytest.raises(UsageError, match=r"CVM_BACKUP_STS_URL: .*no path"):
        TkeOidcCredentials(tke_env, sts_url="https://sts.tencentcloudapi.com/x")
    TkeOidcCredentials(tke_env, sts_url="https://sts.internal.example")
    TkeOidcCredentials(tke_env, sts_url="http://[::1]:8443")


def test_check_refuses_a_bad_sts_url(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cvm-backup check` with a plain-http STS URL exits 2 with the variable, no traceback."""
    monkeypatch.setenv("CVM_BACKUP_DATABASE_URL", pg_dsn)
    monkeypatch.setenv("CVM_BACKUP_STS_URL", "http://sts.example.com")
    assert cli.main(["check"]) == 2
    err = capsys.readouterr().err
    assert "CVM_BACKUP_STS_URL" in err
    assert "Traceback" not in err


async def test_chain_tries_tke_last(sts: FakeSts, tke_env: dict[str, str], tmp_path: Path) -> None:
    """With no keys, no profile and no reachable CVM role, the chain takes the TKE role."""
    unused = "http://127.0.0.1:1/latest/meta-data/"
    chain = default_chain(
        env=tke_env, profile_paths=[tmp_path / "missing"], metadata_url=unused, sts_url=sts.url
    )
    assert (await chain.get()).source == f"tke-oidc:{ROLE_ARN}"
    keys = {"TENCENTCLOUD_SECRET_ID": "AKIDenv000000000", "TENCENTCLOUD_SECRET_KEY": "env-key"}
    chain = default_chain(
        env={**tke_env, **keys}, profile_paths=[], metadata_url=unused, sts_url=sts.url
    )
    assert (await chain.get()).source == "environment"
    assert len(sts.requests) == 1


async def test_chain_without_tke_lists_it_among_reasons(tmp_path: Path, sts: FakeSts) -> None:
    """Nothing anywhere: the chain's error names the TKE variables it looked for."""
    unused = "http://127.0.0.1:1/latest/meta-data/"
    chain = default_chain(
        env={}, profile_paths=[tmp_path / "missing"], metadata_url=unused, sts_url=sts.url
    )
    with pytest.raises(CredentialsError, match="TKE_REGION, TKE_PROVIDER_ID"):
        await chain.get()


def _comparable(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower() not in TRANSPORT_HEADERS}


async def test_request_matches_the_official_sdk(
    sts: FakeSts, tke_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our STS request carries what the SDK's DefaultTkeOIDCRoleArnProvider sends."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in tke_env.items():
        monkeypatch.setenv(name, value)
    # The SDK always speaks https to STS; the fake is plain http on loopback.
    monkeypatch.setattr(sdk_credential, "HttpProfile", functools.partial(HttpProfile, "http"))

    def sdk_fetch() -> tuple[str, str, str]:
        cred = sdk_credential.DefaultTkeOIDCRoleArnProvider().get_credential()
        cred.endpoint = sts.url.removeprefix("http://")
        secret_id, secret_key, token = cred.get_credential_info()
        return str(secret_id), str(secret_key), str(token)

    sdk_keys = await asyncio.to_thread(sdk_fetch)
    ours = await TkeOidcCredentials(sts_url=sts.url, clock=lambda: sts.now).get()
    assert sdk_keys == ("AKIDsts0001", "sts-secret-key-1", "sts-token-1")
    assert (ours.secret_id, ours.token) == ("AKIDsts0002", "sts-token-2")

    (sdk_headers, sdk_body), (our_headers, our_body) = sts.requests
    sdk_h, our_h = _comparable(sdk_headers), _comparable(our_headers)
    # Per call or per build; and we ask for English messages, the SDK's default is zh-CN.
    varying = {"x-tc-timestamp", "x-tc-traceid", "x-tc-requestclient", "x-tc-language"}
    assert set(sdk_h) == set(our_h)
    assert {k: v for k, v in sdk_h.items() if k not in varying} == {
        k: v for k, v in our_h.items() if k not in varying
    }
    assert sdk_h["authorization"] == "SKIP"
    assert sdk_h["x-tc-timestamp"].isdigit()
    assert our_h["x-tc-timestamp"].isdigit()
    sdk_params, our_params = json.loads(sdk_body), json.loads(our_body)
    assert list(sdk_params) == list(our_params)
    assert sdk_params["RoleSessionName"].startswith("tencentcloud-python-sdk-")
    assert our_params["RoleSessionName"].startswith("cvm-backup-")
    del sdk_params["RoleSessionName"], our_params["RoleSessionName"]
    assert sdk_params == our_params
