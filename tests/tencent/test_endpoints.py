"""Endpoint resolution: configured URL, finance regions, the international site, Host."""

from __future__ import annotations

import pytest

from orchestrator.errors import UsageError
from orchestrator.tencent.endpoints import (
    DEFAULT_ENDPOINT,
    INTL_ENDPOINT,
    Endpoint,
    resolve,
    validate,
)


def test_default() -> None:
    """The default endpoint is the nearest-region domain over https."""
    assert resolve(DEFAULT_ENDPOINT, "ap-guangzhou") == Endpoint(
        "https://cvm.tencentcloudapi.com/", "cvm.tencentcloudapi.com"
    )


@pytest.mark.parametrize("region", ["ap-shanghai-fsi", "ap-shenzhen-fsi"])
def test_finance_region_gets_its_domain(region: str) -> None:
    """Finance regions need `cvm.<region>.tencentcloudapi.com` when the default is in use."""
    got = resolve(DEFAULT_ENDPOINT + "/", region)
    assert got.host == f"cvm.{region}.tencentcloudapi.com"
    assert got.url == f"https://cvm.{region}.tencentcloudapi.com/"


def test_custom_endpoint_wins_over_finance_rule() -> None:
    """A configured endpoint is used as is, even for finance regions."""
    got = resolve("http://127.0.0.1:9000", "ap-shanghai-fsi")
    assert got == Endpoint("http://127.0.0.1:9000/", "127.0.0.1:9000")


def test_international_site() -> None:
    """The international site is just another endpoint."""
    assert resolve(INTL_ENDPOINT, "ap-singapore").host == "cvm.intl.tencentcloudapi.com"


def test_ipv6_host_keeps_brackets_and_port() -> None:
    """Host is host[:port] exactly as in the URL."""
    assert resolve("http://[::1]:8080/").host == "[::1]:8080"


@pytest.mark.parametrize(
    "bad",
    [
        "cvm.tencentcloudapi.com",
        "127.0.0.1:9000",
        "ftp://example.com",
        "https://example.com/prefix",
        "https://example.com/?a=1",
    ],
)
def test_bad_endpoints_are_usage_errors(bad: str) -> None:
    """An endpoint we could not sign correctly is refused with a message naming it."""
    with pytest.raises(UsageError, match="endpoint"):
        resolve(bad)


def test_user_information_refused_without_echo() -> None:
    """An endpoint with user:password@ is refused and the password is not repeated."""
    with pytest.raises(UsageError) as info:
        resolve("https://user:hunter2@example.com")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:9000",
        "http://127.8.9.10:1",
        "http://[::1]:8080",
        "http://localhost:5000/",
        "http://LOCALHOST",
    ],
)
def test_plain_http_is_fine_on_loopback(endpoint: str) -> None:
    """The simulator on a loopback address may be spoken to over plain http."""
    assert validate(endpoint) == endpoint


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://10.0.0.1",
        "http://cvm.tencentcloudapi.com",
        "http://localhost.example.com:80",
        "http://[::ffff:10.0.0.1]:80",
        "http://0.0.0.0:9000",
    ],
)
def test_plain_http_elsewhere_is_refused(endpoint: str) -> None:
    """Plain http off loopback would carry the SecretId and signature in clear: refused."""
    with pytest.raises(UsageError, match=r"^endpoint .*loopback.*https://"):
        resolve(endpoint)


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://cvm.tencentcloudapi.com:99999",
        "https://cvm.tencentcloudapi.com:abc",
        "https://cvm.tencentcloudapi.com:0",
        "https://cvm.tencentcloudapi.com:+443",
        "https://cvm.tencentcloudapi.com:",
        "http://127.0.0.1:65536",
        "https://[::1]:99999",
    ],
)
def test_ports_outside_1_to_65535_are_refused(endpoint: str) -> None:
    """A port that is not a plain integer from 1 to 65535 is a usage error naming the port."""
    with pytest.raises(UsageError, match=r"^endpoint .*port"):
        validate(endpoint)


@pytest.mark.parametrize("port", ["1", "443", "65535"])
def test_ports_in_range_are_kept(port: str) -> None:
    """Valid ports pass through into the URL and the signed Host."""
    got = resolve(f"https://cvm.tencentcloudapi.com:{port}")
    assert got.host == f"cvm.tencentcloudapi.com:{port}"


def test_user_information_refused_before_the_http_check() -> None:
    """A plain-http endpoint with user:password@ is refused without repeating either."""
    with pytest.raises(UsageError, match="user information") as info:
        validate("http://admin:hunter2@10.0.0.1")
    assert "hunter2" not in str(info.value)
    assert "admin" not in str(info.value)
