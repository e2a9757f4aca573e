"""What every engine loop shares: the pool, the API clients, settings and this worker's identity."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.errors import UsageError

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
        """The API client of one account; an account missing from the config is a usage error."""
        try:
            return self.clients[account]
        except KeyError:
            known = ", ".join(sorted(self.clients)) or "none"
            raise UsageError(
                f"account {account!r} is not configured ([[accounts]] in CVM_BACKUP_CONFIG; "
                f"configured: {known})"
            ) from None
