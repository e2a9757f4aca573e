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


def _timestamp(headers: Mapping[str, str]) -> int:
    raw = headers.get("X-TC-Timestamp", "")
    if not raw.isdigit():
        raise ApiError("MissingParameter", "The request is missing a valid `X-TC-Timestamp`.")
    return int(raw)


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
            raise ApiError(
                "AuthFailure.SignatureExpire",
                "Signature expired. Timestamp and server time cannot differ by more than "
                "five minutes.",
            )
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
        expected = sign(
            key,
            service=auth.service,
            host=headers.get("Host", ""),
            timestamp=timestamp,
            payload=body,
            content_type=headers.get("Content-Type", ""),
        )
        scope_ok = auth.service == SERVICE and auth.date == utc_date(timestamp)
        if not scope_ok or not hmac.compare_digest(expected.signature, auth.signature):
            raise ApiError(
                "AuthFailure.SignatureFailure",
                "The provided credentials could not be validated. "
                "Please check your signature is correct.",
            )

    def _check_token(self, secret_id: str, headers: Mapping[str, str]) -> None:
        # Temporary credentials come with a token; permanent ones ignore a stray header.
        expected = self._tokens.get(secret_id)
        if expected is None:
            return
        if not hmac.compare_digest(headers.get("X-TC-Token", ""), expected):
            raise ApiError("AuthFailure.TokenFailure", "The token is invalid or has expired.")
