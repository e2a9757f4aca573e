"""Engine test helpers: fast settings, policies written with plain SQL, an engine context."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from orchestrator import logs
from orchestrator.config import RetrySettings, Settings
from orchestrator.context import EngineContext
from orchestrator.daemon import Engine, Signals, engine_context
from orchestrator.simulator.runner import Simulator
from tests.fixtures.sim import TEST_REGION

# Small bases and intervals so faults and retries resolve in well under a second.
FAST_RETRY = RetrySettings(
    transient_base=0.05,
    busy_base=0.1,
    max_delay=0.4,
    max_transient_attempts=8,
    throttle_delay=0.05,
)


def fast_settings(dsn: str, endpoint: str, **changes: Any) -> Settings:
    """Settings for tests: loopback endpoint, tiny retry bases and poll intervals."""
    base = Settings(
        database_url=dsn,
        endpoint=endpoint,
        request_timeout=1.5,
        max_in_flight=16,
        lease_seconds=3.0,
        poll_interval=0.2,
        tracker_min_interval=0.05,
        tracker_max_interval=0.2,
        shutdown_grace=3.0,
        retry=FAST_RETRY,
    )
    return replace(base, **changes)


def config_toml(settings: Settings, path: Path) -> Path:
    """Write the non-environment part of `settings` as a CVM_BACKUP_CONFIG file."""
    r = settings.retry
    path.write_text(
        f"request_timeout = {settings.request_timeout}\n"
        f"max_in_flight = {settings.max_in_flight}\n"
        f"lease_seconds = {settings.lease_seconds}\n"
        f"poll_interval = {settings.poll_interval}\n"
        f"tracker_min_interval = {settings.tracker_min_interval}\n"
        f"tracker_max_interval = {settings.tracker_max_interval}\n"
        f"shutdown_grace = {settings.shutdown_grace}\n"
        'log_format = "json"\n'
        "[retry]\n"
        f"transient_base = {r.transient_base}\nbusy_base = {r.busy_base}\n"
        f"max_delay = {r.max_delay}\nmax_transient_attempts = {r.max_transient_attempts}\n"
        f"throttle_delay = {r.throttle_delay}\n",
        encoding="utf-8",
    )
    return path


async def insert_policy(
    pool: asyncpg.Pool,
    name: str,
    *,
    instance_ids: Sequence[str] = (),
    instance_tags: Mapping[str, str] | None = None,
    schedule: str = "0 0 * * *",
    window: str = "30 days",
    keep_last: int = 7,
    on_quota: str = "rotate",
    include_data_disks: bool = False,
    region: str = TEST_REGION,
) -> int:
    """A policy written with plain SQL, as an operator may; its id."""
    value = await pool.fetchval(
        "INSERT INTO policies (name, region, schedule, instance_ids, instance_tags,"
        " completion_window, keep_last, on_quota, include_data_disks)"
        " VALUES ($1, $2, $3, $4, $5, $6::text::interval, $7, $8, $9) RETURNING id",
        name,
        region,
        schedule,
        list(instance_ids),
        dict(instance_tags or {}),
        window,
        keep_last,
        on_quota,
        include_data_disks,
    )
    return int(value)


async def job_states(pool: asyncpg.Pool) -> dict[str, tuple[str, str | None, str | None]]:
    """instance id -> (state, reason, last error code) of every job."""
    rows = await pool.fetch("SELECT instance_id, state, reason, last_error_code FROM jobs")
    return {r["instance_id"]: (r["state"], r["reason"], r["last_error_code"]) for r in rows}


async def drain(ctx: EngineContext, *, run_id: int | None = None, within: float = 30.0) -> int:
    """Run the engine in --once mode (without signal handlers) until drained; its exit code."""
    return await asyncio.wait_for(Engine(ctx, Signals(), once=True, run_id=run_id).run(), within)


async def wait_for(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    """Poll `check` until it holds; fail the test after `within` seconds."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - polls a database or a file, not an event
            await asyncio.sleep(0.05)


def sim_report(sim: Simulator) -> dict[str, Any]:
    """The simulator's inspection view (GET /_sim/state), minus the call log."""
    return sim.state.to_json(include_calls=False)


def assert_sim_clean(sim: Simulator) -> None:
    """No rate-limit violation, no duplicate, no foreign deletion, every delete with its snaps."""
    report = sim_report(sim)
    assert sum(report["violations"].values()) == 0, report["violations"]
    assert report["duplicate_count"] == 0, report["duplicates"]
    ours = {i["image_id"] for i in report["images"] if i["ours"]}
    for deletion in report["deletions"]:
        assert deletion["image_id"] in ours, deletion
        assert deletion["delete_binded_snap"] is True, deletion


def slot_of(text: str) -> datetime:
    """An aware datetime from ISO text."""
    return datetime.fromisoformat(text)


@pytest.fixture
async def engine_ctx(pg_pool: asyncpg.Pool, sim_env: Simulator) -> AsyncIterator[EngineContext]:
    """An engine context on this test's database and the simulator, with fast settings."""
    settings = fast_settings("unused", sim_env.url)
    async with engine_context(settings, pg_pool) as ctx:
        yield ctx


class LogCapture:
    """JSON log lines written while a test runs."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def lines(self) -> list[dict[str, Any]]:
        """Every line, parsed."""
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line]

    @property
    def text(self) -> str:
        """The raw output."""
        return self.stream.getvalue()

    def events(self) -> list[str]:
        """The event names, in order."""
        return [line["event"] for line in self.lines]


@pytest.fixture
def captured_logs() -> Iterator[LogCapture]:
    """Route structlog to an in-memory JSON stream for the test."""
    capture = LogCapture()
    logs.configure("json", "debug", capture.stream)
    yield capture
    structlog.reset_defaults()


def daemon_env(dsn: str, endpoint: str, config: Path, home: Path) -> dict[str, str]:
    """The environment of a daemon subprocess: test database, simulator, test credentials."""
    from orchestrator.bench.daemon import daemon_env as isolated_env
    from tests.fixtures.sim import TEST_SECRET_ID, TEST_SECRET_KEY

    env = isolated_env(
        dsn, endpoint, config, home, secret_id=TEST_SECRET_ID, secret_key=TEST_SECRET_KEY
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


class DaemonProcess:
    """`python -m orchestrator ARGS` as a subprocess, its stderr (JSON logs) kept in a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        """Start the command; output is appended to the log file."""
        import sys

        out_path = self.log_path.with_suffix(".out")
        with self.log_path.open("ab") as sink, out_path.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "orchestrator",
                *args,
                env=self.env,
                stdout=out,
                stderr=sink,
                stdin=asyncio.subprocess.DEVNULL,
            )
        return self.proc

    def stdout(self) -> str:
        """Everything the commands printed on stdout so far."""
        path = self.log_path.with_suffix(".out")
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def stderr(self) -> str:
        """Everything written on stderr so far (logs and error messages)."""
        return self.log_path.read_text(encoding="utf-8") if self.log_path.exists() else ""

    async def wait(self, within: float) -> int:
        """The exit code, failing the test when the process outlives `within` seconds."""
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), within)

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far (other output is ignored)."""
        found = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                with_event = json.loads(line)
                found.append(with_event)
        return found

    async def kill(self) -> None:
        """SIGKILL the process (if still running) and reap it."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
