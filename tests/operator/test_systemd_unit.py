"""The shipped systemd unit: its commands start the daemon, and systemd rates its sandbox OK.

There is no running systemd here, so the unit's commands are run the way systemd would run
them: `ExecStartPre=` lines to completion in order, then `ExecStart=`, in the environment of
`Environment=` overridden by what `EnvironmentFile=` would hold (the test database, the
simulator, test keys, a fast config), with the installed `cvm-backup` entry point for
/usr/local/bin/cvm-backup and a temporary directory for the state directory. The parts of the
sandbox that need no systemd are applied too: `UMask=`, `NoNewPrivileges=` and, on kernels
with PR_SET_MDWE (6.3+), `MemoryDenyWriteExecute=`.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from orchestrator import pauses
from orchestrator.simulator.runner import Simulator
from orchestrator.tencent.errors import TencentError
from tests.fixtures.daemon import config_toml, daemon_env
from tests.fixtures.engine import fast_settings
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import TEST_REGION

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "config" / "cvm-backup.service"
INSTALLED = "/usr/local/bin/cvm-backup"
STATE_DIRECTORY = "/var/lib/cvm-backup"
CLI = str(Path(sys.executable).parent / "cvm-backup")
PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 66, 1
# Applies the unit's sandbox settings that need no systemd, then execs the command. Both prctl
# settings are inherited by every child: the embedded Postgres runs under them too.
_LAUNCHER = f"""
import ctypes, os, sys
umask, nnp, mdwe = sys.argv[1:4]
libc = ctypes.CDLL(None, use_errno=True)
os.umask(int(umask, 8))
if nnp == "1" and libc.prctl({PR_SET_NO_NEW_PRIVS}, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
if mdwe == "1" and libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "PR_SET_MDWE")
os.execv(sys.argv[4], sys.argv[4:])
"""


def parse_unit(path: Path) -> dict[str, list[str]]:
    """The [Service] section: each key's values in order (systemd keys repeat)."""
    service: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        if section == "Service":
            service.setdefault(key.strip(), []).append(value.strip())
    return service


def _yes(service: dict[str, list[str]], key: str) -> bool:
    return service.get(key, ["no"])[-1].lower() in {"yes", "true", "1", "on"}


def mdwe_supported() -> bool:
    """Whether this kernel has PR_SET_MDWE (PR_GET_MDWE answers instead of EINVAL)."""
    return int(ctypes.CDLL(None, use_errno=True).prctl(PR_GET_MDWE, 0, 0, 0, 0)) >= 0


