"""Settings precedence and validation, and the shipped example config files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import config
from orchestrator.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_without_file_or_env() -> None:
    """With nothing set, the published limits and the default endpoint apply."""
    settings = config.load({})
    assert settings.endpoint == config.DEFAULT_ENDPOINT
    assert settings.limits["CreateImage"] == 10
    assert settings.database_url is None


def test_example_config_loads() -> None:
    """The shipped example daemon config is valid."""
    env = {"CVM_BACKUP_CONFIG": str(ROOT / "config" / "cvm-backup.example.toml")}
    settings = config.load(env)
    assert settings.retry.busy_base == 15.0
    assert [a.name for a in settings.accounts] == ["default"]


def test_environment_beats_file(tmp_path: Path) -> None:
    """An environment variable overrides the same setting in the file."""
    path = tmp_path / "c.toml"
    path.write_text('endpoint = "http://127.0.0.1:1"\n[limits]\nCreateImage = 5\n')
    settings = config.load({"CVM_BACKUP_CONFIG": str(path), "CVM_BACKUP_ENDPOINT": "http://x:2"})
    assert settings.endpoint == "http://x:2"
    assert settings.limits["CreateImage"] == 5
    assert settings.limits["DescribeImages"] == 40


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("bogus = 1\n", "bogus"),
        ("[retry]\nnope = 2\n", "nope"),
        ("[limits]\nCreateImage = 0\n", "limits.CreateImage"),
        ('log_format = "xml"\n', "log_format"),
        ("this is = not toml =\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    """A bad config file is refused with a message naming the file and the field."""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        config.load({"CVM_BACKUP_CONFIG": str(path)})
    assert needle in str(info.value)


def test_cam_policy_names_exactly_the_actions_used() -> None:
    """The least-privilege CAM policy grants exactly the rate-limited API actions we call."""
    doc = json.loads((ROOT / "config" / "cam-policy.json").read_text())
    actions = {a.removeprefix("cvm:") for s in doc["statement"] for a in s["action"]}
    assert actions == set(config.DEFAULT_LIMITS)
