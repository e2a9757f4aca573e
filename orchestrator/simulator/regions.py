"""Which regions the simulator serves, and which actions each region offers.

As on the real API (docs/design.md#regions): an unknown region answers InvalidParameterValue, an
action a region lacks UnsupportedRegion.
"""

from __future__ import annotations

import re

from orchestrator.simulator.apierror import ApiError
from orchestrator.simulator.config import SimConfig

# ap-guangzhou, na-siliconvalley, ap-shanghai-fsi ...: what could be a region at all.
_WELL_FORMED = re.compile(r"[a-z]{2,}(?:-[a-z0-9]+)+")


def _mentioned(config: SimConfig) -> set[str]:
    regions = {spec.region for spec in config.instances}
    regions.update(seed.region for seed in config.images)
    return regions | set(config.quota)


class Regions:
    """The served regions: every well-formed one, or a fixed set when the config names one."""

    __slots__ = ("_not_offered", "_served")

    def __init__(self, config: SimConfig) -> None:
        self._served = set(config.regions) | _mentioned(config) if config.regions else None
        self._not_offered = {r: frozenset(a) for r, a in config.actions_not_offered.items()}

    def serve(self, region: str) -> None:
        """Serve one more region (an instance was added there at run time)."""
        if self._served is not None:
            self._served.add(region)

    def serves(self, region: str) -> bool:
        """Whether calls for `region` are answered at all."""
        if self._served is None:
            return _WELL_FORMED.fullmatch(region) is not None
        return region in self._served

    def check(self, region: str, action: str) -> None:
        """Raise the real answer for an unknown region, or an action the region lacks."""
        if not self.serves(region):
            # The real message, word for word (tencentcloud-sdk-python issue #21).
            raise ApiError("InvalidParameterValue", "A value specified in `Region` is not valid")
        if action in self._not_offered.get(region, ()):
            raise ApiError(
                "UnsupportedRegion", f"The action `{action}` is not supported in `{region}`."
            )
