"""Running a simulator in-process: `async with run_simulator(config) as sim:`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager

from aiohttp import web

from orchestrator.simulator.auth import Verifier
from orchestrator.simulator.config import Faults, SimConfig, SimInstance
from orchestrator.simulator.faults import FaultInjector
from orchestrator.simulator.server import build_app
from orchestrator.simulator.state import SimState

HOST = "127.0.0.1"


class Simulator:
    """One simulator: its store (`state`), its faults, and its address once started."""

    def __init__(
        self,
        config: SimConfig,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.state = SimState(config, wall=wall, mono=mono)
        self.faults = FaultInjector(config.faults, config.action_faults, config.seed)
        verifier = Verifier(config.credentials, config.tokens, config.clock_skew, wall)
        self._app = build_app(self.state, verifier, self.faults)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def __repr__(self) -> str:
        return f"Simulator(url={self.url!r}, accounts={self.state.accounts!r})"

    @property
    def url(self) -> str:
        """The base URL, `http://127.0.0.1:PORT` (what CVM_BACKUP_ENDPOINT takes)."""
        return f"http://{HOST}:{self.port}"

    @property
    def endpoint(self) -> str:
        """`127.0.0.1:PORT`, the form the official SDK's HttpProfile takes."""
        return f"{HOST}:{self.port}"

    async def start(self, port: int = 0) -> None:
        """Listen on loopback; port 0 picks a free one."""
        runner = web.AppRunner(
            self._app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def set_faults(self, faults: Faults, action: str | None = None) -> None:
        """Change the injected faults at run time, globally or for one action."""
        self.faults.set(faults, action)

    def clear_faults(self) -> None:
        """Stop injecting faults."""
        self.faults.clear()

    def set_limit(self, action: str, limit: int | None) -> None:
        """Change or lift (None) an action's per-second limit."""
        self.state.windows.set_limit(action, limit)

    def set_create_delay(self, low: float, high: float) -> None:
        """Change how long new images stay CREATING (seconds, uniform in [low, high])."""
        self.state.create_delay = (low, high)

    def set_sync_delay(self, low: float, high: float) -> None:
        """Change how long new SyncImages copies stay SYNCING (seconds, uniform in [low, high])."""
        self.state.sync_delay = (low, high)

    def set_account_error(
        self,
        code: str | None,
        actions: Iterable[str] = ("CreateImage",),
        *,
        region: str | None = None,
        account: str | None = None,
    ) -> None:
        """Make `actions` answer an error (e.g. InsufficientBalance); None lifts it.

        Without `region`/`account` it applies everywhere; with them, like a scoped CAM policy,
        only to that region and/or account (secret id). It applies to DryRuns too, after the
        signature is checked. None lifts exactly the refusal of the same scope.
        """
        for action in actions:
            self.state.denials.set((account, region, action), code)

    def set_busy(self, instance_id: str, seconds: float) -> None:
        """Make an instance busy (InstanceOperationInProgress) for a while."""
        self.state.set_busy(instance_id, seconds)

    def set_instance_state(
        self, instance_id: str, state: str, *, seconds: float = 0.0, then: str = "RUNNING"
    ) -> None:
        """Change an instance's state; with `seconds` (e.g. RESCUE_MODE, SERVICE_LIVE_MIGRATE,
        FREEZING) it lasts that long and then the instance is `then` again."""
        self.state.set_instance_state(instance_id, state, seconds, then)

    def add_instance(self, spec: SimInstance) -> None:
        """Add an instance to the fleet."""
        self.state.add_instance(spec)

    def remove_instance(self, instance_id: str) -> None:
        """Remove an instance, as if it was terminated."""
        self.state.remove_instance(instance_id)


@asynccontextmanager
async def run_simulator(
    config: SimConfig,
    port: int = 0,
    *,
    wall: Callable[[], float] = time.time,
    mono: Callable[[], float] = time.monotonic,
) -> AsyncIterator[Simulator]:
    """A started simulator for the duration of the block (clocks replaceable for tests)."""
    sim = Simulator(config, wall=wall, mono=mono)
    await sim.start(port)
    try:
        yield sim
    finally:
        await sim.stop()
