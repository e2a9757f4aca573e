"""What operators see: the `status` rows and table, and `backup-now --wait` progress."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from orchestrator.jobs import TERMINAL_STATES

# The table is read on a terminal: a Tencent message can be a paragraph, so keep the gist.
ERROR_WIDTH = 60
BAR_WIDTH = 24
PROGRESS_INTERVAL = 0.5

# One row per policy and instance (a policy with no job yet: one row with nulls). Field
# meanings and types: docs/status.md and orchestrator/data/status.schema.json.
_STATUS = """
SELECT p.name AS policy, p.enabled, inst.instance_id, j.state, j.slot, j.reason, j.attempts,
       j.last_error_code AS error_code, j.last_error_message AS error_message, j.finished_at,
       g.image_id AS latest_image, g.slot AS latest_image_slot,
       g.created_at AS latest_image_created_at,
       floor(extract(epoch FROM now() - g.created_at))::bigint AS latest_image_age_seconds,
       p.account, ap.paused_at, ap.code AS paused_code, ap.message AS paused_message,
       ap.request_id AS paused_request_id, ap.probe_at, ap.failed_probes,
       cp.copies
FROM policies p
-- The policy's account is paused (orchestrator.pauses): its jobs wait, and here is why.
LEFT JOIN account_pauses ap ON ap.account = p.account
LEFT JOIN LATERAL (
    -- Every instance with a job or a live image: images `reconcile` adopted after a database
    -- was lost have no job yet, and they are what the operator most needs to see.
    -- The jobs' instances skip through the (policy, instance, ...) key one instance at a time,
    -- so the cost follows the instances, not the history (reading a year of daily jobs whole
    -- made `status` 2.35x slower: README, "A year of history").
    (WITH RECURSIVE walk (instance_id) AS (
        (SELECT instance_id FROM jobs WHERE policy_id = p.id ORDER BY instance_id LIMIT 1)
        UNION ALL
        SELECT (SELECT j.instance_id FROM jobs j
                WHERE j.policy_id = p.id AND j.instance_id > walk.instance_id
                ORDER BY j.instance_id LIMIT 1)
        FROM walk WHERE walk.instance_id IS NOT NULL
    )
    SELECT instance_id FROM walk WHERE instance_id IS NOT NULL)
    UNION
    SELECT instance_id FROM images WHERE policy_id = p.id AND deleted_at IS NULL
) inst ON true
LEFT JOIN LATERAL (
    -- The latest backup job of the instance: a backward scan of the (policy, instance, slot,
    -- region) key. Copy jobs show in `copies` below, through the images they made.
    SELECT * FROM jobs
    WHERE policy_id = p.id AND instance_id = inst.instance_id AND kind = 'backup'
    ORDER BY slot DESC, id DESC LIMIT 1
) j ON true
LEFT JOIN LATERAL (
    SELECT i.image_id, i.slot, i.created_at FROM images i
    WHERE i.policy_id = p.id AND i.instance_id = inst.instance_id AND i.state = 'NORMAL'
      AND i.deleted_at IS NULL AND i.source_image_id IS NULL
    ORDER BY i.slot DESC LIMIT 1
) g ON true
LEFT JOIN LATERAL (
    -- The newest good copy in each destination region (a region the policy no longer copies
    -- to still shows while a copy lives there).
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'region', c.region, 'image_id', c.image_id, 'slot', c.slot,
               'created_at', c.created_at,
               'age_seconds', greatest(0, floor(extract(epoch FROM now() - c.created_at)))::bigint
           ) ORDER BY c.region), '[]'::jsonb) AS copies
    FROM (SELECT DISTINCT ON (i.region) i.region, i.image_id, i.slot, i.created_at
          FROM images i
          WHERE i.policy_id = p.id AND i.instance_id = inst.instance_id
            AND i.source_image_id IS NOT NULL AND i.state = 'NORMAL' AND i.deleted_at IS NULL
          ORDER BY i.region, i.slot DESC) c
) cp ON true
ORDER BY p.name, inst.instance_id
"""

_TIMES = ("slot", "finished_at", "latest_image_slot", "latest_image_created_at")

_TALLY = "SELECT state, count(*) AS n FROM jobs WHERE run_id = $1 GROUP BY state"


async def fetch_rows(conn: Any) -> list[dict[str, Any]]:
    """The status rows (JSON-ready: times as ISO text) from a connection or pool."""
    return [_row(dict(r)) for r in await conn.fetch(_STATUS)]


# The pause columns, folded into one `account_paused` object (null when not paused).
_PAUSE_FIELDS = {
    "paused_at": "since",
    "paused_code": "code",
    "paused_message": "message",
    "paused_request_id": "request_id",
    "probe_at": "next_probe_at",
    "failed_probes": "failed_probes",
}


def _pause_of(row: dict[str, Any]) -> dict[str, Any] | None:
    fields = {name: row.pop(column) for column, name in _PAUSE_FIELDS.items()}
    if fields["since"] is None:
        return None
    for key in ("since", "next_probe_at"):
        fields[key] = fields[key].isoformat()
    return fields


def _row(row: dict[str, Any]) -> dict[str, Any]:
    row["account_paused"] = _pause_of(row)
    for key in _TIMES:
        if row[key] is not None:
            row[key] = row[key].isoformat()
    # A clock skew between hosts must not show a negative age.
    if row["latest_image_age_seconds"] is not None:
        row["latest_image_age_seconds"] = max(0, int(row["latest_image_age_seconds"]))
    return row


def format_age(seconds: int | None) -> str:
    """A compact age: 45s, 12m, 3h12m, 2d4h; '-' when unknown."""
    if seconds is None:
        return "-"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if days:
        return f"{days}d{hours % 24}h"
    if hours:
        return f"{hours}h{minutes % 60:02d}m"
    return f"{minutes}m" if minutes else f"{seconds}s"


def truncate(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def error_text(row: Mapping[str, Any]) -> str:
    """'code: message' of the job's last error (kept while it retries), or ''."""
    if not row["error_code"]:
        return ""
    message = row["error_message"] or ""
    return truncate(
        f"{row['error_code']}: {message}" if message else row["error_code"], ERROR_WIDTH
    )


