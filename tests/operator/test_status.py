"""`status` rows, table and JSON schema; `backup-now --wait` as plain lines and as a TTY bar."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import pytest

from orchestrator import status
from orchestrator.simulator.runner import Simulator
from tests.fixtures.daemon import DaemonProcess, config_toml, daemon_env
from tests.fixtures.engine import fast_settings
from tests.fixtures.operator import insert_image, insert_policy
from tests.fixtures.sim import TEST_REGION, TEST_SECRET_ID, TEST_SECRET_KEY

LONG_MESSAGE = "The instance is busy with another operation, " * 5
SLOT = datetime(2024, 5, 1, tzinfo=UTC)


def _schema() -> dict[str, Any]:
    """The schema as shipped inside the package (not read from the source tree)."""
    text = resources.files("orchestrator").joinpath("data/status.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _validate(rows: Any) -> None:
    jsonschema.Draft202012Validator.check_schema(_schema())
    jsonschema.Draft202012Validator(_schema()).validate(rows)


async def _job(
    pool: asyncpg.Pool, policy_id: int, instance_id: str, state: str, **extra: Any
) -> None:
    """One job row (and its run) written with plain SQL."""
    run_id = await pool.fetchval(
        "INSERT INTO runs (policy_id, slot) VALUES ($1, $2)"
        " ON CONFLICT (policy_id, slot) DO UPDATE SET slot = EXCLUDED.slot RETURNING id",
        policy_id,
        SLOT,
    )
    terminal = state in ("succeeded", "failed", "expired", "skipped")
    await pool.execute(
        "INSERT INTO jobs (run_id, policy_id, account, region, instance_id, slot, image_name,"
        " state, deadline, finished_at, image_id, attempts, last_error_code, last_error_message)"
        " VALUES ($1, $2, 'default', $3, $4, $5, $6, $7, $5::timestamptz + interval '2 days',"
        " $8, $9, $10, $11, $12)",
        run_id,
        policy_id,
        TEST_REGION,
        instance_id,
        SLOT,
        f"cvmb-{instance_id}",
        state,
        datetime.now(UTC) if terminal else None,
        extra.get("image_id"),
        extra.get("attempts", 0),
        extra.get("error_code"),
        extra.get("error_message"),
    )


async def _fleet(pool: asyncpg.Pool, instance_ids: list[str]) -> list[str]:
    """A succeeded job with a 3h12m-old image, a retrying job with an error, a disabled policy."""
    ok, busy = instance_ids[:2]
    policy = await insert_policy(pool, "alpha", [ok, busy])
    idle = await insert_policy(pool, "idle", instance_ids[2:3])
    await pool.execute("UPDATE policies SET enabled = false WHERE id = $1", idle)
    await _job(pool, policy, ok, "succeeded", image_id="img-good0001")
    created = datetime.now(UTC) - timedelta(hours=3, minutes=12, seconds=5)
    await insert_image(pool, policy, ok, "img-good0001", created)
    await _job(
        pool,
        policy,
        busy,
        "pending",
        attempts=2,
        error_code="InvalidInstance.BusyState",
        error_message=LONG_MESSAGE,
    )
    return [ok, busy]


async def test_rows_carry_image_age_and_last_error_and_match_the_schema(
    pg_pool: asyncpg.Pool, instance_ids: list[str]
) -> None:
    """Rows give the latest image's age in seconds, the retrying job's error; schema-valid."""
    ok, busy = await _fleet(pg_pool, instance_ids)
    rows = await status.fetch_rows(pg_pool)
    _validate(json.loads(json.dumps(rows)))
    by_key = {(r["policy"], r["instance_id"]): r for r in rows}
    assert set(by_key) == {("alpha", ok), ("alpha", busy), ("idle", None)}
    assert by_key["idle", None]["enabled"] is False
    good = by_key["alpha", ok]
    assert good["latest_image"] == "img-good0001"
    assert 3 * 3600 + 12 * 60 <= good["latest_image_age_seconds"] < 3 * 3600 + 13 * 60
    assert good["error_code"] is None
    retrying = by_key["alpha", busy]
    assert (retrying["state"], retrying["attempts"]) == ("pending", 2)
    assert retrying["error_message"] == LONG_MESSAGE
    assert retrying["latest_image"] is None
    assert retrying["latest_image_age_seconds"] is None


async def test_table_shows_age_and_a_truncated_error(
    pg_pool: asyncpg.Pool, instance_ids: list[str]
) -> None:
    """The table shows the age as 3h12m and the error as 'code: message', cut with an ellipsis."""
    ok, busy = await _fleet(pg_pool, instance_ids)
    lines = status.render_table(await status.fetch_rows(pg_pool)).splitlines()
    header = [
        "POLICY",
        "INSTANCE",
        "LAST JOB",
        "SLOT",
        "LATEST GOOD IMAGE",
        "AGE",
        "COPIES",
        "LAST ERROR",
    ]
    assert re.split(r"\s{2,}", lines[0]) == header
    good = next(line for line in lines if ok in line)
    assert "succeeded" in good
    assert "img-good0001" in good
    assert " 3h12m" in good
    retrying = next(line for line in lines if busy in line)
    assert "InvalidInstance.BusyState: The instance is busy" in retrying
    assert retrying.endswith("…")
    assert len(status.error_text({"error_code": "X", "error_message": LONG_MESSAGE})) == 60
    assert re.match(r"idle \(disabled\)\s+-\s+-\s+-\s+-\s+-\s+-$", lines[-1])


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        *[(None, "-"), (0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"), (11520, "3h12m")],
        *[(3600, "1h00m"), (86399, "23h59m"), (86400, "1d0h"), (3 * 86400 + 7200, "3d2h")],
    ],
)
def test_format_age(seconds: int | None, text: str) -> None:
    """Ages read as seconds, minutes, hours+minutes or days+hours."""
    assert status.format_age(seconds) == text


class FakeTty(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        """Yes, a terminal."""
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


def test_plain_stream_prints_each_changed_line_once() -> None:
    """Off a TTY: one line per change, repeats skipped, the final line always printed."""
    out = io.StringIO()
    reporter = status.ProgressReporter(out, 7)
    for tally in ({"pending": 2}, {"pending": 2}, {"pending": 1, "succeeded": 1}):
        reporter.update(tally)
    reporter.finish({"pending": 1, "succeeded": 1})
    assert out.getvalue().splitlines() == [
        "run 7: 0/2 terminal (pending 2)",
        "run 7: 1/2 terminal (pending 1, succeeded 1)",
        "run 7: 1/2 terminal (pending 1, succeeded 1)",
    ]


def test_tty_redraws_one_line_with_bar_counts_and_elapsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a TTY: \\r-redrawn bar with done/total, counts by state and elapsed; one final newline."""
    monkeypatch.setenv("COLUMNS", "200")
    out, clock = FakeTty(), Clock()
    reporter = status.ProgressReporter(out, 3, clock=clock)
    reporter.update({"pending": 3, "failed": 1})
    clock.now += 75
    reporter.finish({"succeeded": 3, "failed": 1})
    text = out.getvalue()
    assert text.count("\n") == 1
    assert text.endswith("\n")
    frames = text.rstrip("\n").split("\r")[1:]
    assert frames[0] == f"run 3 [{'#' * 6}{'-' * 18}] 1/4 failed 1, pending 3 0s"
    assert frames[1].rstrip() == f"run 3 [{'#' * 24}] 4/4 failed 1, succeeded 3 1m"
    assert len(frames[1]) >= len(frames[0])  # a shorter frame blanks the longer one's tail


