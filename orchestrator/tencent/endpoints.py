"""Where CVM API calls go: the configured endpoint URL, finance-region domains, the Host header."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from orchestrator.errors import UsageError

DEFAULT_ENDPOINT = "https://cvm.tencentcloudapi.com"
INTL_ENDPOINT = "https://cvm.intl.tencentcloudapi.com"
FINANCE_SUFFIX = "-fsi"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One resolved endpoint: the URL we POST to and the Host value we sign."""

    url: str
    host: str


def _split(endpoint: str) -> tuple[str, str]:
    parts = urlsplit(endpoint.strip())
    if "@" in parts.netloc:
        # Never echo it: the user information may be a password.
        raise UsageError("endpoint: must not carry user information (user:password@)")
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise UsageError(f"endpoint {endpoint!r}: must be a full URL like {DEFAULT_ENDPOINT}")
    # The canonical request signs the path "/", so anything else would be signed wrongly.
    if parts.path not in {"", "/"} or parts.query or parts.fragment:
        raise UsageError(f"endpoint {endpoint!r}: must have no path, query or fragment")
    if not _port_ok(parts):
        raise UsageError(f"endpoint {endpoint!r}: the port must be an integer from 1 to 65535")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        # Plain HTTP would send the SecretId, the signature and any session token in clear.
        raise UsageError(
            f"endpoint {endpoint!r}: plain http:// is only for loopback hosts (the simulator on "
            "127.0.0.1, ::1 or localhost); use https://"
        )
    return parts.scheme, parts.netloc


def _port_ok(parts: SplitResult) -> bool:
    _, colon, port = parts.netloc.rpartition("]")[2].partition(":")
    if not colon:
        return True
    try:
        # `.port` raises ValueError for ":abc" and ":99999"; it also takes "+1" and " 1",
        # which the Host header we sign would then carry verbatim.
        number = parts.port
    except ValueError:
        return False
    return number is not None and port.isascii() and port.isdigit() and 1 <= number <= 65535


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_default(endpoint: str) -> bool:
    """Whether `endpoint` is the nearest-region default (and so may be replaced per region)."""
    return endpoint.strip().rstrip("/").lower() == DEFAULT_ENDPOINT


def resolve(endpoint: str = DEFAULT_ENDPOINT, region: str | None = None) -> Endpoint:
    """The endpoint for a call in `region`; finance regions need their own domain."""
    if region and region.endswith(FINANCE_SUFFIX) and is_default(endpoint):
        endpoint = f"https://cvm.{region}.tencentcloudapi.com"
    scheme, netloc = _split(endpoint)
    return Endpoint(url=f"{scheme}://{netloc}/", host=netloc)


def validate(endpoint: str) -> str:
    """`endpoint` unchanged if it is usable, else a UsageError naming the problem."""
    _split(endpoint)
    return endpoint
