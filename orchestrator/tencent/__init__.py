"""Tencent Cloud API 3.0: signing, credentials, endpoints, errors and the async CVM client."""

from __future__ import annotations
