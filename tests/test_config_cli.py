"""A bad config file stops each command that reads settings: exit 2, all problems, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import cli

BAD = 'max_in_flight = 128.0\n[retry]\nmax_delay = "long"\n[[accounts]]\nprofile = 7\n'
PROBLEMS = (
    "max_in_flight: expected an integer, got float 128.0",
    "retry.max_delay: expected a finite number, got string 'long'",
    "accounts[1].profile: expected a string, got integer 7",
)


def _clean_env(config: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CVM_BACKUP_", "TENCENTCLOUD_")) and k != "DATABASE_URL"
    }
    return {**env, "CVM_BACKUP_CONFIG": str(config)}


def test_check_exits_2_naming_file_field_and_reason(tmp_path: Path) -> None:
    """`cvm-backup check` on a bad config file exits 2, lists every problem, shows no traceback."""
    config = tmp_path / "cvm-backup.toml"
    config.write_text(BAD, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "check"],
        env=_clean_env(config),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("cvm-backup: error: ")
    assert lines == [f"cvm-backup: error: {config}: {PROBLEMS[0]}"] + [
        f"{config}: {problem}" for problem in PROBLEMS[1:]
    ]


@pytest.mark.parametrize(
    "argv",
    [["run", "--once"], ["migrate"], ["status"], ["backup-now", "p"], ["policy", "list"]],
)
def test_commands_that_read_settings_refuse_a_bad_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    """Each settings-reading command exits 2 on a bad config file before touching anything."""
    config = tmp_path / "cvm-backup.toml"
    config.write_text(BAD, encoding="utf-8")
    for name in ("CVM_BACKUP_DATABASE_URL", "DATABASE_URL", "CVM_BACKUP_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CVM_BACKUP_CONFIG", str(config))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert all(f"{config}: {problem}" in err for problem in PROBLEMS)
