"""One HTTP exchange with the API: POST a signed body, turn the answer into JSON or a TencentError.

Every failure becomes a TencentError: HTTP status other than 200 is `ServerNetworkError`, a
failed or dropped connection or a timeout is `ClientNetworkError`, and a 200 whose body is not a
Tencent answer is `InvalidResponse` (all transient: docs/design.md#error-classes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from orchestrator.tencent.errors import TencentError, network_error
from orchestrator.tencent.models import Json

_SNIPPET = 200


def encode(params: Mapping[str, Any]) -> bytes:
    """The request body exactly as the SDK writes it: default separators, ASCII escapes."""
    return json.dumps(params).encode("ascii")


def _snippet(body: bytes) -> str:
    return body[:_SNIPPET].decode("utf-8", errors="replace")


def _invalid(reason: str, body: bytes) -> TencentError:
    return TencentError("InvalidResponse", f"{reason}: {_snippet(body)!r}")


def parse(body: bytes) -> Json:
    """The `Response` object of a 200 answer; raises its `Error` as a TencentError."""
    try:
        data = json.loads(body)
    except ValueError:
        raise _invalid("answer is not JSON", body) from None
    response = data.get("Response") if isinstance(data, dict) else None
    if not isinstance(response, dict):
        raise _invalid("answer has no Response object", body)
    request_id = response.get("RequestId")
    error = response.get("Error")
    if isinstance(error, dict) and isinstance(error.get("Code"), str):
        message = error.get("Message")
        raise TencentError(error["Code"], "" if message is None else str(message), request_id)
    if error is not None or not isinstance(request_id, str):
        raise _invalid("answer is not a Tencent Cloud response", body)
    return response


async def post(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    payload: bytes,
    client_timeout: aiohttp.ClientTimeout,
) -> Json:
    """POST `payload` and return the parsed `Response` object."""
    try:
        async with session.post(url, data=payload, headers=headers, timeout=client_timeout) as resp:
            body = await resp.read()
            status = resp.status
            date = resp.headers.get("Date")
    except TimeoutError:
        raise network_error(f"no answer within {client_timeout.total} s") from None
    except aiohttp.ClientError as exc:
        raise network_error(f"{type(exc).__name__}: {exc}") from None
    if status != 200:
        raise TencentError("ServerNetworkError", f"HTTP {status}: {_snippet(body)}")
    try:
        return parse(body)
    except TencentError as exc:
        exc.server_date, exc.received_at = _http_date(date), datetime.now(UTC)
        raise


def _http_date(value: str | None) -> datetime | None:
    """An HTTP `Date` header (RFC 9110 IMF-fixdate) as an aware UTC time; None if unreadable."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
