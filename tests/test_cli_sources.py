"""Where the CLI gets its database and settings from, and what it refuses to create.

Each test runs the real command as a subprocess in a clean environment: a fresh HOME, a
CVM_BACKUP_HOME that does not exist, no DSN, no keys, and no proxy or metadata service.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from orchestrator import cli, config

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "config" / "policies.example.toml"
_DROPPED = ("CVM_BACKUP_", "TENCENTCLOUD_", "DATABASE_URL", "XDG_", "PG")
# Runs the real CLI with the system config path moved, as an operator's /etc would hold it.
_WITH_SYSTEM_CONFIG = (
    "import sys; from pathlib import Path; from orchestrator import cli, config; "
    "config.SYSTEM_CONFIG = Path(sys.argv[1]); raise SystemExit(cli.main(sys.argv[2:]))"
)


class Clean:
    """A clean environment under one temporary directory, and the CLI run in it."""

    def __init__(self, root: Path) -> None:
        self.user_home = root / "user"
        self.state = root / "state"  # CVM_BACKUP_HOME; must never appear uninvited
        self.cwd = root / "cwd"
        self.user_home.mkdir()
        self.cwd.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED)}
        env.update(
            HOME=str(self.user_home),
            CVM_BACKUP_HOME=str(self.state),
            # No metadata service answers here: the CVM-role link of the chain fails at once.
            CVM_BACKUP_METADATA_URL="http://127.0.0.1:9/",
        )
        self.env = env

    def run(
        self, *args: str, env: dict[str, str] | None = None, code: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`python -m orchestrator ARGS` (or `python -c CODE ARGS`), output captured."""
        head = ["-c", code] if code else ["-m", "orchestrator"]
        return subprocess.run(
            [sys.executable, *head, *args],
            env=env or self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def assert_nothing_created(self) -> None:
        """No home, nothing in HOME (no ~/.local/share), nothing in the working directory."""
        assert not self.state.exists()
        assert list(self.user_home.iterdir()) == []
        assert list(self.cwd.iterdir()) == []


def _postmasters(pgdata: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if str(pgdata) in (proc.info["cmdline"] or []) and proc.info["status"] != "zombie":
            found.append(proc)
    return found


@pytest.fixture
def clean(tmp_path: Path) -> Iterator[Clean]:
    """A clean environment; an embedded server a test made in it is stopped afterwards."""
    made = Clean(tmp_path)
    yield made
    pgdata = (made.state / "pgdata").resolve()
    deadline = time.monotonic() + 20
    while _postmasters(pgdata) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _postmasters(pgdata)
    for proc in left:  # only the server of this test's own data directory
        proc.kill()
    assert not left, "the embedded server outlived the commands that used it"


READ_ONLY = [
    ("status",),
    ("status", "--json"),
    ("policy", "list"),
    ("plan", "web-nightly"),
    ("account", "list"),
    ("account", "resume", "default"),
    ("backup-now", "web-nightly"),
    ("reconcile", "--dry-run"),
    ("run", "--once"),
    ("policy", "apply", str(POLICIES)),
]


@pytest.mark.parametrize("argv", READ_ONLY, ids=" ".join)
def test_commands_other_than_migrate_create_no_database(
    clean: Clean, argv: tuple[str, ...]
) -> None:
    """Without a database they exit 2 naming the pgdata path and `cvm-backup migrate`."""
    done = clean.run(*argv)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"no embedded database at {clean.state / 'pgdata'}" in done.stderr
    assert "cvm-backup migrate" in done.stderr
    assert "Traceback" not in done.stderr
    clean.assert_nothing_created()


def test_check_reports_the_missing_database_as_unhealthy(clean: Clean) -> None:
    """`check` keeps its 0/1 contract: exit 1, a FAIL line naming the path, nothing created."""
    done = clean.run("check")
    assert done.returncode == 1, done.stderr
    assert "database: FAIL: no database: " in done.stdout
    assert str(clean.state / "pgdata") in done.stdout
    clean.assert_nothing_created()


def test_migrate_creates_the_database_and_then_reads_work(clean: Clean) -> None:
    """`migrate` makes the embedded database; a later read-only command starts it again."""
    assert clean.run("migrate").returncode == 0
    assert (clean.state / "pgdata" / "PG_VERSION").is_file()
    done = clean.run("policy", "list")
    assert done.returncode == 0, done.stderr
    assert "no policies" in done.stdout


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_option_beats_the_variable_in_either_position(clean: Clean, tmp_path: Path) -> None:
    """--config (before or after the command) wins over CVM_BACKUP_CONFIG; its home is used."""
    chosen = tmp_path / "chosen-home"
    good = _write(tmp_path / "good.toml", f'home = "{chosen}"\n')
    bad = _write(tmp_path / "bad.toml", "max_in_flight = 0\n")
    env = {**clean.env, "CVM_BACKUP_CONFIG": str(bad)}
    env.pop("CVM_BACKUP_HOME")  # else the environment would beat the file's home
    for argv in (
        ("--config", str(good), "status"),
        ("status", "--config", str(good)),
        ("policy", "list", "--config", str(good)),
    ):
        done = clean.run(*argv, env=env)
        assert done.returncode == 2, done.stderr
        assert str(bad) not in done.stderr
        assert f"no embedded database at {chosen / 'pgdata'}" in done.stderr
        assert not chosen.exists()
    done = clean.run("status", env={**env, "CVM_BACKUP_CONFIG": str(good)})
    assert f"no embedded database at {chosen / 'pgdata'}" in done.stderr
    done = clean.run("--config", str(bad), "status", env={**env, "CVM_BACKUP_CONFIG": str(good)})
    assert f"{bad}: max_in_flight: must be greater than 0" in done.stderr


def test_config_option_errors_name_the_file_and_the_option(clean: Clean, tmp_path: Path) -> None:
    """A missing --config file, an empty path, and --config on a command that reads no config."""
    missing = tmp_path / "missing.toml"
    done = clean.run("status", "--config", str(missing))
    assert done.returncode == 2
    assert f"{missing}: config file not found (--config or CVM_BACKUP_CONFIG)" in done.stderr
    done = clean.run("status", "--config", "")
    assert done.returncode == 2
    assert "--config: expected a path to a TOML file" in done.stderr
    done = clean.run("--config", str(missing), "demo", "--fast")
    assert done.returncode == 2
    assert "`cvm-backup demo` reads no config file" in done.stderr
    clean.assert_nothing_created()


def test_system_config_is_read_when_nothing_names_another(clean: Clean, tmp_path: Path) -> None:
    """With neither --config nor CVM_BACKUP_CONFIG the system file is read, if it exists."""
    system_home = tmp_path / "system-home"
    system = _write(tmp_path / "etc.toml", f'home = "{system_home}"\n')
    env = dict(clean.env)
    env.pop("CVM_BACKUP_HOME")
    done = clean.run(str(system), "status", env=env, code=_WITH_SYSTEM_CONFIG)
    assert done.returncode == 2, done.stderr
    assert f"no embedded database at {system_home / 'pgdata'}" in done.stderr
    other = _write(tmp_path / "other.toml", "max_in_flight = 0\n")
    done = clean.run(
        str(system), "status", "--config", str(other), env=env, code=_WITH_SYSTEM_CONFIG
    )
    assert f"{other}: max_in_flight" in done.stderr
    absent = tmp_path / "absent.toml"
    done = clean.run(str(absent), "status", code=_WITH_SYSTEM_CONFIG)
    assert f"no embedded database at {clean.state / 'pgdata'}" in done.stderr
    assert not system_home.exists()
    clean.assert_nothing_created()


def test_default_home_without_cvm_backup_home(clean: Clean, tmp_path: Path) -> None:
    """Unset CVM_BACKUP_HOME: /var/lib/cvm-backup as root, else $XDG_DATA_HOME/cvm-backup."""
    env = dict(clean.env)
    env.pop("CVM_BACKUP_HOME")
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    if os.geteuid() == 0:
        expected = config.ROOT_HOME
        if expected.exists():
            pytest.skip(f"{expected} exists on this machine: the command would use it")
    else:
        expected = tmp_path / "xdg" / "cvm-backup"
    done = clean.run("status", env=env)
    assert done.returncode == 2, done.stderr
    assert f"no embedded database at {expected / 'pgdata'}" in done.stderr
    assert not expected.exists()
    clean.assert_nothing_created()


@pytest.mark.parametrize(
    ("env", "euid", "expected"),
    [
        ({"XDG_DATA_HOME": "/data/x", "HOME": "/home/u"}, 0, "/var/lib/cvm-backup"),
        ({"XDG_DATA_HOME": "/data/x", "HOME": "/home/u"}, 1000, "/data/x/cvm-backup"),
        ({"XDG_DATA_HOME": "relative", "HOME": "/home/u"}, 1000, "/home/u/.local/share/cvm-backup"),
        ({"HOME": "/home/u"}, 1000, "/home/u/.local/share/cvm-backup"),
    ],
    ids=["root", "xdg", "relative-xdg-ignored", "no-xdg"],
)
def test_default_home_rules(env: dict[str, str], euid: int, expected: str) -> None:
    """The default home follows the user: root's state directory, XDG, then ~/.local/share."""
    assert config.default_home(env, euid=euid) == Path(expected)


@pytest.mark.parametrize("euid", [0, 1000], ids=["root", "user"])
def test_an_old_default_home_with_a_database_stays_the_home(tmp_path: Path, euid: int) -> None:
    """After an upgrade, ~/.local/share/cvm-backup with a database beats a new, empty default."""
    legacy = tmp_path / "user" / ".local" / "share" / "cvm-backup"
    xdg = tmp_path / "xdg"
    env = {"HOME": str(tmp_path / "user"), "XDG_DATA_HOME": str(xdg)}
    new = config.ROOT_HOME if euid == 0 else xdg / "cvm-backup"
    if euid == 0 and (new / "pgdata").exists():
        pytest.skip(f"{new} holds a database on this machine")
    assert config.default_home(env, euid=euid) == new
    (legacy / "pgdata").mkdir(parents=True)
    assert config.default_home(env, euid=euid) == new  # an empty pgdata is no database
    (legacy / "pgdata" / "PG_VERSION").write_text("18\n")
    assert config.default_home(env, euid=euid) == legacy
    if euid != 0:  # (root's new default is a real path this test must not create)
        (new / "pgdata").mkdir(parents=True)
        (new / "pgdata" / "PG_VERSION").write_text("18\n")
        assert config.default_home(env, euid=euid) == new


# ------------------------------------------------------------------------------ --help


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command path and its parser (argparse has no public walk over subparsers)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = [path for path, _ in _commands(cli.build_parser()) if path]
# Commands that load the settings, so read the config file and the database variables.
SETTINGS_READERS = {path for path in COMMANDS if path[0] not in {"demo", "simulator", "bench"}}


def test_the_walk_finds_every_command() -> None:
    """The help test below covers the commands of the README's table, nested ones too."""
    names = {" ".join(path) for path in COMMANDS}
    assert {"run", "migrate", "check", "status", "policy apply", "account resume"} <= names
    assert names == set(cli.ENVIRONMENT) - {""}


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_help_has_a_description_and_its_environment(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--help`: a description under the usage, and an environment list of known variables."""
    with pytest.raises(SystemExit) as exited:
        cli.main([*path, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    usage, _, rest = text.partition("\n\n")
    description = rest.split("\n\n", 1)[0]
    assert description.strip(), text
    assert not description.startswith(("positional", "options")), text
    assert "\nenvironment:\n" in text
    listed = [
        line.split()[0]
        for line in text.split("\nenvironment:\n", 1)[1].splitlines()
        if line.startswith("  ") and not line.startswith("   ")
    ]
    assert listed, text
    assert set(listed) <= set(cli.VARIABLES), listed
    if path in SETTINGS_READERS:
        assert {"CVM_BACKUP_CONFIG", "CVM_BACKUP_DATABASE_URL", "CVM_BACKUP_HOME"} <= set(listed)
        assert "--config PATH" in usage or "--config PATH" in text


def _source_outside_the_cli() -> str:
    readers = [p for p in (ROOT / "orchestrator").rglob("*.py") if p.name != "cli.py"]
    return "\n".join(p.read_text(encoding="utf-8") for p in readers)


def test_every_variable_in_the_help_is_read_by_the_code() -> None:
    """No help names a variable the code never reads (a typo, or one since removed)."""
    source = _source_outside_the_cli()
    unread = [name for name in cli.VARIABLES if f'"{name}"' not in source]
    assert not unread


def test_every_variable_the_code_reads_is_in_the_help() -> None:
    """A new CVM_BACKUP_*, TENCENTCLOUD_* or TKE_* variable in the code is named by --help."""
    named = set(
        re.findall(r'"((?:CVM_BACKUP|TENCENTCLOUD|TKE)_[A-Z_]+)"', _source_outside_the_cli())
    )
    assert named - set(cli.VARIABLES) == set()
