"""Hostile and careless input through the real CLI: exit 2, a message naming where, what and
why, no traceback, nothing changed in the database, and no secret in any output."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fixtures.pg import run_sql

SECRET_ID = "AKIDhostileSECRETid0123456789abcdef"
SECRET_KEY = "hostileSECRETkey0123456789abcdefg"
DSN_PASSWORD = "PWha#sh1"
TABLES = ("policies", "runs", "jobs", "images", "events", "account_pauses")

GOOD_POLICY = """
[[policies]]
name = "{name}"
region = "ap-guangzhou"
schedule = "0 3 * * *"
instance_ids = ["ins-aaaaaaa1"]
{extra}
[policies.retention]
keep_last = 3
{retention}
"""


def policy(extra: str = "", retention: str = "", name: str = "hostile") -> str:
    """A valid policy file with `extra` policy fields and `retention` rules added."""
    return GOOD_POLICY.format(name=name, extra=extra, retention=retention)


@dataclass(frozen=True)
class Case:
    """One hostile input: what is written where, what the CLI runs, what stderr must say."""

    id: str
    expect: tuple[str, ...]
    policy_file: str | bytes | None = None
    config_file: str | bytes | None = None
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ("policy", "apply", "{policy}")
    # Fragments that must appear in no output (beyond the secrets every case checks).
    never: tuple[str, ...] = ()
    code: int = 2
    # The Tencent credentials file ($HOME/.tencentcloud/credentials); with one, the keys are
    # not in the environment, so the chain has to read it.
    credentials_file: bytes | None = None


def _p(id: str, text: str | bytes, *expect: str, args: tuple[str, ...] | None = None) -> Case:
    return Case(id, ("{policy}", *expect), policy_file=text, args=args or Case.args)


def _c(id: str, text: str | bytes, *expect: str, never: tuple[str, ...] = ()) -> Case:
    return Case(id, ("{config}", *expect), policy_file=policy(), config_file=text, never=never)


def _e(id: str, name: str, value: str, *expect: str, never: tuple[str, ...] = ()) -> Case:
    return Case(id, (name, *expect), policy_file=policy(), env={name: value}, never=never)


DEEP_ARRAY = "a = " + "[" * 5000 + "]" * 5000 + "\n"
DEEP_TABLE = "a = " + "{ b = " * 3000 + "1" + " }" * 3000 + "\n"
HUGE_NAME = "x" * 5_000_000

CASES = [
    # ---- policy files
    _p("binary", os.urandom(64) + b"\xff\xfe", "not UTF-8"),
    _p("latin-1", policy().replace("hostile", "caf\xe9").encode("latin-1"), "not UTF-8"),
    _p("nul-byte", policy().encode() + b"\x00", "NUL"),
    _p("deep-array", DEEP_ARRAY, "nested too deeply"),
    _p("deep-table", DEEP_TABLE, "nested too deeply"),
    _p("5000-digits", "x = " + "9" * 5000 + "\n", "number is too long"),
    _p(
        "window-20-digits",
        policy('completion_window = "99999999999999999999d"'),
        "completion_window",
    ),
    _p(
        "window-3000000d",
        policy('completion_window = "3000000d"'),
        "completion_window",
        "at most",
    ),
    _p("window-unicode-digits", policy('completion_window = "\u0663h"'), "completion_window"),
    _p(
        "max-age-1000000",
        policy(retention="max_age_days = 1000000"),
        "retention.max_age_days",
        "36500",
    ),
    _p("keep-2-31", policy(retention="keep_daily = 2147483648"), "retention.keep_daily", "10000"),
    _p(
        "keep-2-64", policy(retention="keep_weekly = 18446744073709551616"), "retention.keep_weekly"
    ),
    _p("keep-float", policy(retention="keep_monthly = 1.5"), "retention.keep_monthly", "integer"),
    _p("keep-bool", policy(retention="keep_yearly = true"), "retention.keep_yearly", "integer"),
    _p("tag-nul", policy('instance_tags = { team = "a\\u0000b" }'), "instance_tags", "control"),
    _p(
        "tag-esc", policy('instance_tags = { team = "\\u001b[31mred" }'), "instance_tags", "control"
    ),
    _p("tag-cr-key", policy('instance_tags = { "te\\ram" = "x" }'), "instance_tags", "control"),
    _p("tag-key-128", policy(f'instance_tags = {{ {"k" * 128} = "x" }}'), "instance_tags", "127"),
    _p(
        "tag-value-256",
        policy(f'instance_tags = {{ team = "{"v" * 256}" }}'),
        "instance_tags",
        "255",
    ),
    _p("name-newline", policy(name="hostile\\n"), "name", "lowercase letters"),
    _p("region-newline", policy().replace('"ap-guangzhou"', '"ap-guangzhou\\n"'), "region"),
    _p("instance-newline", policy().replace('"ins-aaaaaaa1"', '"ins-aaaaaaa1\\n"'), "instance_ids"),
    _p("account-newline", policy('account = "default\\n"'), "account"),
    _p("account-unknown", policy('account = "elsewhere"'), "account", "not configured"),
    _p(
        "schedule-10k",
        policy().replace('"0 3 * * *"', '"0 3 * * *' + " " * 10000 + '"'),
        "schedule",
    ),
    _p("huge-name", policy(name=HUGE_NAME), "name", "..."),
    _p("not-a-table", "policies = 5\n", "policies", "expected [[policies]]"),
    Case(
        "prune-empty",
        ("{policy}", "--prune", "--yes"),
        policy_file="policies = []\n",
        args=("policy", "apply", "{policy}", "--prune"),
    ),
    Case(
        "dry-run-too",
        ("{policy}", "retention.keep_last"),
        args=("policy", "apply", "{policy}", "--dry-run"),
        policy_file=policy().replace("keep_last = 3", "keep_last = 99999"),
    ),
    Case("missing-file", ("{policy}", "cannot read"), args=("policy", "apply", "{policy}.gone")),
    Case("directory", ("cannot read",), args=("policy", "apply", "/")),
    # ---- config files
    _c("config-binary", b"\xff\xfe\x00\x01", "not UTF-8"),
    _c("config-deep", DEEP_ARRAY, "nested too deeply"),
    _c("config-digits", "max_in_flight = " + "9" * 5000 + "\n", "number is too long"),
    _c("max-in-flight-2-63", "max_in_flight = 9223372036854775807\n", "max_in_flight", "at most"),
    _c("lease-1e308", "lease_seconds = 1e308\n", "lease_seconds", "at most 3600"),
    _c("lease-inf", "lease_seconds = inf\n", "lease_seconds", "finite"),
    _c("metrics-port", 'metrics_address = "127.0.0.1:99999"\n', "metrics_address", "host:port"),
    _c("timeout-over-lease", "request_timeout = 40\nlease_seconds = 60\n", "request_timeout"),
    _c("limit-huge", "[limits]\nCreateImage = 10000000\n", "limits.CreateImage", "1000000"),
    _c("retry-huge", "[retry]\nmax_delay = 1e300\n", "retry.max_delay", "at most"),
    _c(
        "profile-pasted-key",
        f'[[accounts]]\nprofile = "[{SECRET_KEY}]"\n',
        "accounts[1].profile",
        never=(SECRET_KEY[4:20],),
    ),
    _c("home-is-file", 'home = "{file}"\n', "home", "is a file"),
    _c("config-endpoint-http", 'endpoint = "http://10.0.0.1"\n', "endpoint", "loopback"),
    Case(
        "config-is-dir",
        ("CVM_BACKUP_CONFIG", "cannot read"),
        policy_file=policy(),
        env={"CVM_BACKUP_CONFIG": "/"},
    ),
    # ---- environment
    _e("endpoint-plain-http", "CVM_BACKUP_ENDPOINT", "http://10.0.0.1", "endpoint", "loopback"),
    _e("endpoint-port-big", "CVM_BACKUP_ENDPOINT", "https://cvm.tencentcloudapi.com:99999", "port"),
    _e("endpoint-port-abc", "CVM_BACKUP_ENDPOINT", "https://cvm.tencentcloudapi.com:abc", "port"),
    _e(
        "endpoint-userinfo",
        "CVM_BACKUP_ENDPOINT",
        "https://u:topsecretpw@x.example",
        "user",
        never=("topsecretpw",),
    ),
    _e("home-file", "CVM_BACKUP_HOME", "{file}", "home", "is a file"),
    _e("home-under-file", "CVM_BACKUP_HOME", "{file}/sub", "home", "{file}"),
    _e("log-format", "CVM_BACKUP_LOG_FORMAT", "xml", "log_format", "json"),
    _e("deployment-newline", "CVM_BACKUP_DEPLOYMENT", "prod\n", "deployment"),
    _e(
        "dsn-hash",
        "CVM_BACKUP_DATABASE_URL",
        f"postgresql://admin:{DSN_PASSWORD}@127.0.0.1:1/db",
        "database_url",
        never=("PWha", "sh1"),
    ),
    _e(
        "dsn-slash",
        "CVM_BACKUP_DATABASE_URL",
        "postgresql://admin:pw/sec?ret@127.0.0.1/db",
        "database_url",
        never=("sec?ret", "pw/sec"),
    ),
    _e(
        "dsn-port",
        "CVM_BACKUP_DATABASE_URL",
        "postgresql://admin:s3cr3tpw@127.0.0.1:99999/db",
        "database_url",
        "port",
        never=("s3cr3tpw",),
    ),
    _e(
        "dsn-sslmode",
        "CVM_BACKUP_DATABASE_URL",
        "postgresql://admin:s3cr3tpw@127.0.0.1/db?sslmode=bogus",
        "database_url",
        "sslmode",
        never=("s3cr3tpw",),
    ),
    _e(
        "dsn-scheme",
        "CVM_BACKUP_DATABASE_URL",
        "mysql://root:s3cr3tpw@h/db",
        "database_url",
        never=("s3cr3tpw",),
    ),
    # ---- command-line arguments
    Case("backup-now-newline", ("backup-now", "no policy named"), args=("backup-now", "hostile\n")),
    Case("backup-now-unknown", ("nosuch",), args=("backup-now", "nosuch")),
    # ---- credentials files
    Case(
        "credentials-latin-1",
        ("{home}/.tencentcloud/credentials", "not UTF-8"),
        args=("check",),
        credentials_file=f"[default]\nsecret_id = caf\xe9\nsecret_key = {SECRET_KEY}\n".encode(
            "latin-1"
        ),
    ),
    Case(
        "credentials-binary",
        ("{home}/.tencentcloud/credentials", "not a valid INI file"),
        args=("check",),
        credentials_file=b"\x00\x01binary[[[\n=\n",
    ),
    Case(
        "credentials-pasted-profile",
        ("credentials[default]", "no ["),
        args=("check",),
        config_file=f'[[accounts]]\nprofile = "{SECRET_KEY}"\n',
        credentials_file=b"[default]\nsecret_id = a\nsecret_key = b\n",
        never=(SECRET_KEY[4:-4],),
        # Not malformed, only missing: `check` reports an unhealthy account.
        code=1,
    ),
]


def _snapshot(dsn: str) -> dict[str, str]:
    """A digest of every table's rows: equal digests mean nothing changed."""
    return {
        table: run_sql(
            dsn,
            f"SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) AS d"
            f" FROM {table} t",
        )[0]["d"]
        for table in TABLES
    }


