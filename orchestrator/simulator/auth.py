"""TC3-HMAC-SHA256 verification of incoming requests, using the project's own signer.

Secret keys stay inside the verifier: no error message, log line or repr carries one.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from orchestrator.simulator.apierror import ApiError
from orchestrator.tencent.signing import ALGORITHM, SIGNED_HEADERS, sign, utc_date

SERVICE = "cvm"
_AUTH = re.compile(
    rf"^{ALGORITHM} Credential=(?P<id>[^/]+)/(?P<date>[^/]+)/(?P<service>[^/]+)/tc3_request,"
    r"\s*SignedHeaders=(?P<signed>[^,]+),\s*Signature=(?P<signature>[0-9a-f]+)$"
)
# ASCII digits only (str.isdigit also takes superscripts and other scripts' digits), and few
# enough for int() to be cheap: 5000 digits would exceed Python's int-parsing limit, and any
# such time is far from now anyway.
_TIMESTAMP = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True, slots=True)
class Authorization:
    """The parsed parts of an Authorization header."""

    secret_id: str
    date: str
    service: str
    signed_headers: str
    signature: str


def parse_authorization(value: str) -> Authorization:
    """Split an Authorization header, or answer AuthFailure.InvalidAuthorization."""
    match = _AUTH.match(value.strip())
    if match is None:
        raise ApiError("AuthFailure.InvalidAuthorization", "Authorization header is malformed.")
    return Authorization(
        secret_id=match["id"],
        date=match["date"],
        service=match["service"],
        signed_headers=match["signed"],
        signature=match["signature"],
    )


def _expired() -> ApiError:
    return ApiError(
        "AuthFailure.SignatureExpire",
        "Signature expired. Timestamp and server time cannot differ by more than five minutes.",
    )


def _signature_failure() -> ApiError:
    return ApiError(
        "AuthFailure.SignatureFailure",
        "The provided credentials could not be validated. Please check your signature is correct.",
    )


def _timestamp(headers: Mapping[str, str]) -> int:
    raw = headers.get("X-TC-Timestamp", "")
    if _TIMESTAMP.fullmatch(raw) is not None:
        return int(raw)
    if raw.isascii() and raw.isdigit():
        raise _expired()
    raise ApiError("MissingParameter", "The request is missing a valid `X-TC-Timestamp`.")


def _date(timestamp: int) -> str:
    try:
        return utc_date(timestamp)
    except (OverflowError, OSError, ValueError):
        # Only reachable with a huge configured clock skew: no date, so no valid scope.
        return ""


def _same(given: str, expected: str) -> bool:
    # compare_digest refuses non-ASCII str; header text may hold anything a client sent.
    encode = "surrogateescape"
    return hmac.compare_digest(given.encode("utf-8", encode), expected.encode("utf-8", encode))


class Verifier:
    """Checks signatures against a table of accounts (secret id -> secret key)."""

    __slots__ = ("_clock", "_keys", "_skew", "_tokens")

    def __init__(
        self,
        keys: Mapping[str, str],
        tokens: Mapping[str, str],
        skew: float,
        clock: Callable[[], float],
    ) -> None:
        self._keys = dict(keys)
        self._tokens = dict(tokens)
        self._skew = skew
        self._clock = clock

    def __repr__(self) -> str:
        return f"Verifier(accounts={sorted(self._keys)!r})"

    def verify(self, headers: Mapping[str, str], body: bytes) -> str:
        """The account (secret id) that signed a request; raises AuthFailure.* otherwise."""
        auth = parse_authorization(headers.get("Authorization", ""))
        timestamp = _timestamp(headers)
        if abs(self._clock() - timestamp) > self._skew:
            raise _expired()
        key = self._keys.get(auth.secret_id)
        if key is None:
            raise ApiError(
                "AuthFailure.SecretIdNotFound",
                "The SecretId is not found, please ensure that your SecretId is correct.",
            )
        self._check_signature(auth, key, timestamp, headers, body)
        self._check_token(auth.secret_id, headers)
        return auth.secret_id

    def _check_signature(
        self,
        auth: Authorization,
        key: str,
        timestamp: int,
        headers: Mapping[str, str],
        body: bytes,
    ) -> None:
        if auth.signed_headers != SIGNED_HEADERS:
            raise ApiError(
                "AuthFailure.InvalidAuthorization", f"SignedHeaders must be `{SIGNED_HEADERS}`."
            )
        # The SDK's unsigned-payload mode hashes this literal instead of the body.
        if headers.get("X-TC-Content-SHA256") == "UNSIGNED-PAYLOAD":
            body = b"UNSIGNED-PAYLOAD"
        if auth.service != SERVICE or auth.date != _date(timestamp):
            raise _signature_failure()
        try:
            expected = sign(
                key,
                service=auth.service,
                host=headers.get("Host", ""),
                timestamp=timestamp,
                payload=body,
                content_type=headers.get("Content-Type", ""),
            )
        except UnicodeError:
            # Header bytes that are not UTF-8 cannot be what a client signed.
            raise _signature_failure() from None
        if not _same(auth.signature, expected.signature):
            raise _signature_failure()

    def _check_token(self, secret_id: str, headers: Mapping[str, str]) -> None:
        # Temporary credentials come with a token; permanent ones ignore a stray header.
        expected = self._tokens.get(secret_id)
        if expected is None:
            return
        if not _same(headers.get("X-TC-Token", ""), expected):
            raise ApiError("AuthFailure.TokenFailure", "The token is invalid or has expired.")
