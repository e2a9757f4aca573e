"""A known TC3 test vector, computed with the official SDK's own signing code.

How we sign: docs/design.md#signing.
"""

from __future__ import annotations

from orchestrator.tencent.signing import sign


def test_known_vector() -> None:
    """Our signature matches the vector verified against the official SDK."""
    parts = sign(
        "SKEXAMPLE",
        service="cvm",
        host="cvm.tencentcloudapi.com",
        timestamp=1700000000,
        payload=b"{}",
    )
    assert parts.date == "2023-11-14"
    assert parts.signature == "985c4c850efb5fb14fd1e28e468a4cf9f2e3aebdd2af04f72b17e3f803cf6113"