@pytest.fixture(scope="module")
def seeded(
    pg_admin_dsn: str, pg_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One database for the whole table, holding a policy applied the normal way."""
    from tests.fixtures.pg import _database

    maker = _database(pg_admin_dsn, pg_template)
    dsn = next(maker)
    root = tmp_path_factory.mktemp("hostile-seed")
    path = root / "seed.toml"
    path.write_text(policy(name="seeded"))
    done = _cli(("policy", "apply", str(path)), _env(dsn, root / "home"))
    assert done.returncode == 0, done.stderr
    yield dsn
    next(maker, None)


def _env(dsn: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CVM_BACKUP_", "TENCENT"))}
    env.pop("DATABASE_URL", None)
    env.update(
        CVM_BACKUP_DATABASE_URL=dsn,
        CVM_BACKUP_HOME=str(home),
        TENCENTCLOUD_SECRET_ID=SECRET_ID,
        TENCENTCLOUD_SECRET_KEY=SECRET_KEY,
    )
    return {**env, **extra}


def _cli(args: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "orchestrator", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


def _write(path: Path, content: str | bytes | None) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")


def _run(case: Case, dsn: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    files = _files(tmp_path)
    files["{file}"].write_text("a plain file\n")
    _write(files["{policy}"], case.policy_file)
    config_file = case.config_file
    _write(
        files["{config}"],
        _fill(config_file, files) if isinstance(config_file, str) else config_file,
    )
    extra = {"CVM_BACKUP_CONFIG": str(files["{config}"])} if case.config_file is not None else {}
    env = _env(dsn, tmp_path / "home", **extra, **case.env)
    if case.credentials_file is not None:
        (tmp_path / ".tencentcloud").mkdir()
        (tmp_path / ".tencentcloud" / "credentials").write_bytes(case.credentials_file)
        env["HOME"] = str(tmp_path)
        # No metadata service on loopback answers: the CVM role link fails at once.
        env["CVM_BACKUP_METADATA_URL"] = "http://127.0.0.1:9/"
        for name in ("TENCENTCLOUD_SECRET_ID", "TENCENTCLOUD_SECRET_KEY"):
            env.pop(name)
    for key, value in env.items():
        env[key] = _fill(value, files)
    return _cli(tuple(_fill(arg, files) for arg in case.args), env)


def _files(tmp_path: Path) -> dict[str, Path]:
    return {
        "{policy}": tmp_path / "policies.toml",
        "{config}": tmp_path / "config.toml",
        "{file}": tmp_path / "plain-file",
        "{home}": tmp_path,
    }


def _fill(text: str, files: dict[str, Path]) -> str:
    for marker, path in files.items():
        text = text.replace(marker, str(path))
    return text


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_exits_2_with_a_clear_message(
    case: Case, seeded: str, tmp_path: Path
) -> None:
    """Exit 2 naming where, what and why; no traceback, no change, no secret shown."""
    before = _snapshot(seeded)
    done = _run(case, seeded, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == case.code, output[:2000]
    assert "Traceback" not in output, output[:4000]
    files = _files(tmp_path)
    for expected in case.expect:
        assert _fill(expected, files) in output, output[:2000]
    for secret in (SECRET_ID, SECRET_KEY, SECRET_KEY[:12], DSN_PASSWORD, *case.never):
        assert secret not in output
    assert len(output) < 20_000, "an error message quoted a huge input whole"
    assert _snapshot(seeded) == before


def test_the_table_is_large_enough() -> None:
    """The acceptance asks for at least forty hostile inputs."""
    assert len(CASES) >= 40
