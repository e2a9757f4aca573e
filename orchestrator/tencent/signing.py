"""TC3-HMAC-SHA256 request signing, byte-for-byte as the official SDK computes it."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime

ALGORITHM = "TC3-HMAC-SHA256"
CONTENT_TYPE = "application/json"
SIGNED_HEADERS = "content-type;host"


@dataclass(frozen=True, slots=True)
class SignedParts:
    """The pieces of one signature, exposed so the simulator can verify them."""

    date: str
    credential_scope: str
    signature: str


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()


def utc_date(timestamp: int) -> str:
    """The UTC calendar date of a Unix timestamp, as the SDK formats it."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


def canonical_request(host: str, payload: bytes, content_type: str = CONTENT_TYPE) -> str:
    """The canonical request of a POST to `/` (the only form the SDK and we send)."""
    headers = f"content-type:{content_type}\nhost:{host}\n"
    body_hash = hashlib.sha256(payload).hexdigest()
    return f"POST\n/\n\n{headers}\n{SIGNED_HEADERS}\n{body_hash}"


def sign(
    secret_key: str,
    *,
    service: str,
    host: str,
    timestamp: int,
    payload: bytes,
    content_type: str = CONTENT_TYPE,
) -> SignedParts:
    """Compute the TC3 signature of one request."""
    date = utc_date(timestamp)
    scope = f"{date}/{service}/tc3_request"
    digest = hashlib.sha256(canonical_request(host, payload, content_type).encode()).hexdigest()
    string_to_sign = f"{ALGORITHM}\n{timestamp}\n{scope}\n{digest}"
    k_date = _hmac(("TC3" + secret_key).encode("utf-8"), date)
    k_signing = _hmac(_hmac(k_date, service), "tc3_request")
    signature = hmac.new(k_signing, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return SignedParts(date=date, credential_scope=scope, signature=signature)


def authorization(secret_id: str, parts: SignedParts) -> str:
    """The Authorization header value for a signature."""
    return (
        f"{ALGORITHM} Credential={secret_id}/{parts.credential_scope}, "
        f"SignedHeaders={SIGNED_HEADERS}, Signature={parts.signature}"
    )


def build_headers(
    *,
    secret_id: str,
    secret_key: str,
    token: str | None,
    service: str,
    host: str,
    action: str,
    version: str,
    region: str | None,
    timestamp: int,
    payload: bytes,
    language: str = "zh-CN",
) -> dict[str, str]:
    """Every header the SDK sends for a signed POST, in its order."""
    parts = sign(secret_key, service=service, host=host, timestamp=timestamp, payload=payload)
    headers = {
        "Host": host,
        "Content-Type": CONTENT_TYPE,
        "X-TC-Action": action[0].upper() + action[1:],
        "X-TC-Version": version,
        "X-TC-Timestamp": str(timestamp),
        "X-TC-Language": language,
        "Authorization": authorization(secret_id, parts),
    }
    if region:
        headers["X-TC-Region"] = region
    if token:
        headers["X-TC-Token"] = token
    return headers
