"""Fixtures of the Tencent client tests: the loopback fake API and clients pointed at it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import structlog

from orchestrator.tencent.client import CvmClient
from orchestrator.tencent.credentials import Credentials, StaticCredentials
from tests.fixtures.tencent import FAST_RETRY, SECRET_ID, SECRET_KEY, TOKEN, RecordingLimiter
from tests.tencent.fake_api import FakeApi


@pytest.fixture
async def fake() -> AsyncIterator[FakeApi]:
    """A started fake API."""
    api = FakeApi()
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
def limiter() -> RecordingLimiter:
    """A recording limiter."""
    return RecordingLimiter()


@pytest.fixture
async def make_client(
    fake: FakeApi, limiter: RecordingLimiter
) -> AsyncIterator[Callable[..., CvmClient]]:
    """Build open clients against the fake; all are closed at teardown."""
    clients: list[CvmClient] = []

    def build(**kwargs: Any) -> CvmClient:
        creds = Credentials(SECRET_ID, SECRET_KEY, TOKEN)
        options: dict[str, Any] = {
            "credentials": StaticCredentials(creds),
            "endpoint": fake.url,
            "limiter": limiter,
            "account": "acct-a",
            "timeout": 5.0,
            "retry": FAST_RETRY,
        }
        options.update(kwargs)
        client = CvmClient(**options)
        clients.append(client)
        return client

    yield build
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: Callable[..., CvmClient]) -> CvmClient:
    """An open client against the fake."""
    c = make_client()
    await c.open()
    return c


@pytest.fixture
def debug_logs() -> Iterator[None]:
    """Let debug events through for the test, whatever another test configured."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    yield
    structlog.configure(**saved)