def _state_text(row: Mapping[str, Any]) -> str:
    state = row["state"] or "-"
    if row["reason"] and row["state"] in ("skipped", "expired"):
        return f"{state} ({row['reason']})"
    return state


_HEADER = (
    "POLICY",
    "INSTANCE",
    "LAST JOB",
    "SLOT",
    "LATEST GOOD IMAGE",
    "AGE",
    "COPIES",
    "LAST ERROR",
)


def _cells(row: Mapping[str, Any]) -> tuple[str, ...]:
    policy = row["policy"] if row["enabled"] else f"{row['policy']} (disabled)"
    return (
        policy,
        row["instance_id"] or "-",
        _state_text(row),
        row["slot"] or "-",
        row["latest_image"] or "-",
        format_age(row["latest_image_age_seconds"]) if row["latest_image"] else "-",
        copies_text(row.get("copies") or []),
        error_text(row),
    )


def copies_text(copies: Sequence[Mapping[str, Any]]) -> str:
    """'ap-shanghai 3h, eu-frankfurt 1d2h': each destination's newest good copy and its age."""
    return ", ".join(f"{c['region']} {format_age(c['age_seconds'])}" for c in copies) or "-"


def aligned(lines: Sequence[Sequence[str]]) -> str:
    """Rows of cells as text columns, the first row the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def render_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The human `status` table: one line per policy and instance, then any paused accounts."""
    table = aligned([_HEADER, *(_cells(r) for r in rows)])
    paused = {r["account"]: r["account_paused"] for r in rows if r.get("account_paused")}
    if not paused:
        return table
    entries = [{"account": name, **pause} for name, pause in sorted(paused.items())]
    return f"{table}\n\n{render_pauses(entries)}"


_PAUSE_HEADER = ("PAUSED ACCOUNT", "SINCE", "NEXT PROBE", "FAILED PROBES", "ERROR")