class UnitRunner:
    """The unit's commands with this test's substitutions, run as systemd would order them."""

    def __init__(self, service: dict[str, list[str]], env: dict[str, str], state: Path) -> None:
        self.service = service
        self.state = state
        self.env = {**env, **self._unit_environment()}
        self.env.update(self._env_file(env))

    def _unit_environment(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for value in self.service.get("Environment", []):
            for assignment in shlex.split(value):
                key, _, text = assignment.partition("=")
                found[key] = text.replace(STATE_DIRECTORY, str(self.state))
        return found

    @staticmethod
    def _env_file(env: dict[str, str]) -> dict[str, str]:
        # What /etc/cvm-backup/env holds here; it beats Environment=, as in systemd.
        names = (
            "CVM_BACKUP_DATABASE_URL",
            "CVM_BACKUP_ENDPOINT",
            "CVM_BACKUP_CONFIG",
            "TENCENTCLOUD_SECRET_ID",
            "TENCENTCLOUD_SECRET_KEY",
        )
        return {name: env[name] for name in names if name in env}

    def argv(self, value: str) -> list[str]:
        """One Exec line: the installed entry point, behind the sandbox launcher."""
        words = shlex.split(value.lstrip("-@:+!"))
        assert words[0] == INSTALLED, value
        sandbox = [
            self.service.get("UMask", ["0022"])[-1],
            "1" if _yes(self.service, "NoNewPrivileges") else "0",
            "1" if _yes(self.service, "MemoryDenyWriteExecute") and mdwe_supported() else "0",
        ]
        return [sys.executable, "-c", _LAUNCHER, *sandbox, CLI, *words[1:]]

    def run_pre(self, log: Path) -> None:
        """Every ExecStartPre, in order, each to completion with exit 0."""
        for value in self.service.get("ExecStartPre", []):
            done = subprocess.run(
                self.argv(value),
                env=self.env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            with log.open("a", encoding="utf-8") as out:
                out.write(done.stdout + done.stderr)
            assert done.returncode == 0, (value, done.stdout, done.stderr)

    async def start(self, log: Path) -> asyncio.subprocess.Process:
        """ExecStart as a child whose stderr (the JSON log) goes to `log`."""
        (value,) = self.service["ExecStart"]
        with log.open("ab") as sink:
            return await asyncio.create_subprocess_exec(
                *self.argv(value),
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )


def _text(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")


def _events(log: Path) -> list[dict[str, Any]]:
    lines = _text(log).splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


async def _start_and_stop(runner: UnitRunner, log: Path) -> None:
    """ExecStartPre, ExecStart until daemon.started, then SIGTERM: exit 0."""
    await asyncio.to_thread(runner.run_pre, log)
    proc = await runner.start(log)
    try:

        async def started() -> bool:
            assert proc.returncode is None, _text(log)
            return any(e.get("event") == "daemon.started" for e in _events(log))

        await wait_for(started, within=60)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0, _text(log)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _runner(simulator: Simulator, tmp_path: Path, dsn: str | None) -> tuple[UnitRunner, Path]:
    config = config_toml(fast_settings(dsn or "unused", simulator.url), tmp_path / "fast.toml")
    state = tmp_path / "state"
    env = daemon_env(dsn or "", simulator.url, config, state)
    if dsn is None:
        env.pop("CVM_BACKUP_DATABASE_URL")
    return UnitRunner(parse_unit(UNIT), env, state), tmp_path / "unit.log"


async def _pause_default(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        refused = TencentError("AuthFailure.SecretIdNotFound", "no such key")
        # A probe an hour away: the pause still holds while the unit starts.
        await pauses.pause(
            conn,
            "default",
            refused,
            region=TEST_REGION,
            instance_id="ins-abc12345",
            first_probe=3600,
        )
    finally:
        await conn.close()


def test_unit_migrates_before_start_instead_of_checking() -> None:
    """ExecStartPre runs migrate (check would fail a start while an account is paused)."""
    service = parse_unit(UNIT)
    commands = [shlex.split(v)[1:] for v in service["ExecStartPre"]]
    assert commands == [["migrate"]]
    assert [shlex.split(v)[1:] for v in service["ExecStart"]] == [["run"]]


async def test_unit_starts_the_daemon_while_an_account_is_paused(
    pg_dsn: str, simulator: Simulator, tmp_path: Path
) -> None:
    """With `default` paused, the unit's commands in order start the daemon; SIGTERM exits 0."""
    await _pause_default(pg_dsn)
    runner, log = _runner(simulator, tmp_path, pg_dsn)
    check = await asyncio.to_thread(
        subprocess.run, [CLI, "check"], env=runner.env, capture_output=True, text=True
    )
    assert check.returncode == 1, check.stdout  # the old ExecStartPre would have failed here
    assert "account[default]: FAIL: paused since" in check.stdout
    await _start_and_stop(runner, log)
    assert {"daemon.started", "daemon.stopped"} <= {e.get("event") for e in _events(log)}


@pytest.fixture
def embedded_state(tmp_path: Path) -> Iterator[Path]:
    """The unit's state directory, stand-in; its embedded server must be gone afterwards."""
    state = tmp_path / "state"
    yield state
    pgdata = str((state / "pgdata").resolve())
    left = [p for p in psutil.process_iter(["cmdline"]) if pgdata in (p.info["cmdline"] or [])]
    for proc in left:  # only this test's own server, found by its data directory
        proc.kill()
    assert not left, "the embedded server outlived the unit's commands"


async def test_unit_on_the_embedded_database_from_nothing(
    simulator: Simulator, tmp_path: Path, embedded_state: Path
) -> None:
    """No DSN: ExecStartPre creates the database in the state directory, then the daemon runs."""
    runner, log = _runner(simulator, tmp_path, None)
    assert runner.env["CVM_BACKUP_HOME"] == str(embedded_state)
    await _start_and_stop(runner, log)
    assert (embedded_state / "pgdata" / "PG_VERSION").is_file()
    pgdata = str((embedded_state / "pgdata").resolve())

    async def stopped() -> bool:
        procs = psutil.process_iter(["cmdline"])
        return not any(pgdata in (p.info["cmdline"] or []) for p in procs)

    await wait_for(stopped, within=30)


# ------------------------------------------------------------------------------ systemd-analyze

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
SCORE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)")


def _installable_copy(tmp_path: Path) -> Path:
    """The unit with its binary pointing at one that exists here (verify checks it)."""
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text(encoding="utf-8").replace(INSTALLED, CLI), encoding="utf-8")
    return copy


@needs_analyze
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit: exit 0 and nothing said about it."""
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "verify", str(_installable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert UNIT.name not in done.stderr, done.stderr


@needs_analyze
def test_systemd_analyze_security_scores_under_three(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=yes` rates the sandbox below 3 ("OK" or better)."""
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(_installable_copy(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = SCORE.search(done.stdout)
    if found is None and "--offline" in done.stderr:
        pytest.skip(f"this systemd-analyze cannot rate a unit offline: {done.stderr.strip()}")
    assert found is not None, (done.stdout, done.stderr)
    score, verdict = float(found[1]), found[2]
    assert score < 3, done.stdout
    assert verdict in {"OK", "SAFE", "PERFECT"}, done.stdout
