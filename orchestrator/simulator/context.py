"""What an action handler gets: the store, and who is calling in which region."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.simulator.state import SimState

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class CallContext:
    """One authenticated call: the account (secret id) and the X-TC-Region it targets."""

    state: SimState
    account: str
    region: str


# An action takes the call and its JSON body and returns the Response fields (no RequestId).
Action = Callable[[CallContext, Json], Json]
