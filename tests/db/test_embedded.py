"""The embedded default: no DSN, no Postgres installed, commands share one server and stop it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "policies.example.toml"
CLI = str(Path(sys.executable).parent / "cvm-backup")


def _postmasters(pgdata: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if str(pgdata) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _wait_stopped(pgdata: Path, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _postmasters(pgdata):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A CVM_BACKUP_HOME whose embedded server is guaranteed stopped after the test."""
    home = tmp_path / "home"
    yield home
    pgdata = (home / "pgdata").resolve()
    stopped = _wait_stopped(pgdata)
    for proc in _postmasters(pgdata):  # only the server this test started, by its data dir
        proc.kill()
    assert stopped, "the embedded server outlived the commands that used it"


def _env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"CVM_BACKUP_DATABASE_URL", "DATABASE_URL", "CVM_BACKUP_CONFIG"}
    }
    env["CVM_BACKUP_HOME"] = str(home)
    # `check` also resolves credentials; the environment is the first link of the chain.
    env["TENCENTCLOUD_SECRET_ID"] = "AKIDembedded"
    env["TENCENTCLOUD_SECRET_KEY"] = "embedded-secret-key"
    return env


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args],
        env=_env(home),
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_quickstart_works_without_a_dsn(home: Path) -> None:
    """migrate && policy apply example && policy list on the embedded server, then check = 0."""
    script = f"{CLI} migrate && {CLI} policy apply {EXAMPLE} && {CLI} policy list"
    done = subprocess.run(
        ["sh", "-c", script],
        env=_env(home),
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "applied 0001_init" in done.stdout
    assert "+ web-nightly: added" in done.stdout
    listing = done.stdout[done.stdout.index("NAME") :]
    assert "web-nightly" in listing
    assert "db-hourly" in listing
    assert (home / "pgdata" / "PG_VERSION").exists()
    assert _cli(home, "check").returncode == 0
    assert _wait_stopped((home / "pgdata").resolve())


def test_two_commands_at_once_share_the_server(home: Path) -> None:
    """Concurrent commands on one home both succeed and the server stops after the last."""
    assert _cli(home, "migrate").returncode == 0
    procs = [
        subprocess.Popen(
            [CLI, "policy", "list"],
            env=_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results


def test_server_left_by_a_killed_process_is_stopped_later(home: Path) -> None:
    """A SIGKILLed user leaves a stale handle; the next command forgets it and stops the server."""
    with subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from orchestrator.db import embedded;"
            "embedded.start(Path(sys.argv[1])); print('up', flush=True); time.sleep(120)",
            str(home),
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "up"
        holder.kill()
        holder.wait(timeout=10)
    pgdata = (home / "pgdata").resolve()
    assert _postmasters(pgdata), "the killed holder's server should still be running"
    assert _cli(home, "check").returncode == 1  # reachable but not migrated
    assert _wait_stopped(pgdata)
