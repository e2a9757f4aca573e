"""Fixtures of the engine tests; their helpers live in tests/fixtures (engine, daemon, polling)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fixtures.daemon import DaemonProcess


@pytest.fixture
async def reaped() -> AsyncIterator[list[DaemonProcess]]:
    """Processes the test starts, killed at teardown whatever the test's outcome."""
    started: list[DaemonProcess] = []
    yield started
    for process in started:
        await process.kill()
