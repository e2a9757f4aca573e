"""The credentials chain: environment, profile file, CVM role (against a loopback metadata fake)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from orchestrator.config import AccountSettings
from orchestrator.tencent.credentials import (
    ChainCredentials,
    Credentials,
    CredentialsError,
    CvmRoleCredentials,
    EnvCredentials,
    ProfileCredentials,
    default_chain,
)
from orchestrator.tencent.errors import ErrorClass

ROLE_PREFIX = "/latest/meta-data/cam/security-credentials/"


class FakeMetadata:
    """The CVM metadata service's CAM role endpoints; each key fetch returns fresh keys."""

    def __init__(self, role: str = "backup-role") -> None:
        self.role = role
        self.expires_in = 7200
        self.now = 1_700_000_000.0
        self.fetches = 0
        self.status = 200
        self.code = "Success"
        self.url = ""

    async def listing(self, _: web.Request) -> web.Response:
        return web.Response(text=f"{self.role}\n" if self.role else "")

    async def keys(self, request: web.Request) -> web.Response:
        if self.status != 200 or request.match_info["role"] != self.role:
            return web.Response(status=self.status if self.status != 200 else 404)
        self.fetches += 1
        body = {
            "TmpSecretId": f"AKIDtmp{self.fetches:04d}",
            "TmpSecretKey": f"tmp-secret-key-{self.fetches}",
            "Token": f"tmp-token-{self.fetches}",
            "ExpiredTime": int(self.now) + self.expires_in,
            "Expiration": "2030-01-01T00:00:00Z",
            "Code": self.code,
        }
        return web.Response(text=json.dumps(body))


@pytest.fixture
async def metadata() -> AsyncIterator[FakeMetadata]:
    """A started fake metadata service."""
    meta = FakeMetadata()
    app = web.Application()
    app.router.add_get(ROLE_PREFIX, meta.listing)
    app.router.add_get(ROLE_PREFIX + "{role}", meta.keys)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    meta.url = f"http://127.0.0.1:{runner.addresses[0][1]}/latest/meta-data/"
    yield meta
    await runner.cleanup()


def _role(meta: FakeMetadata, role: str | None = None) -> CvmRoleCredentials:
    return CvmRoleCredentials(role, base_url=meta.url, clock=lambda: meta.now)


async def test_role_discovered_and_keys_fetched(metadata: FakeMetadata) -> None:
    """Without a role name, the role is discovered from the listing, then its keys fetched."""
    creds = await _role(metadata).get()
    assert creds.secret_id == "AKIDtmp0001"
    assert creds.secret_key == "tmp-secret-key-1"
    assert creds.token == "tmp-token-1"
    assert creds.expires_at == metadata.now + 7200


async def test_role_keys_cached_then_refreshed_before_expiry(metadata: FakeMetadata) -> None:
    """Keys are reused while fresh and fetched again once within 300 s of expiry."""
    provider = _role(metadata, "backup-role")
    first = await provider.get()
    metadata.now += 7200 - 301
    assert await provider.get() is first
    assert metadata.fetches == 1
    metadata.now += 2  # now 299 s before expiry: inside the margin
    second = await provider.get()
    assert metadata.fetches == 2
    assert second.secret_id == "AKIDtmp0002"
    assert second.expires_at == metadata.now + 7200


async def test_refresh_failure_keeps_unexpired_keys(metadata: FakeMetadata) -> None:
    """A metadata blip during refresh keeps keys that have not expired; expired keys fail."""
    provider = _role(metadata, "backup-role")
    first = await provider.get()
    metadata.status = 500
    metadata.now += 7200 - 100
    assert await provider.get() is first
    metadata.now += 200
    with pytest.raises(CredentialsError, match="HTTP 500"):
        await provider.get()


async def test_role_failure_code_refused(metadata: FakeMetadata) -> None:
    """A metadata answer whose Code is not Success yields no credentials."""
    metadata.code = "Failed"
    with pytest.raises(CredentialsError, match="Failed"):
        await _role(metadata).get()


