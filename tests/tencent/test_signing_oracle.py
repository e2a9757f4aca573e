"""Our signed headers and body against the official SDK's own signing code, as an oracle."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.tencent import transport
from orchestrator.tencent.client import API_VERSION, SERVICE
from orchestrator.tencent.signing import build_headers
from tests.tencent.sdk_oracle import sdk_request, signed_headers

_secret = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True)
_hostname = st.one_of(
    st.builds(".".join, st.lists(_label, min_size=1, max_size=4)),
    st.just("cvm.tencentcloudapi.com"),
    st.just("127.0.0.1"),
    st.just("[::1]"),
)
_host = st.builds(
    lambda name, port: name if port is None else f"{name}:{port}",
    _hostname,
    st.none() | st.integers(1, 65535),
)
_action = st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,30}", fullmatch=True)
_region = st.none() | st.sampled_from(
    ["ap-guangzhou", "ap-shanghai-fsi", "na-siliconvalley", "eu-frankfurt", "ap-singapore"]
)
# Non-ASCII text on purpose: the SDK escapes it as \\uXXXX, so the body must too.
_text = st.text(max_size=20)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)
_params = st.dictionaries(_text, _json, max_size=6)
_timestamp = st.integers(0, 4_102_444_800)  # 1970 .. 2100


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    secret_id=_secret,
    secret_key=_secret,
    token=st.none() | _secret,
    host=_host,
    action=_action,
    region=_region,
    timestamp=_timestamp,
    params=_params,
    language=st.sampled_from(["zh-CN", "en-US"]),
)
def test_headers_and_body_match_the_sdk(
    *,
    secret_id: str,
    secret_key: str,
    token: str | None,
    host: str,
    action: str,
    region: str | None,
    timestamp: int,
    params: dict[str, Any],
    language: str,
) -> None:
    """For any request, our body bytes and every signed header equal what the SDK produces."""
    req = sdk_request(
        secret_id=secret_id,
        secret_key=secret_key,
        token=token,
        host=host,
        action=action,
        region=region,
        timestamp=timestamp,
        params=params,
        language=language,
    )
    payload = transport.encode(params)
    assert payload == req.data.encode("utf-8")
    ours = build_headers(
        secret_id=secret_id,
        secret_key=secret_key,
        token=token,
        service=SERVICE,
        host=host,
        action=action,
        version=API_VERSION,
        region=region,
        timestamp=timestamp,
        payload=payload,
        language=language,
    )
    assert ours == signed_headers(req)
