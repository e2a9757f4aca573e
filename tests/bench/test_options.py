"""`cvm-backup bench` options: daemon settings beyond the defaults, checked like the config."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.cli import build_parser
from orchestrator.commands.bench import options_from
from orchestrator.errors import UsageError


def _options(*argv: str) -> Any:
    return options_from(build_parser().parse_args(["bench", *argv]))


def test_daemon_settings_reach_the_options() -> None:
    """Each --daemon-setting KEY=VALUE becomes a daemon setting; integers stay integers."""
    options = _options(
        "--daemon-setting", "limiter_jitter=0.005", "--daemon-setting", "max_in_flight=32"
    )
    assert options.daemon_settings == {"limiter_jitter": 0.005, "max_in_flight": 32}


def test_a_setting_the_daemon_would_refuse_is_refused_up_front() -> None:
    """A bad key or value is a usage error naming the flag, before any scenario runs."""
    refused = r"--daemon-setting: rate_margin: must be greater than 0 and at most 1"
    with pytest.raises(UsageError, match=refused):
        _options("--daemon-setting", "rate_margin=2")
    with pytest.raises(UsageError, match="bogus: unknown key"):
        _options("--daemon-setting", "bogus=1")


def test_a_malformed_setting_is_an_argument_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Not KEY=NUMBER: argparse exits 2 with the reason."""
    with pytest.raises(SystemExit) as exited:
        _options("--daemon-setting", "limiter_jitter")
    assert exited.value.code == 2
    assert "expected KEY=NUMBER" in capsys.readouterr().err
