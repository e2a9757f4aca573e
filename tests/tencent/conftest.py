"""Fixtures of the Tencent client tests: the loopback fake API and clients pointed at it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import structlog

from orchestrator.tencent.client import CvmClient, RetryPolicy
from orchestrator.tencent.credentials import Credentials, StaticCredentials
from tests.tencent.fake_api import FakeApi

SECRET_ID = "AKIDtestsecretid0000"
SECRET_KEY = "sk-very-secret-key-1234567890"
TOKEN = "session-token-abcdefghijklmnop"

# Retries in tests wait microseconds, not the production fractions of a second.
FAST_RETRY = RetryPolicy(base_delay=0.001, max_delay=0.002)


class RecordingLimiter:
    """A RateLimit that admits everything and records what it was told."""

    def __init__(self) -> None:
        self.acquired: list[tuple[str, str]] = []
        self.throttles: list[tuple[str, str]] = []

    async def acquire(self, account: str, action: str) -> None:
        """Record one acquisition."""
        self.acquired.append((account, action))

    def throttled(self, account: str, action: str) -> None:
        """Record one throttle signal."""
        self.throttles.append((account, action))


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
