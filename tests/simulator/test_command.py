"""`cvm-backup simulator`: as a subprocess it prints its URL, serves and stops cleanly on signals;
its flags build the SimConfig it serves."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from orchestrator.cli import build_parser
from orchestrator.simulator.command import DEV_SECRET_ID, DEV_SECRET_KEY, build_config
from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.fleet import write_config
from tests.fixtures.sim import TEST_SECRET_ID, TEST_SECRET_KEY, make_sim_config
from tests.simulator.helpers import Address, error_code, raw_call

STARTUP_TIMEOUT = 20.0


async def _start(
    *args: str, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, Address]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "simulator",
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), STARTUP_TIMEOUT)
    url = line.decode().strip()
    assert url.startswith("http://127.0.0.1:"), url
    return proc, Address(url)


async def _stop(proc: asyncio.subprocess.Process, signum: int) -> tuple[int, bytes]:
    proc.send_signal(signum)
    _, stderr = await asyncio.wait_for(proc.communicate(), STARTUP_TIMEOUT)
    return await proc.wait(), stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_subprocess_serves_and_stops(tmp_path: Path, signum: int) -> None:
    """The simulator process answers signed calls, shows its state, and exits 0 on a signal."""
    fleet = write_config(make_sim_config(instances=3), tmp_path / "fleet.json")
    proc, address = await _start("--fleet", str(fleet), "--seed", "5", "--limit", "CreateImage=0")
    try:
        answer = await raw_call(address, "DescribeInstances", {})
        assert error_code(answer) is None
        assert answer.body["Response"]["TotalCount"] == 3
        async with (
            aiohttp.ClientSession() as session,
            session.get(address.url + "/_sim/state") as resp,
        ):
            state = await resp.json()
        assert state["calls"][0]["action"] == "DescribeInstances"
    finally:
        code, stderr = await _stop(proc, signum)
    assert code == 0
    assert TEST_SECRET_KEY.encode() not in stderr


async def test_subprocess_flags(tmp_path: Path) -> None:
    """--instances, --fault-rate and --quota shape the served simulator."""
    fleet = write_config(make_sim_config(instances=1), tmp_path / "fleet.json")
    proc, address = await _start(
        "--fleet", str(fleet), "--instances", "4", "--quota", "7", "--fault-rate", "1.0"
    )
    try:
        answer = await raw_call(address, "DescribeImageQuota", {})
        assert error_code(answer) == "InternalError"
        url = address.url + "/_sim/state"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            assert (await resp.json())["default_quota"] == 7
    finally:
        code, stderr = await _stop(proc, signal.SIGTERM)
    assert code == 0
    assert b"5 instances" in stderr


async def test_bad_fleet_file_exits_2(tmp_path: Path) -> None:
    """A bad fleet file is a usage error: exit 2 with a message naming the field."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[[instances]]\nid = "vm-1"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "simulator",
        "--port",
        "0",
        "--fleet",
        str(bad),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), STARTUP_TIMEOUT)
    assert proc.returncode == 2
    assert b"instances[0].id" in stderr


async def test_credentials_from_environment() -> None:
    """Without a fleet file the account comes from TENCENTCLOUD_SECRET_ID / _KEY."""
    env = {
        **os.environ,
        "TENCENTCLOUD_SECRET_ID": TEST_SECRET_ID,
        "TENCENTCLOUD_SECRET_KEY": TEST_SECRET_KEY,
    }
    proc, address = await _start("--instances", "2", "--no-limits", env=env)
    try:
        answer = await raw_call(address, "DescribeInstances", {})
        assert answer.body["Response"]["TotalCount"] == 2
    finally:
        code, stderr = await _stop(proc, signal.SIGTERM)
    assert code == 0
    assert TEST_SECRET_KEY.encode() not in stderr


# -- flags to SimConfig, without starting a process ------------------------------------------


def _config(*flags: str) -> SimConfig:
    args = build_parser().parse_args(["simulator", *flags])
    return build_config(args)


@pytest.fixture
def no_env_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TENCENTCLOUD_* variables: build_config falls back to the development pair."""
    monkeypatch.delenv("TENCENTCLOUD_SECRET_ID", raising=False)
    monkeypatch.delenv("TENCENTCLOUD_SECRET_KEY", raising=False)


def test_help_lists_delete_delay_and_list_lag(capsys: pytest.CaptureFixture[str]) -> None:
    """`cvm-backup simulator --help` documents --delete-delay and --list-lag."""
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["simulator", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--delete-delay SECONDS" in text
    assert "--list-lag SECONDS" in text


@pytest.mark.usefixtures("no_env_credentials")
def test_delete_delay_and_list_lag_flags_reach_sim_config() -> None:
    """--delete-delay and --list-lag set SimConfig.delete_delay / list_lag; default 0."""
    assert (_config().delete_delay, _config().list_lag) == (0.0, 0.0)
    config = _config("--delete-delay", "2.5", "--list-lag", "0.75")
    assert (config.delete_delay, config.list_lag) == (2.5, 0.75)
    assert config.credentials == {DEV_SECRET_ID: DEV_SECRET_KEY}


def test_flags_override_the_fleet_file_and_absent_flags_keep_it(tmp_path: Path) -> None:
    """The fleet file's delete_delay / list_lag stand unless a flag overrides them."""
    base = replace(make_sim_config(instances=1), delete_delay=4.0, list_lag=1.5)
    fleet = str(write_config(base, tmp_path / "fleet.json"))
    kept = _config("--fleet", fleet)
    assert (kept.delete_delay, kept.list_lag) == (4.0, 1.5)
    changed = _config("--fleet", fleet, "--delete-delay", "0", "--list-lag", "3")
    assert (changed.delete_delay, changed.list_lag) == (0.0, 3.0)


@pytest.mark.parametrize("flag", ["--delete-delay", "--list-lag"])
@pytest.mark.parametrize("value", ["-1", "inf", "nan", "soon"])
def test_bad_delay_flags_are_usage_errors(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Negative, infinite, NaN or non-numeric seconds are refused by the argument parser."""
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["simulator", flag, value])
    assert done.value.code == 2
    assert flag in capsys.readouterr().err
