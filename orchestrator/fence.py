"""The fence: a job's CreateImage goes out only while its lease is surely still this worker's.

A lease is `lease_seconds` long from the moment its claim or renewal statement was sent (the
database's `now()` is no earlier than that). Once it ends, another worker (or this one, after
the task gave up) may claim the job, find no image by name and make one; a call of the old
owner still waiting at the limiter, or stalled with the event loop, must then never be sent:
it would make a second image with the same name, tracked by nobody. A call sent at `t` lands
by `t + request_timeout`, so the fence closes `request_timeout` before the lease ends (at most
half the lease: the config refuses a longer timeout).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


class Fence:
    """When each job's lease was last known to be ours, and whether a call may still go."""

    def __init__(
        self,
        lease_seconds: float,
        request_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open_for = lease_seconds - min(request_timeout, lease_seconds / 2)
        self._clock = clock
        self._since: dict[int, float] = {}

    def now(self) -> float:
        """The fence's clock: read it just before sending the statement that takes a lease."""
        return self._clock()

    def leased(self, job_ids: Iterable[int], sent_at: float) -> None:
        """A claim or renewal sent at `sent_at` took or extended these jobs' leases."""
        for job_id in job_ids:
            self._since[job_id] = sent_at

    def forget(self, job_id: int) -> None:
        """The job's task ended: no call of it is pending any more."""
        self._since.pop(job_id, None)

    def age(self, job_id: int) -> float | None:
        """Seconds since the job's lease was last taken or renewed; None when it never was."""
        since = self._since.get(job_id)
        return None if since is None else self._clock() - since

    def open(self, job_id: int) -> bool:
        """Whether a call of the job sent now lands before its lease could end."""
        age = self.age(job_id)
        return age is not None and age < self._open_for
