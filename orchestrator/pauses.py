"""Account pauses: the `account_pauses` rows that stop the calls of a broken account or region.

An account-class answer (docs/design.md#error-classes) pauses in Postgres, so the pause survives a
restart and every replica sees it; the claim statement (`orchestrator.jobs`) skips the jobs of a
paused scope by itself. The scope follows the code (`errors.pause_scope`): a CAM denial
(`UnauthorizedOperation*`, `AuthFailure.UnauthorizedOperation`) can be limited to a region, resource
or tag, so it pauses only its (account, region) (`scope_region` set); a balance or credential error
pauses the whole account (`scope_region` NULL). The replica holding the account's lease probes each
pause in its region when due (`orchestrator.prober`); success or `cvm-backup account resume` deletes
the row.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orchestrator.jobs import LIVE_STATES
from orchestrator.tencent.errors import PauseScope, TencentError, explain, pause_scope

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


# A pause's key: (account, region) for a regional pause, (account, None) for the whole account.
Scope = tuple[str, str | None]


@dataclass(frozen=True, slots=True)
class Pause:
    """One pause: its scope, what paused it, where it is probed, and when next."""

    account: str
    paused_at: datetime
    code: str
    message: str
    request_id: str | None
    region: str
    instance_id: str
    probe_at: datetime
    failed_probes: int
    scope_region: str | None = None  # None: the whole account
    action: str | None = None  # the refused API action (None in rows older than 0004)
    policy: str | None = None  # the policy whose job got the answer

    @property
    def scope(self) -> Scope:
        """The key of this pause."""
        return (self.account, self.scope_region)

    @property
    def scope_label(self) -> str:
        """`account-wide` or `region ap-guangzhou`, for messages."""
        return "account-wide" if self.scope_region is None else f"region {self.scope_region}"

    @property
    def resume_command(self) -> str:
        """The command that lifts exactly this pause."""
        region = "" if self.scope_region is None else f" --region {self.scope_region}"
        return f"cvm-backup account resume {self.account}{region}"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields (times as ISO text)."""
        return {
            "account": self.account,
            "scope": "account" if self.scope_region is None else "region",
            "scope_region": self.scope_region,
            "since": self.paused_at.isoformat(),
            "code": self.code,
            "message": self.message,
            "request_id": self.request_id,
            "action": self.action,
            "policy": self.policy,
            "region": self.region,
            "instance_id": self.instance_id,
            "next_probe_at": self.probe_at.isoformat(),
            "failed_probes": self.failed_probes,
        }


_COLUMNS = (
    "account, paused_at, code, message, request_id, region, instance_id, probe_at,"
    " failed_probes, scope_region, action, policy"
)
# The row of one scope: $1 the account, $2 the region of a regional pause or NULL.
_SCOPE = "account = $1 AND scope_key = coalesce($2::text, '')"

# A second answer of the same scope while paused (another job in flight) keeps the first
# reason and schedule: re-pausing must not push the probe out or reset its backoff.
_PAUSE = f"""
WITH p AS (
    INSERT INTO account_pauses (account, code, message, request_id, region, instance_id, probe_at,
                                scope_region, action, policy)
    VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7), $8, $9, $10)
    ON CONFLICT (account, scope_key) DO NOTHING
    RETURNING {_COLUMNS}
), e AS (
    INSERT INTO events (kind, account, region, instance_id, reason, details)
    SELECT 'account.paused', account, region, instance_id, code,
           jsonb_strip_nulls(jsonb_build_object(
               'message', message, 'request_id', request_id, 'next_probe_at', probe_at,
               'scope', CASE WHEN scope_region IS NULL THEN 'account' ELSE 'region' END,
               'scope_region', scope_region, 'action', action, 'policy', policy))
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
    WHERE account = $1 AND scope_key = coalesce($7::text, '')
    RETURNING {_COLUMNS}
), e AS (
    INSERT INTO events (kind, account, region, instance_id, reason, details)
    SELECT 'account.probe_failed', account, region, instance_id, code,
           jsonb_strip_nulls(jsonb_build_object('message', message, 'request_id', request_id,
                                                'failed_probes', failed_probes,
                                                'next_probe_at', probe_at,
                                                'scope_region', scope_region))
    FROM p
)
SELECT * FROM p
"""

# `by` says who lifted it: 'probe' (a probe answered) or 'operator' (`account resume`).
# $3: the one scope to lift ($4 false: NULL is the account-wide pause), or every pause of the
# account ($4 true: an operator who fixed the account).
_RESUME = f"""
WITH p AS (
    DELETE FROM account_pauses
    WHERE account = $1 AND ($4 OR scope_key = coalesce($3::text, ''))
    RETURNING {_COLUMNS}
), e AS (
    INSERT INTO events (kind, account, region, instance_id, reason, details)
    SELECT 'account.resumed', account, region, instance_id, $2,
           jsonb_strip_nulls(jsonb_build_object('paused_code', code, 'paused_at', paused_at,
                                                'failed_probes', failed_probes,
                                                'scope_region', scope_region))
    FROM p
)
SELECT * FROM p ORDER BY scope_region NULLS FIRST
"""

