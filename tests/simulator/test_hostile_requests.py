"""Hostile requests: the simulator answers the API's own error envelope, never an HTTP 500."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from orchestrator.simulator import server
from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.signing import build_headers
from tests.fixtures.sim import TEST_REGION, TEST_SECRET_ID, TEST_SECRET_KEY
from tests.simulator.helpers import Json

API_ERROR_STATUS = 200


def signed(sim: Simulator, body: bytes, action: str = "DescribeImages") -> dict[str, str]:
    """Headers that sign `body` correctly for `action`, to be altered by the test."""
    return build_headers(
        secret_id=TEST_SECRET_ID,
        secret_key=TEST_SECRET_KEY,
        token=None,
        service="cvm",
        host=sim.endpoint,
        action=action,
        version="2017-03-12",
        region=TEST_REGION,
        timestamp=int(time.time()),
        payload=body,
    )


async def post(sim: Simulator, body: bytes, headers: dict[str, str]) -> Json:
    """POST raw bytes with exactly these headers; the API error it must answer, checked."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(sim.url + "/", data=body, headers=headers) as resp,
    ):
        assert resp.status == API_ERROR_STATUS
        assert resp.headers.get("Content-Type") == "application/json"
        return envelope(await resp.read())


def envelope(raw: bytes) -> Json:
    """The Response.Error of an answer, after checking the envelope's shape."""
    response = json.loads(raw)["Response"]
    assert set(response) == {"Error", "RequestId"}
    error: Json = response["Error"]
    assert set(error) == {"Code", "Message"}
    return error


async def call(sim: Simulator, body: bytes, action: str = "DescribeImages") -> str:
    """A correctly signed call with `body`; the error code it answers."""
    error = await post(sim, body, signed(sim, body, action))
    return str(error["Code"])


async def raw_http(sim: Simulator, request: bytes) -> tuple[int, bytes]:
    """Send bytes straight to the socket; the status and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = _content_length(head)
            body = await reader.readexactly(length)
    finally:
        writer.close()
    return int(head.split(b" ", 2)[1]), body


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length in {head!r}")


def request_head(sim: Simulator, body: bytes, extra: str) -> bytes:
    """A signed request's status line and headers, plus `extra` header lines."""
    headers = "".join(f"{k}: {v}\r\n" for k, v in signed(sim, body).items())
    return f"POST / HTTP/1.1\r\n{headers}{extra}\r\n".encode()


@pytest.mark.parametrize("digits", [19, 5000])
async def test_huge_timestamp_is_signature_expire(simulator: Simulator, digits: int) -> None:
    """A timestamp of thousands of digits answers AuthFailure.SignatureExpire, not a crash."""
    headers = signed(simulator, b"{}") | {"X-TC-Timestamp": "9" * digits}
    error = await post(simulator, b"{}", headers)
    assert error["Code"] == "AuthFailure.SignatureExpire"


FULLWIDTH_DIGITS = "\uff11\uff17" + "\uff10" * 8  # 1700000000 in another script's digits


@pytest.mark.parametrize("stamp", ["-1", "1e9", FULLWIDTH_DIGITS, "0x10", ""])
async def test_non_numeric_timestamp_is_an_api_error(simulator: Simulator, stamp: str) -> None:
    """Signs, exponents, other scripts' digits and hex answer MissingParameter."""
    headers = signed(simulator, b"{}") | {"X-TC-Timestamp": stamp}
    assert (await post(simulator, b"{}", headers))["Code"] == "MissingParameter"


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
        b'{"Filters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["arrays", "objects", "inside-a-parameter"],
)
async def test_deeply_nested_json_is_invalid_parameter(simulator: Simulator, body: bytes) -> None:
    """Nesting that would exhaust the parser's stack answers InvalidParameter."""
    assert await call(simulator, body) == "InvalidParameter"


@pytest.mark.parametrize(
    "body",
    [b"{nope", b'{"Limit": 1', b"\xff\xfe\x00{", b'{"ImageIds": ["\xff"]}', b"NaN"],
    ids=["garbage", "truncated", "binary", "not-utf8", "nan"],
)
async def test_unparseable_body_is_invalid_parameter(simulator: Simulator, body: bytes) -> None:
    """Bodies that are not JSON (or not UTF-8) answer InvalidParameter."""
    assert await call(simulator, body) == "InvalidParameter"


@pytest.mark.parametrize("body", [b"[1]", b'"text"', b"42", b"null", b"true"])
async def test_non_object_json_is_invalid_parameter(simulator: Simulator, body: bytes) -> None:
    """A JSON value that is not an object answers InvalidParameter."""
    assert await call(simulator, body) == "InvalidParameter"