def test_tty_bar_fits_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bar wider than the terminal is cut so \\r still rewinds to its start."""
    monkeypatch.setenv("COLUMNS", "40")
    out = FakeTty()
    status.ProgressReporter(out, 1).update({"pending": 10, "succeeded": 5, "failed": 2})
    assert len(out.getvalue()) <= 40
    assert out.getvalue().endswith("…")


def _cli(dsn: str, simulator: Simulator, tmp_path: Path) -> DaemonProcess:
    config = config_toml(fast_settings(dsn, simulator.url), tmp_path / "config.toml")
    return DaemonProcess(daemon_env(dsn, simulator.url, config, tmp_path), tmp_path / "log")


async def test_status_json_from_the_command_matches_the_schema_without_secrets(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    tmp_path: Path,
    instance_ids: list[str],
) -> None:
    """`status --json` as run by a user validates against the shipped schema; no secret leaks."""
    await _fleet(pg_pool, instance_ids)
    cli = _cli(pg_dsn, simulator, tmp_path)
    await cli.start("status", "--json")
    assert await cli.wait(within=60) == 0
    rows = json.loads(cli.stdout())
    _validate(rows)
    assert {r["latest_image"] for r in rows} == {"img-good0001", None}
    await cli.start("status")
    assert await cli.wait(within=60) == 0
    output = cli.stdout() + cli.stderr()
    assert "3h12m" in output
    assert TEST_SECRET_KEY not in output
    assert TEST_SECRET_ID not in output


def _read_all(fd: int) -> bytes:
    """Everything written to a pty until its last writer closes it."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def test_backup_now_wait_draws_a_bar_on_a_tty(
    pg_dsn: str,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    tmp_path: Path,
    instance_ids: list[str],
) -> None:
    """Under a pseudo-terminal, backup-now --wait redraws one bar line and ends at N/N."""
    await insert_policy(pg_pool, "now", instance_ids)
    cli = _cli(pg_dsn, simulator, tmp_path)
    cli.env["COLUMNS"] = "200"
    master, slave = os.openpty()
    try:
        with (tmp_path / "stderr").open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "orchestrator"),
                *("backup-now", "now", "--wait"),
                env=cli.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=slave,
                stderr=err,
            )
        os.close(slave)
        reading = asyncio.create_task(asyncio.to_thread(_read_all, master))
        try:
            assert await asyncio.wait_for(proc.wait(), 60) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        text = (await asyncio.wait_for(reading, 10)).decode()
    finally:
        os.close(master)
    total = len(instance_ids)
    first, bar_line = [line for line in text.split("\r\n") if line][:2]
    assert "created" in first
    assert "terminal (" not in text  # no plain lines on a terminal
    last = bar_line.split("\r")[-1].rstrip()
    assert re.fullmatch(rf"run 1 \[#{{24}}\] {total}/{total} succeeded {total} \d+s", last), last
