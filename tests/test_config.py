"""Settings precedence and validation, and the shipped example config files."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import pytest

from orchestrator import config
from orchestrator.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def _problems(tmp_path: Path, text: str, **env: str) -> list[str]:
    """The messages of the UsageError that loading `text` as the config file raises."""
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as info:
        config.load({"CVM_BACKUP_CONFIG": str(path), **env})
    assert str(info.value) == "\n".join(info.value.messages)
    return info.value.messages


def _load_text(tmp_path: Path, text: str) -> config.Settings:
    path = tmp_path / "good.toml"
    path.write_text(text, encoding="utf-8")
    return config.load({"CVM_BACKUP_CONFIG": str(path)})


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    return repr(value)


def _toml_table(values: Mapping[str, object]) -> str:
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items() if v is not None)


# Fields written as their own TOML tables, not as scalars.
_SECTIONS = {"limits", "retry", "accounts", "notify"}


def _as_toml(settings: config.Settings) -> str:
    """A config file that sets every field of `settings` explicitly."""
    scalars = {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if f.name not in _SECTIONS
    }
    text = _toml_table(scalars) + "[limits]\n" + _toml_table(settings.limits)
    text += "[retry]\n" + _toml_table(dataclasses.asdict(settings.retry))
    for account in settings.accounts:
        text += "[[accounts]]\n" + _toml_table(dataclasses.asdict(account))
    for target in settings.notify:
        text += "[[notify]]\n" + _toml_table(dataclasses.asdict(target))
    return text


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
    settings = config.load({"CVM_BACKUP_CONFIG": str(path), "CVM_BACKUP_ENDPOINT": "https://x:2"})
    assert settings.endpoint == "https://x:2"
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


def test_every_field_round_trips_through_a_file(tmp_path: Path) -> None:
    """A file that sets every field (of every section) to a valid value loads to exactly that."""
    wanted = config.Settings(
        database_url="postgresql://u@127.0.0.1:5432/db",
        home=tmp_path / "home",
        endpoint="http://127.0.0.1:9000",
        limits={**config.DEFAULT_LIMITS, "CreateImage": 3},
        rate_margin=1.0,
        limiter_jitter=0.0,
        request_timeout=7.5,
        max_in_flight=3,
        lease_seconds=16.0,
        poll_interval=0.25,
        tracker_min_interval=1.0,
        tracker_max_interval=1.0,
        shutdown_grace=0.0,
        delete_binded_snap=False,
        log_format="json",
        log_level="warning",
        metrics_address="[::1]:0",
        retry=config.RetrySettings(2.0, 3.0, 3.0, 1, 0.5),
        accounts=(
            config.AccountSettings(name="a", secret_id_env="A_ID", profile="p"),
            config.AccountSettings(name="b.2", cvm_role="role"),
        ),
    )
    assert _load_text(tmp_path, _as_toml(wanted)) == wanted


def test_defaults_written_out_load_back_unchanged(tmp_path: Path) -> None:
    """The built-in defaults pass every check the file gets."""
    assert _load_text(tmp_path, _as_toml(config.Settings())) == config.Settings()


def test_numbers_are_typed_from_the_annotations(tmp_path: Path) -> None:
    """A float field accepts an integer (as a float); a path field takes a string, ~ expanded."""
    settings = _load_text(
        tmp_path, 'request_timeout = 5\nhome = "~/cvm"\n[retry]\nmax_delay = 60\n'
    )
    assert settings.request_timeout == 5.0
    assert isinstance(settings.request_timeout, float)
    assert isinstance(settings.retry.max_delay, float)
    assert settings.home == Path("~/cvm").expanduser()


_SCALARS = [
    (cls, f.name)
    for cls in (config.Settings, config.RetrySettings, config.AccountSettings)
    for f in dataclasses.fields(cls)
    if f.name not in _SECTIONS
]


@pytest.mark.parametrize(("cls", "name"), _SCALARS, ids=[f"{c.__name__}.{n}" for c, n in _SCALARS])
def test_every_field_rejects_a_value_of_the_wrong_type(
    tmp_path: Path, cls: type, name: str
) -> None:
    """Each field of each section is type-checked: a table where a scalar belongs is refused."""
    section, field = {
        config.Settings: ("", name),
        config.RetrySettings: ("[retry]\n", f"retry.{name}"),
        config.AccountSettings: ("[[accounts]]\n", f"accounts[1].{name}"),
    }[cls]
    text = f"{section}{name} = {{ a = 1 }}\n"
    assert _problems(tmp_path, text) == [
        f"{tmp_path / 'bad.toml'}: {field}: {_expected(cls, name)}"
    ]


def _expected(cls: type, name: str) -> str:
    hint = str(cls.__annotations__[name])
    kind = {
        "bool": "expected true or false",
        "int": "expected an integer",
        "float": "expected a finite number",
        "Path": "expected a non-empty path string",
    }.get(hint, "expected a string")
    return f"{kind}, got a table"


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ("max_in_flight = 128.0\n", "max_in_flight", "expected an integer, got float 128.0"),
        ('max_in_flight = "lots"\n', "max_in_flight", "expected an integer, got string 'lots'"),
        ("max_in_flight = true\n", "max_in_flight", "expected an integer, got boolean True"),
        ("max_in_flight = 0\n", "max_in_flight", "must be greater than 0 and at most 10000, not 0"),
        ("max_in_flight = 9223372036854775807\n", "max_in_flight", "at most 10000"),
        (
            "lease_seconds = -5\n",
            "lease_seconds",
            "must be greater than 0 and at most 3600, not -5.0",
        ),
        ("lease_seconds = 1e308\n", "lease_seconds", "at most 3600, not 1e+308"),
        ("request_timeout = 1e9\n", "request_timeout", "at most 300"),
        ("reconcile_interval = 1e12\n", "reconcile_interval", "at most 604800"),
        (
            "[retry]\nmax_transient_attempts = 100000\n",
            "retry.max_transient_attempts",
            "at most 1000",
        ),
        ("[limits]\nCreateImage = 10000000\n", "limits.CreateImage", "from 1 to 1000000"),
        ('metrics_address = "127.0.0.1:99999"\n', "metrics_address", "must be host:port"),
        ('home = "/etc/passwd"\n', "home", "must be a directory; it is a file"),
        ('home = "/etc/passwd/sub"\n', "home", "must be a directory; /etc/passwd is a file"),
        ('home = "/tmp/a\\u0000b"\n', "home", "cannot be examined"),
        ("poll_interval = 0\n", "poll_interval", "must be greater than 0"),
        ("request_timeout = nan\n", "request_timeout", "expected a finite number, got float nan"),
        ("request_timeout = inf\n", "request_timeout", "expected a finite number"),
        ("shutdown_grace = -1\n", "shutdown_grace", "must be 0 to 3600"),
        ("limiter_jitter = -0.1\n", "limiter_jitter", "must be 0 to 1"),
        ("rate_margin = 0\n", "rate_margin", "must be greater than 0 and at most 1"),
        ("rate_margin = 1.5\n", "rate_margin", "must be greater than 0 and at most 1"),
        ('delete_binded_snap = "yes"\n', "delete_binded_snap", "expected true or false"),
        ('log_format = "xml"\n', "log_format", "must be auto, json or console, not 'xml'"),
        ('log_level = "loud"\n', "log_level", "must be one of debug, info, warning"),
        ('metrics_address = "nowhere"\n', "metrics_address", "must be host:port"),
        ('metrics_address = "h:99999"\n', "metrics_address", "must be host:port"),
        ('metrics_address = ":9108"\n', "metrics_address", "must be host:port"),
        ('endpoint = "ftp://x"\n', "endpoint", "must be a full URL"),
        ('endpoint = "https://h/path"\n', "endpoint", "must have no path"),
        ('home = ""\n', "home", "expected a non-empty path string"),
        ("bogus = 1\n", "bogus", "unknown key; expected one of accounts, database_url"),
        ("[retry]\nmax_transient_attempts = 0\n", "retry.max_transient_attempts", "greater"),
        (
            "[retry]\ntransient_base = 301\n",
            "retry.transient_base",
            "must not exceed retry.max_delay",
        ),
        ("[retry]\nthrottle_delay = 0\n", "retry.throttle_delay", "must be greater than 0"),
        ("[retry]\nnope = 2\n", "retry.nope", "unknown key; expected one of busy_base"),
        ("retry = 5\n", "retry", "expected a [retry] table, got integer 5"),
        ("tracker_min_interval = 31\n", "tracker_min_interval", "must not exceed tracker_max"),
        (
            "request_timeout = 30\nlease_seconds = 30\n",
            "request_timeout",
            "must not exceed 1/2 of lease_seconds (30.0 > 15)",
        ),
        ("lease_seconds = 30\n", "request_timeout", "must not exceed 1/2 of lease_seconds"),
        ("limits = [1]\n", "limits", "expected a [limits] table, got an array"),
        ("[limits]\nCreateImage = 0\n", "limits.CreateImage", "must be an integer from 1 to"),
        ("[limits]\nCreateImage = 2.5\n", "limits.CreateImage", "not float 2.5"),
        ("[limits]\nCreateImage = true\n", "limits.CreateImage", "not boolean True"),
        ("[limits]\nCreateImages = 3\n", "limits.CreateImages", "unknown action"),
        ("accounts = []\n", "accounts", "expected one or more [[accounts]] tables, got none"),
        ('accounts = "x"\n', "accounts", "expected one or more [[accounts]] tables"),
        ("accounts = [1]\n", "accounts[1]", "expected an [[accounts]] table, got integer 1"),
        ("[[accounts]]\nprofile = 7\n", "accounts[1].profile", "expected a string"),
        ('[[accounts]]\nprofile = " "\n', "accounts[1].profile", "must not be empty"),
        ('[[accounts]]\ncvm_role = ""\n', "accounts[1].cvm_role", "must not be empty"),
        ('[[accounts]]\nname = ""\n', "accounts[1].name", "must be 1-64 letters"),
        ('[[accounts]]\nname = "a b"\n', "accounts[1].name", "must be 1-64 letters"),
        ('[[accounts]]\nsecret_key_env = "X-1"\n', "accounts[1].secret_key_env", "variable"),
        ("[[accounts]]\nsecret = 1\n", "accounts[1].secret", "unknown key"),
        (
            '[[accounts]]\nname = "p"\n[[accounts]]\nname = "p"\n',
            "accounts[2].name",
            "duplicate; accounts[1] is already named 'p'",
        ),
        ("[[accounts]]\n[[accounts]]\n", "accounts[2].name", "already named 'default'"),
    ],
)
def test_each_bad_value_names_file_field_and_reason(
    tmp_path: Path, text: str, field: str, reason: str
) -> None:
    """A bad value is refused with one message: the file, the field (with section), the reason."""
    (message,) = _problems(tmp_path, text)
    prefix = f"{tmp_path / 'bad.toml'}: {field}: "
    assert message.startswith(prefix), message
    assert reason in message.removeprefix(prefix)


def test_all_problems_of_a_file_are_reported_at_once(tmp_path: Path) -> None:
    """Every bad field of every section is listed in one error, in file order."""
    text = (
        "max_in_flight = 128.0\nlease_seconds = -5\npoll_interval = 0\n"
        'delete_binded_snap = "yes"\n[retry]\nmax_transient_attempts = 0\nbusy_base = 400.0\n'
        '[[accounts]]\nname = "a"\nprofile = 7\n[[accounts]]\nname = "a"\n'
    )
    fields = [m.split(": ")[1] for m in _problems(tmp_path, text)]
    assert fields == [
        "max_in_flight",
        "lease_seconds",
        "poll_interval",
        "delete_binded_snap",
        "retry.max_transient_attempts",
        "accounts[1].profile",
        "accounts[2].name",
        "retry.busy_base",
    ]


def test_an_order_check_waits_for_both_values_to_be_good(tmp_path: Path) -> None:
    """A min/max pair is not compared while one of them is already reported as bad."""
    messages = _problems(tmp_path, 'tracker_min_interval = 99\ntracker_max_interval = "x"\n')
    assert [m.split(": ")[1] for m in messages] == ["tracker_max_interval"]


def test_a_bad_account_name_is_not_also_called_a_duplicate(tmp_path: Path) -> None:
    """An account whose name is already refused does not count as a second 'default'."""
    messages = _problems(tmp_path, "[[accounts]]\n[[accounts]]\nname = 5\n")
    assert [m.split(": ")[1] for m in messages] == ["accounts[2].name"]


def test_environment_problems_name_the_variable(tmp_path: Path) -> None:
    """A bad environment value names its variable; the file's own problems are listed too."""
    messages = _problems(
        tmp_path, "poll_interval = 0\n", CVM_BACKUP_LOG_FORMAT="xml", CVM_BACKUP_ENDPOINT="x"
    )
    assert messages[1:] == [
        "environment CVM_BACKUP_ENDPOINT: endpoint: 'x': must be a full URL like "
        f"{config.DEFAULT_ENDPOINT}",
        "environment CVM_BACKUP_LOG_FORMAT: log_format: must be auto, json or console, not 'xml'",
    ]
    assert messages[0].endswith(": poll_interval: must be greater than 0 and at most 3600, not 0.0")