@pytest.mark.parametrize(
    "value",
    [b"1e400", b"-1e400", b"NaN", b"Infinity", b"-Infinity", b"9" * 30, b"9" * 4000, b"1.5"],
)
@pytest.mark.parametrize("name", ["Limit", "Offset"])
async def test_absurd_numbers_in_paging_are_invalid(
    simulator: Simulator, name: str, value: bytes
) -> None:
    """Overflowing, non-finite, beyond-int64 or fractional Limit/Offset answer InvalidParameter."""
    body = b'{"%s": %s}' % (name.encode(), value)
    assert await call(simulator, body) == "InvalidParameter"


async def test_number_beyond_pythons_digit_limit_is_invalid(simulator: Simulator) -> None:
    """A 5000-digit number answers InvalidParameter, without Python internals in the message."""
    body = b'{"Limit": ' + b"9" * 5000 + b"}"
    error = await post(simulator, body, signed(simulator, body))
    assert error["Code"] == "InvalidParameter"
    assert "sys." not in error["Message"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_corrupt_compressed_body_is_invalid_parameter(
    simulator: Simulator, encoding: str
) -> None:
    """A Content-Encoding whose data does not decompress answers InvalidParameter."""
    headers = signed(simulator, b"xx") | {"Content-Encoding": encoding}
    assert (await post(simulator, b"xx", headers))["Code"] == "InvalidParameter"


async def test_compression_bomb_is_request_size_limit(simulator: Simulator) -> None:
    """A small gzip body that inflates past the limit answers RequestSizeLimitExceeded."""
    bomb = gzip.compress(b" " * (server.MAX_BODY * 4))
    headers = signed(simulator, bomb) | {"Content-Encoding": "gzip"}
    assert (await post(simulator, bomb, headers))["Code"] == "RequestSizeLimitExceeded"


async def test_oversized_chunked_body_is_request_size_limit(simulator: Simulator) -> None:
    """A body streamed without a Content-Length past the limit answers RequestSizeLimitExceeded."""
    chunk = b"a" * 65536

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(server.MAX_BODY // len(chunk) + 2):
            yield chunk

    headers = signed(simulator, b"")  # never checked: the size is refused first
    async with (
        aiohttp.ClientSession() as session,
        session.post(simulator.url + "/", data=chunks(), headers=headers) as resp,
    ):
        assert resp.status == API_ERROR_STATUS
        assert envelope(await resp.read())["Code"] == "RequestSizeLimitExceeded"


@pytest.mark.parametrize("declared", [server.MAX_BODY + 1, 2_000_000_000, 10**18])
async def test_huge_content_length_answers_at_once(simulator: Simulator, declared: int) -> None:
    """A Content-Length over the limit is refused before waiting for a body that never comes."""
    request = request_head(simulator, b"{}", f"Content-Length: {declared}\r\n") + b"{}"
    status, body = await raw_http(simulator, request)
    assert status == API_ERROR_STATUS
    assert envelope(body)["Code"] == "RequestSizeLimitExceeded"


@pytest.mark.parametrize(
    "line", ["X-TC-Action: Describe\x00Images", "Content-Length: 99999999999999999999999"]
)
async def test_malformed_http_is_a_400_never_a_500(simulator: Simulator, line: str) -> None:
    """Framing the HTTP layer cannot parse is its 400, as at any front end, never a 500."""
    request = f"POST / HTTP/1.1\r\nHost: {simulator.endpoint}\r\n{line}\r\n\r\n{{}}".encode()
    status, _ = await raw_http(simulator, request)
    assert status == 400


async def test_non_utf8_headers_are_api_errors(simulator: Simulator) -> None:
    """Header bytes that are not UTF-8 answer an AuthFailure, not a crash."""
    headers = request_head(simulator, b"{}", "Content-Length: 2\r\n")
    hostile = headers.replace(b"Host: ", b"Host: \xff\xfe", 1)
    status, body = await raw_http(simulator, hostile + b"{}")
    assert status == API_ERROR_STATUS
    assert envelope(body)["Code"].startswith("AuthFailure.")


async def test_unexpected_failure_is_internal_error(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug inside an action answers the API's InternalError envelope, not HTTP 500."""

    def broken(*_: Any) -> Json:
        raise RuntimeError("simulator bug")

    monkeypatch.setitem(server.ACTIONS, "DescribeImageQuota", broken)
    assert await call(simulator, b"{}", "DescribeImageQuota") == "InternalError"
    assert simulator.state.calls[-1].code == "InternalError"
