"""A local Tencent Cloud CVM API 3.0 simulator (a product feature, like moto for AWS).

    async with run_simulator(SimConfig(credentials={"AKID...": "key"},
                                       instances=generate_fleet(10))) as sim:
        ...  # point a client at sim.url; inspect sim.state

`cvm-backup simulator` runs one as a process; `GET /_sim/state` shows what it saw.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.simulator.config import (
        DEFAULT_LIMITS,
        NO_LIMITS,
        Faults,
        SimConfig,
        SimImageSeed,
        SimInstance,
    )
    from orchestrator.simulator.fleet import generate_fleet, load_config, write_config
    from orchestrator.simulator.records import Call, Deletion, SimImage
    from orchestrator.simulator.runner import Simulator, run_simulator
    from orchestrator.simulator.state import SimState

# Imported on first use: the CLI imports this package to register `cvm-backup simulator`,
# and `cvm-backup --help` should not pay for aiohttp.
_EXPORTS = {
    "DEFAULT_LIMITS": "config",
    "NO_LIMITS": "config",
    "Faults": "config",
    "SimConfig": "config",
    "SimImageSeed": "config",
    "SimInstance": "config",
    "generate_fleet": "fleet",
    "load_config": "fleet",
    "write_config": "fleet",
    "Call": "records",
    "Deletion": "records",
    "SimImage": "records",
    "Simulator": "runner",
    "run_simulator": "runner",
    "SimState": "state",
}

__all__ = [
    "DEFAULT_LIMITS",
    "NO_LIMITS",
    "Call",
    "Deletion",
    "Faults",
    "SimConfig",
    "SimImage",
    "SimImageSeed",
    "SimInstance",
    "SimState",
    "Simulator",
    "generate_fleet",
    "load_config",
    "run_simulator",
    "write_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
