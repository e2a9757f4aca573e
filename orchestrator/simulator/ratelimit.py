"""Per (account, action) one-second sliding windows, as the real API throttles.

Every authenticated call counts, accepted or rejected, as it does on the real API: a client that
retries a throttled call at once stays throttled. The largest count seen in any one-second
window is kept per key, so tests can prove a client never went over the limit.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Mapping

from orchestrator.simulator.apierror import ApiError

WINDOW = 1.0


def throttled(count: int, limit: int) -> ApiError:
    """The real throttling answer, with the real message form."""
    return ApiError(
        "RequestLimitExceeded",
        f"Your current request times equals to `{count}` in a second, which exceeds the "
        f"frequency limit `{limit}` for a second. Please reduce the frequency of calls.",
    )


class RateWindows:
    """Sliding windows and their statistics for every (account, action)."""

    __slots__ = ("_clock", "_limits", "_max", "_violations", "_windows")

    def __init__(
        self,
        limits: Mapping[str, int | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = dict(limits)
        self._clock = clock
        self._windows: dict[tuple[str, str], deque[float]] = {}
        self._max: dict[tuple[str, str], int] = {}
        self._violations: Counter[tuple[str, str]] = Counter()

    def set_limit(self, action: str, limit: int | None) -> None:
        """Change (or lift, with None) the limit of an action at run time."""
        self._limits[action] = limit

    def admit(self, account: str, action: str) -> None:
        """Count one call; raise RequestLimitExceeded when its window is over the limit."""
        key = (account, action)
        count = self._count(key, self._clock())
        if count > self._max.get(key, 0):
            self._max[key] = count
        limit = self._limits.get(action)
        if limit is not None and count > limit:
            self._violations[key] += 1
            raise throttled(count, limit)

    def _count(self, key: tuple[str, str], now: float) -> int:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = deque()
        horizon = now - WINDOW
        while window and window[0] <= horizon:
            window.popleft()
        window.append(now)
        return len(window)

    def max_window(self, action: str, account: str | None = None) -> int:
        """The most calls of an action seen in one second (for one account, or any)."""
        return max(
            (n for (acc, act), n in self._max.items() if act == action and account in (None, acc)),
            default=0,
        )

    def violations(self, account: str | None = None) -> dict[str, int]:
        """Throttled calls per action (for one account, or all accounts)."""
        totals: Counter[str] = Counter()
        for (acc, act), n in self._violations.items():
            if account in (None, acc):
                totals[act] += n
        return dict(totals)

    def max_windows(self) -> dict[str, int]:
        """The largest one-second count per action, over all accounts."""
        actions = {act for _, act in self._max}
        return {act: self.max_window(act) for act in sorted(actions)}