def render_pauses(entries: Sequence[Mapping[str, Any]]) -> str:
    """Paused accounts (`Pause.to_json` fields), one line each, and how to resume them."""
    lines = [
        (
            e["account"],
            e["since"],
            e["next_probe_at"],
            str(e["failed_probes"]),
            error_text({"error_code": e["code"], "error_message": e["message"]}),
        )
        for e in entries
    ]
    hint = "jobs of a paused account wait; after fixing it: cvm-backup account resume NAME"
    return f"{aligned([_PAUSE_HEADER, *lines])}\n{hint}"


@dataclass(frozen=True)
class Progress:
    """A run's jobs counted by state, and how long we have been watching it."""

    run_id: int
    tally: Mapping[str, int]
    elapsed: float = 0.0

    @property
    def total(self) -> int:
        """Jobs in the run."""
        return sum(self.tally.values())

    @property
    def done(self) -> int:
        """Jobs in a terminal state."""
        return sum(n for state, n in self.tally.items() if state in TERMINAL_STATES)

    def counts(self) -> str:
        """'state n, ...' sorted by state, or 'no jobs'."""
        return ", ".join(f"{s} {n}" for s, n in sorted(self.tally.items())) or "no jobs"


def progress_line(p: Progress) -> str:
    """The plain (non-TTY) line: stable text, printed only when it changes."""
    return f"run {p.run_id}: {p.done}/{p.total} terminal ({p.counts()})"


def progress_bar(p: Progress, width: int = BAR_WIDTH) -> str:
    """The TTY line: run, bar, done/total, counts by state, elapsed."""
    filled = width * p.done // p.total if p.total else 0
    bar = "#" * filled + "-" * (width - filled)
    elapsed = format_age(int(p.elapsed))
    return f"run {p.run_id} [{bar}] {p.done}/{p.total} {p.counts()} {elapsed}"


@dataclass
class ProgressReporter:
    """Writes progress to `stream`: one redrawn bar on a TTY, changed lines otherwise."""

    stream: TextIO
    run_id: int
    clock: Callable[[], float] = time.monotonic
    _started: float = field(init=False)
    _last: str = field(init=False, default="")
    _drawn: int = field(init=False, default=0)
    tty: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._started = self.clock()
        self.tty = self.stream.isatty()

    def update(self, tally: Mapping[str, int]) -> None:
        """Show the latest tally (a TTY redraws in place; plain output skips repeats)."""
        progress = Progress(self.run_id, tally, self.clock() - self._started)
        if self.tty:
            self._redraw(progress_bar(progress))
        else:
            self._print(progress_line(progress), only_if_changed=True)

    def finish(self, tally: Mapping[str, int]) -> None:
        """The final tally, always shown, ending the line on a TTY."""
        progress = Progress(self.run_id, tally, self.clock() - self._started)
        if self.tty:
            self._redraw(progress_bar(progress))
            self.stream.write("\n")
            self.stream.flush()
        else:
            self._print(progress_line(progress), only_if_changed=False)

    def _redraw(self, line: str) -> None:
        # A line longer than the terminal wraps and \r then only rewinds its last part.
        line = truncate(line, max(20, shutil.get_terminal_size().columns - 1))
        self.stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
        self.stream.flush()
        self._drawn = len(line)

    def _print(self, line: str, *, only_if_changed: bool) -> None:
        if only_if_changed and line == self._last:
            return
        self.stream.write(line + "\n")
        self.stream.flush()
        self._last = line


async def tally(conn: Any, run_id: int) -> dict[str, int]:
    """The run's jobs counted by state."""
    return {r["state"]: int(r["n"]) for r in await conn.fetch(_TALLY, run_id)}


async def follow(conn: Any, reporter: ProgressReporter, stop: asyncio.Event) -> None:
    """Report the run's tally every PROGRESS_INTERVAL until `stop` is set (or cancelled)."""
    while not stop.is_set():
        reporter.update(await tally(conn, reporter.run_id))
        await asyncio.sleep(PROGRESS_INTERVAL)
