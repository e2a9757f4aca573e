"""Account pauses: the `account_pauses` rows that stop every call of a broken account.

An account-wide answer (DESIGN §3: `AuthFailure.*`, `UnauthorizedOperation*`,
`InvalidAccount.InsufficientBalance`) pauses the account in Postgres, so the pause survives a
restart and every replica sees it; the claim statement (`orchestrator.jobs`) skips the jobs of a
paused account by itself. The replica holding the account's lease probes it when due
(`orchestrator.prober`); success or `cvm-backup account resume` deletes the row.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.jobs import LIVE_STATES
from orchestrator.tencent.errors import TencentError

# The first probe goes this long after the pause; each account-wide answer to a probe doubles
# the wait up to the cap; a probe that could not get an answer (throttled, a timeout) goes
# again after `retry`. An operator who fixed the account need not wait: `account resume`.
PROBE_BASE = 60.0
PROBE_CAP = 3600.0
PROBE_RETRY = 15.0
# Tencent's messages are short; a runaway one must not bloat the row or the status table.
MESSAGE_LIMIT = 500


@dataclass(frozen=True, slots=True)
class ProbeTimings:
    """How the probes of a paused account are spaced, in seconds."""

    base: float = PROBE_BASE
    cap: float = PROBE_CAP
    retry: float = PROBE_RETRY

    def after_failures(self, failed_probes: int) -> float:
        """The wait before the next probe once `failed_probes` probes were refused."""
        # min() before the power: thousands of refusals must not overflow the float.
        return min(self.base * float(2 ** min(failed_probes, 32)), self.cap)


@dataclass(frozen=True, slots=True)
class Pause:
    """One paused account: what paused it, where it is probed, and when next."""

    account: str
    paused_at: datetime
    code: str
    message: str
    request_id: str | None
    region: str
    instance_id: str
    probe_at: datetime
    failed_probes: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields (times as ISO text)."""
        return {
            "account": self.account,
            "since": self.paused_at.isoformat(),
            "code": self.code,
            "message": self.message,
            "request_id": self.request_id,
            "region": self.region,
            "instance_id": self.instance_id,
            "next_probe_at": self.probe_at.isoformat(),
            "failed_probes": self.failed_probes,
        }


_COLUMNS = (
    "account, paused_at, code, message, request_id, region, instance_id, probe_at, failed_probes"
)

# A second account-wide answer while paused (another job in flight) keeps the first reason and
# schedule: re-pausing must not push the probe out or reset its backoff.
_PAUSE = f"""
WITH p AS (
    INSERT INTO account_pauses (account, code, message, request_id, region, instance_id, probe_at)
    VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
    ON CONFLICT (account) DO NOTHING
    RETURNING {_COLUMNS}
), e AS (
    INSERT INTO events (kind, account, region, instance_id, reason, details)
    SELECT 'account.paused', account, region, instance_id, code,
           jsonb_strip_nulls(jsonb_build_object('message', message, 'request_id', request_id,
                                                'next_probe_at', probe_at))
    FROM p
)
SELECT * FROM p
"""

# One refusal more: base * 2^refusals, capped (ProbeTimings.after_failures); the exponent is
# bounded first so a long outage cannot overflow.
_REFUSED = f"""
WITH p AS (
    UPDATE account_pauses
    SET failed_probes = failed_probes + 1, code = $2, message = $3, request_id = $4,
        probe_at = now() + make_interval(
            secs => least($5::float8 * power(2, least(failed_probes + 1, 32)), $6::float8)),
        updated_at = now()
    WHERE account = $1
    RETURNING {_COLUMNS}
), e AS (
    INSERT INTO events (kind, account, region, instance_id, reason, details)
    SELECT 'account.probe_failed', account, region, instance_id, code,
           jsonb_strip_nulls(jsonb_build_object('message', message, 'request_id', request_id,
                                                'failed_probes', failed_probes,
                                                'next_probe_at', probe_at))
    FROM p
)
SELECT * FROM p
"""

# `by` says who lifted it: 'probe' (a probe answered) or 'operator' (`account resume`).
_RESUME = f"""
WITH p AS (
    DELETE FROM account_pauses WHERE account = $1 RETURNING {_COLUMNS}
), e AS (
    INSERT INTO events (kind, account, region, instance_id, reason, details)
    SELECT 'account.resumed', account, region, instance_id, $2,
           jsonb_build_object('paused_code', code, 'paused_at', paused_at,
                              'failed_probes', failed_probes)
    FROM p
)
SELECT * FROM p
"""


def _message(exc: TencentError) -> str:
    return exc.message[:MESSAGE_LIMIT]


async def pause(
    conn: Any, account: str, exc: TencentError, *, region: str, instance_id: str, first_probe: float
) -> Pause | None:
    """Pause `account` because of `exc`; the new pause, or None when it already was paused."""
    row = await conn.fetchrow(
        _PAUSE, account, exc.code, _message(exc), exc.request_id, region, instance_id, first_probe
    )
    return None if row is None else Pause(**dict(row))


async def refused(
    conn: Any, account: str, exc: TencentError, timings: ProbeTimings
) -> Pause | None:
    """A probe got an account-wide answer again: back off; None when no longer paused."""
    row = await conn.fetchrow(
        _REFUSED, account, exc.code, _message(exc), exc.request_id, timings.base, timings.cap
    )
    return None if row is None else Pause(**dict(row))


async def postpone(conn: Any, account: str, seconds: float) -> bool:
    """A probe got no answer (throttled, a timeout): try again in `seconds`, not counted."""
    status = await conn.execute(
        "UPDATE account_pauses SET probe_at = now() + make_interval(secs => $2),"
        " updated_at = now() WHERE account = $1",
        account,
        seconds,
    )
    return bool(status == "UPDATE 1")


async def resume(conn: Any, account: str, by: str) -> Pause | None:
    """Lift the pause of `account` (`by`: 'probe' or 'operator'); None when it was not paused."""
    row = await conn.fetchrow(_RESUME, account, by)
    return None if row is None else Pause(**dict(row))


async def listed(conn: Any, accounts: Collection[str] | None = None) -> list[Pause]:
    """The paused accounts (of `accounts` when given), by name."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM account_pauses"
        " WHERE $1::text[] IS NULL OR account = ANY($1::text[]) ORDER BY account",
        None if accounts is None else sorted(accounts),
    )
    return [Pause(**dict(row)) for row in rows]


async def held_back(conn: Any, run_id: int | None = None) -> int:
    """Live jobs (of one run, or all) that wait because their account is paused."""
    value = await conn.fetchval(
        "SELECT count(*) FROM jobs j WHERE j.state = ANY($1::text[])"
        " AND ($2::bigint IS NULL OR j.run_id = $2)"
        " AND EXISTS (SELECT 1 FROM account_pauses ap WHERE ap.account = j.account)",
        list(LIVE_STATES),
        run_id,
    )
    return int(value or 0)