# Live jobs held back by a pause of their account (account-wide) or of their region; the same
# condition as the claim's (orchestrator.jobs).
_HELD_BACK = """
SELECT count(*) FROM jobs j
WHERE j.state = ANY($1::text[]) AND ($2::bigint IS NULL OR j.run_id = $2)
  AND EXISTS (SELECT 1 FROM account_pauses ap
              WHERE ap.account = j.account
                AND (ap.scope_region IS NULL OR ap.scope_region = j.region))
"""


def _message(exc: TencentError) -> str:
    # A SignatureExpire is recorded as the clock problem it is (errors.explain).
    return explain(exc)[:MESSAGE_LIMIT]


def scope_of(exc: TencentError, region: str) -> str | None:
    """The region a pause for `exc` covers (a CAM denial), or None for the whole account."""
    return region if pause_scope(exc.code) is PauseScope.REGION else None


async def pause(
    conn: Any,
    account: str,
    exc: TencentError,
    *,
    region: str,
    instance_id: str,
    first_probe: float,
    policy: str | None = None,
) -> Pause | None:
    """Pause `account` (or only `region`, for a CAM denial) because of `exc`.

    The new pause, or None when that scope already was paused.
    """
    row = await conn.fetchrow(
        _PAUSE,
        account,
        exc.code,
        _message(exc),
        exc.request_id,
        region,
        instance_id,
        first_probe,
        scope_of(exc, region),
        exc.action,
        policy,
    )
    return None if row is None else Pause(**dict(row))


async def refused(
    conn: Any,
    account: str,
    exc: TencentError,
    timings: ProbeTimings,
    *,
    scope_region: str | None = None,
) -> Pause | None:
    """A probe got an account-class answer again: back off; None when no longer paused."""
    row = await conn.fetchrow(
        _REFUSED,
        account,
        exc.code,
        _message(exc),
        exc.request_id,
        timings.base,
        timings.cap,
        scope_region,
    )
    return None if row is None else Pause(**dict(row))


async def postpone(
    conn: Any, account: str, seconds: float, *, scope_region: str | None = None
) -> bool:
    """A probe got no answer (throttled, a timeout): try again in `seconds`, not counted."""
    status = await conn.execute(
        "UPDATE account_pauses SET probe_at = now() + make_interval(secs => $3),"
        f" updated_at = now() WHERE {_SCOPE}",
        account,
        scope_region,
        seconds,
    )
    return bool(status == "UPDATE 1")


async def resume(
    conn: Any, account: str, by: str, *, scope_region: str | None = None
) -> Pause | None:
    """Lift one pause of `account`: account-wide, or of `scope_region`; None when not paused.

    `by`: 'probe' or 'operator'.
    """
    row = await conn.fetchrow(_RESUME, account, by, scope_region, False)
    return None if row is None else Pause(**dict(row))


async def resume_all(conn: Any, account: str, by: str) -> list[Pause]:
    """Lift every pause of `account`, account-wide and regional; those lifted."""
    rows = await conn.fetch(_RESUME, account, by, None, True)
    return [Pause(**dict(row)) for row in rows]


async def listed(conn: Any, accounts: Collection[str] | None = None) -> list[Pause]:
    """The pauses (of `accounts` when given), by account, the account-wide one first."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM account_pauses"
        " WHERE $1::text[] IS NULL OR account = ANY($1::text[]) ORDER BY account, scope_key",
        None if accounts is None else sorted(accounts),
    )
    return [Pause(**dict(row)) for row in rows]


async def held_back(conn: Any, run_id: int | None = None) -> int:
    """Live jobs (of one run, or all) that wait because their account or region is paused."""
    value = await conn.fetchval(_HELD_BACK, list(LIVE_STATES), run_id)
    return int(value or 0)


def log_paused(log: Any, paused: Pause, exc: TencentError, *, default_action: str) -> None:
    """Say loudly what stopped, where, and how it resumes (`default_action`: the caller's call)."""
    if paused.scope_region is None:
        fix = "fix the account (balance, credentials, clock)"
    else:
        fix = (
            f"grant cvm:{paused.action or default_action} in {paused.scope_region} to these keys"
            " (a CAM policy can be scoped by region, resource or tag); other regions go on"
        )
    log.error(
        "account.paused",
        account=paused.account,
        scope=paused.scope_label,
        scope_region=paused.scope_region,
        action=paused.action,
        policy=paused.policy,
        code=exc.code,
        message=paused.message,
        request_id=exc.request_id,
        next_probe_at=paused.probe_at.isoformat(),
        hint=(
            f"{fix}: it resumes by itself once a probe succeeds,"
            f" or now with `{paused.resume_command}`"
        ),
    )
