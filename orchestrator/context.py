"""What every engine loop shares: the pool, the API clients, settings and this worker's identity."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncpg

    from orchestrator.config import Settings
    from orchestrator.tencent.client import CvmClient


@dataclass(frozen=True, slots=True)
class EngineContext:
    """Dependencies of the scheduler, dispatcher, tracker and rotator, built once by the daemon."""

    pool: asyncpg.Pool
    clients: Mapping[str, CvmClient]  # by account name
    settings: Settings
    worker_id: str  # lease owner: host:pid:random, unique per process

    def client(self, account: str) -> CvmClient:
        """The API client of one account."""
        return self.clients[account]