def test_environment_alone_is_checked() -> None:
    """Without a config file, bad environment values are still refused."""
    with pytest.raises(UsageError) as info:
        config.load({"DATABASE_URL": "mysql://u:pw@h/db"})
    assert info.value.messages == [
        "environment DATABASE_URL: database_url: must be a postgresql:// URL "
        "(the value is not shown: it may hold a password)"
    ]


@pytest.mark.parametrize(
    ("text", "env"),
    [
        ('database_url = "mysql://admin:hunter2@db/x"\n', {}),
        ("", {"CVM_BACKUP_DATABASE_URL": "hunter2://admin:hunter2@db/x"}),
        ('endpoint = "https://admin:hunter2@cvm.example"\n', {}),
        ('[[accounts]]\nsecret_key_env = "hunter2/+x="\n', {}),
    ],
)
def test_refused_urls_never_echo_a_password(tmp_path: Path, text: str, env: dict[str, str]) -> None:
    """A refused DSN, endpoint or key variable is named, but not its value (maybe a secret)."""
    messages = _problems(tmp_path, text, **env)
    assert messages
    assert all("hunter2" not in m for m in messages)


def test_postgres_urls_are_accepted() -> None:
    """Both URL schemes asyncpg takes are accepted, from the environment as from a file."""
    for url in ("postgres://u@h/db", "postgresql://u:pw@h:5432/db?sslmode=require"):
        assert config.load({"CVM_BACKUP_DATABASE_URL": url}).database_url == url


def test_unreadable_config_file_is_a_usage_error(tmp_path: Path) -> None:
    """A directory (or unreadable file) as CVM_BACKUP_CONFIG is refused, not a traceback."""
    with pytest.raises(UsageError, match="cannot read config file"):
        config.load({"CVM_BACKUP_CONFIG": str(tmp_path)})
    with pytest.raises(UsageError, match="config file not found"):
        config.load({"CVM_BACKUP_CONFIG": str(tmp_path / "missing.toml")})
    (tmp_path / "latin.toml").write_bytes(b'home = "caf\xe9"\n')
    with pytest.raises(UsageError, match="not UTF-8"):
        config.load({"CVM_BACKUP_CONFIG": str(tmp_path / "latin.toml")})