async def test_no_role_bound(metadata: FakeMetadata) -> None:
    """An instance without a CAM role has no role credentials."""
    metadata.role = ""
    with pytest.raises(CredentialsError, match="no CAM role"):
        await _role(metadata).get()


async def test_env_names_configurable_per_account() -> None:
    """Each account may read its keys from its own environment variables."""
    account = AccountSettings(
        name="b", secret_id_env="B_ID", secret_key_env="B_KEY", session_token_env="B_TOKEN"
    )
    env = {"B_ID": "AKIDbbbbbbbbbbbb", "B_KEY": "bkey-secret", "B_TOKEN": "btok"}
    creds = await EnvCredentials(account, env).get()
    assert (creds.secret_id, creds.secret_key, creds.token) == (
        "AKIDbbbbbbbbbbbb",
        "bkey-secret",
        "btok",
    )


async def test_profile_file_default_and_named(tmp_path: Path) -> None:
    """The INI file gives [default] or a named profile."""
    path = tmp_path / "credentials"
    path.write_text(
        "[default]\nsecret_id = AKIDdefault0000\nsecret_key = default-key\n\n"
        "[prod]\nsecret_id=AKIDprod00000000\nsecret_key=prod-key\n",
        encoding="utf-8",
    )
    default = await ProfileCredentials(None, [tmp_path / "missing", path]).get()
    prod = await ProfileCredentials("prod", [path]).get()
    assert (default.secret_id, default.secret_key) == ("AKIDdefault0000", "default-key")
    assert (prod.secret_id, prod.secret_key, prod.token) == ("AKIDprod00000000", "prod-key", None)
    with pytest.raises(CredentialsError, match=r"no \[staging\]"):
        await ProfileCredentials("staging", [path]).get()


async def test_chain_order(tmp_path: Path, metadata: FakeMetadata) -> None:
    """Environment beats the profile file, which beats the CVM role."""
    path = tmp_path / "credentials"
    path.write_text("[default]\nsecret_id=AKIDfile00000000\nsecret_key=file-key\n", "utf-8")
    env = {"TENCENTCLOUD_SECRET_ID": "AKIDenv000000000", "TENCENTCLOUD_SECRET_KEY": "env-key"}

    def chain(env: dict[str, str], paths: list[Path]) -> ChainCredentials:
        return default_chain(env=env, profile_paths=paths, metadata_url=metadata.url)

    assert (await chain(env, [path]).get()).source == "environment"
    assert (await chain({}, [path]).get()).secret_id == "AKIDfile00000000"
    from_role = await chain({}, [tmp_path / "missing"]).get()
    assert from_role.secret_id == "AKIDtmp0001"
    assert from_role.token == "tmp-token-1"


async def test_chain_keeps_the_provider_it_chose(metadata: FakeMetadata) -> None:
    """Once a provider is chosen, later calls ask it again (so role keys are refreshed)."""
    role = _role(metadata)
    chain = ChainCredentials([EnvCredentials(env={}), role])
    await chain.get()
    metadata.now += 7200
    assert (await chain.get()).secret_id == "AKIDtmp0002"


async def test_nothing_found_is_an_account_error(tmp_path: Path) -> None:
    """No credentials anywhere is one account-wide error listing what was tried."""
    unused = "http://127.0.0.1:1/latest/meta-data/"
    chain = default_chain(env={}, profile_paths=[tmp_path / "missing"], metadata_url=unused)
    with pytest.raises(CredentialsError) as info:
        await chain.get()
    assert info.value.error_class is ErrorClass.ACCOUNT
    assert "environment" in info.value.message
    assert "unreachable" in info.value.message


@pytest.mark.parametrize("bad", ["", " AKID", "AKID "])
def test_blank_or_padded_keys_refused(bad: str) -> None:
    """Keys that are empty or padded with spaces are refused, as the SDK does."""
    with pytest.raises(CredentialsError):
        Credentials(bad, "key")
    with pytest.raises(CredentialsError):
        Credentials("AKIDgood", bad)
