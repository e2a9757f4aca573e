"""Daemon settings: built-in defaults, then the TOML file in `CVM_BACKUP_CONFIG` (which `--config`
sets; else /etc/cvm-backup/cvm-backup.toml when it exists), then environment.

Environment beats file; file beats defaults (docs/design.md#config-file). Every value is checked
once, here, for its type (read from the dataclass annotations) and its range, and all problems are
reported together as one UsageError (exit 2). Each message names the source (the file, or the
environment variable), the field with its section (`retry.max_delay`, `accounts[2].profile`;
accounts count from 1, like policies) and the reason. Settings are immutable afterwards.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from orchestrator import notify
from orchestrator.db import dsn
from orchestrator.errors import UsageError
from orchestrator.notify import urls as notify_urls
from orchestrator.policies import ACCOUNT_RE, MAX_WINDOW
from orchestrator.tencent import endpoints

DEFAULT_ENDPOINT = "https://cvm.tencentcloudapi.com"

# Published per-second limits (docs/design.md#rate-limits; DescribeImageQuota's page says 10).
DEFAULT_LIMITS: Mapping[str, int] = {
    "CreateImage": 10,
    "DeleteImages": 10,
    "DescribeImages": 40,
    "DescribeInstances": 40,
    "DescribeImageQuota": 10,
    "SyncImages": 10,
}
# The deployment name is a tag value on every image we make: short and from a small alphabet.
DEPLOYMENT_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,19}")


# Read when neither --config nor CVM_BACKUP_CONFIG names a file, if it exists: where the
# systemd unit's install steps put it, so a shell on the host sees what the service sees.
SYSTEM_CONFIG = Path("/etc/cvm-backup/cvm-backup.toml")
# root's default home: the unit's StateDirectory, not a dot-directory under /root.
ROOT_HOME = Path("/var/lib/cvm-backup")
_EXPLICIT_CONFIG = "--config or CVM_BACKUP_CONFIG"


def default_home(env: Mapping[str, str] | None = None, *, euid: int | None = None) -> Path:
    """root: /var/lib/cvm-backup; others: $XDG_DATA_HOME/cvm-backup, else ~/.local/share/...

    Except that a home of the old default (~/.local/share/cvm-backup for everyone) holding an
    embedded database stays the home while the new default holds none: after an upgrade, the
    daemon must not find "no database", and `migrate` must not make an empty second one.
    """
    env = os.environ if env is None else env
    user_home = env.get("HOME")
    legacy = (Path(user_home) if user_home else Path.home()) / ".local" / "share" / "cvm-backup"
    xdg = env.get("XDG_DATA_HOME", "")
    if (os.geteuid() if euid is None else euid) == 0:
        preferred = ROOT_HOME
    elif os.path.isabs(xdg):  # the XDG spec: a relative value is invalid and ignored
        preferred = Path(xdg) / "cvm-backup"
    else:
        return legacy
    if _has_database(legacy) and not _has_database(preferred):
        return legacy
    return preferred


def _has_database(home: Path) -> bool:
    # orchestrator.db.embedded.exists, without importing the server's machinery here.
    try:
        return (home / "pgdata" / "PG_VERSION").is_file()
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """Durable retry budgets (docs/design.md#error-classes); seconds."""

    transient_base: float = 1.0
    busy_base: float = 15.0
    max_delay: float = 300.0
    max_transient_attempts: int = 8
    throttle_delay: float = 1.0


@dataclass(frozen=True, slots=True)
class AccountSettings:
    """One Tencent Cloud account and where its credentials come from."""

    name: str = "default"
    # Names of environment variables, not secrets.
    secret_id_env: str = "TENCENTCLOUD_SECRET_ID"  # noqa: S105
    secret_key_env: str = "TENCENTCLOUD_SECRET_KEY"  # noqa: S105
    session_token_env: str = "TENCENTCLOUD_SESSION_TOKEN"  # noqa: S105
    profile: str | None = None
    cvm_role: str | None = None


@dataclass(frozen=True, slots=True)
class NotifySettings:
    """One webhook told about failures ([[notify]], orchestrator/notify); seconds."""

    # Not in repr: the URL may hold the receiver's token.
    url: str = field(default="", repr=False)
    format: str = "generic"
    events: tuple[str, ...] = notify.EVENTS
    name: str | None = None
    # A group is sent once its run completes, or this long after its last event.
    group_delay: float = 60.0
    timeout: float = 10.0
    give_up_after: float = 86400.0

    @property
    def key(self) -> str:
        """The target's name in the outbox and in logs (never the URL)."""
        return notify_urls.target_key(self.name, self.format, self.url)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything that is not a policy."""

    database_url: str | None = None
    home: Path = field(default_factory=default_home)
    endpoint: str = DEFAULT_ENDPOINT
    limits: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    # An optional cap on the fraction of a limit the limiter may use. The spacing that keeps every
    # one-second window at the server within the limit comes from `limiter_jitter` (seconds of
    # network jitter allowed for); at the defaults this cap does not bind.
    rate_margin: float = 0.97
    limiter_jitter: float = 0.02
    request_timeout: float = 20.0
    max_in_flight: int = 64
    lease_seconds: float = 60.0
    poll_interval: float = 5.0
    tracker_min_interval: float = 0.5
    tracker_max_interval: float = 30.0
    shutdown_grace: float = 20.0
    delete_binded_snap: bool = True
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    # /healthz, /readyz and /metrics: None serves them on 127.0.0.1:8739 (health.DEFAULT_ADDRESS),
    # "off" not at all.
    metrics_address: str | None = None
    retry: RetrySettings = field(default_factory=RetrySettings)
    accounts: tuple[AccountSettings, ...] = (AccountSettings(),)
    # Tagged on every image as cvm-backup:deployment; only images carrying it are ever adopted.
    deployment: str = "default"
    # The retention sweep over every (policy, instance) with live images, and the reconciliation
    # of image rows with the cloud: seconds between passes.
    retention_interval: float = 600.0
    reconcile_interval: float = 3600.0
    # Finished jobs, their ledger rows and deleted images' rows older than this many days are
    # pruned (orchestrator/history.py); rows of images that still exist are kept.
    history_days: int = 400
    # Webhooks told about failed runs, paused accounts and the like ([[notify]]).
    notify: tuple[NotifySettings, ...] = ()


# Environment variables that set a field; the first one set (and non-empty) wins.
ENVIRONMENT: Mapping[str, tuple[str, ...]] = {
    "database_url": ("CVM_BACKUP_DATABASE_URL", "DATABASE_URL"),
    "home": ("CVM_BACKUP_HOME",),
    "endpoint": ("CVM_BACKUP_ENDPOINT",),
    "log_format": ("CVM_BACKUP_LOG_FORMAT",),
    "deployment": ("CVM_BACKUP_DEPLOYMENT",),
}
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# More concurrent CreateImage calls than this cannot help at 10 calls/s; each costs a task.
MAX_IN_FLIGHT = 10_000
# The benchmark's ceiling run lifts the limiter to a million calls/s to measure the engine alone.
MAX_LIMIT = 1_000_000

Check = Callable[[Any], str | None]


class _Invalid(ValueError):
    """One value is wrong; the message says what was expected."""


class _Problems:
    """Every problem found so far, each naming its source, field and reason."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.fields: set[str] = set()

    def add(self, source: str, name: str, reason: str) -> None:
        """Record one problem with one field."""
        self.messages.append(f"{source}: {name}: {reason}")
        self.fields.add(name)


# ---------------------------------------------------------------- types, from the annotations


def _describe(value: object) -> str:
    if isinstance(value, dict | list):
        # Not echoed: tables and arrays may be long, or hold what should not be shown.
        return "a table" if isinstance(value, dict) else "an array"
    kinds = {bool: "boolean", int: "integer", float: "float", str: "string"}
    kind, shown = kinds.get(type(value), type(value).__name__), repr(value)
    return f"{kind} {shown if len(shown) <= 60 else shown[:57] + '...'}"


def _as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"expected true or false, got {_describe(value)}")


def _as_int(value: object) -> int:
    # bool is an int subclass, and a float like 128.0 later breaks asyncpg and the semaphores.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Invalid(f"expected an integer, got {_describe(value)}")


def _as_float(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise _Invalid(f"expected a finite number, got {_describe(value)}")


def _as_str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise _Invalid(f"expected a string, got {_describe(value)}")


def _as_path(value: object) -> Path:
    if isinstance(value, str) and value.strip():
        return Path(value).expanduser()
    raise _Invalid(f"expected a non-empty path string, got {_describe(value)}")


_CONVERTERS: Mapping[object, Callable[[object], Any]] = {
    bool: _as_bool,
    int: _as_int,
    float: _as_float,
    str: _as_str,
    Path: _as_path,
}


def _convert(value: object, hint: object) -> Any:
    # TOML has no null, so a value given for `X | None` must be an X.
    (kind,) = [arg for arg in get_args(hint) if arg is not type(None)] or [hint]
    return _CONVERTERS[kind](value)


# ---------------------------------------------------------------- ranges


# Every number has an upper bound: an absurd value (lease_seconds = 1e308, max_in_flight at
# 2**63) is a typo whose effect would only show later, as a crash loop or a spinning core.
HOUR, DAY = 3600.0, 86400.0


def _above_zero(high: float) -> Check:
    """A number in (0, high]."""

    def check(value: float) -> str | None:
        if 0 < value <= high:
            return None
        return f"must be greater than 0 and at most {high:g}, not {_shown(value)}"

    return check


def _from_zero(high: float) -> Check:
    """A number in [0, high]."""

    def check(value: float) -> str | None:
        return None if 0 <= value <= high else f"must be 0 to {high:g}, not {_shown(value)}"

    return check


def _shown(value: float) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _log_format(value: str) -> str | None:
    return None if value in LOG_FORMATS else f"must be auto, json or console, not {value!r}"


def _log_level(value: str) -> str | None:
    if value.upper() in logging.getLevelNamesMapping():
        return None
    return f"must be one of {', '.join(LOG_LEVELS)}, not {value!r}"


def _address(value: str) -> str | None:
    if value == "off":
        return None
    host, sep, port = value.rpartition(":")
    port_ok = port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535
    if sep and host.strip("[]") and port_ok and not _has_control(host):
        return None
    return f'must be host:port like 127.0.0.1:8739 (or "off"), not {_describe(value)}'


def _has_control(text: str) -> bool:
    return any(ord(char) < 0x20 or ord(char) == 0x7F for char in text)


def _home(value: Path) -> str | None:
    """The home must be a directory we can write, or creatable as one."""
    resolved = value.expanduser()
    if "\0" in str(resolved):
        return "cannot be examined: it contains a NUL character"
    try:
        existing = next((p for p in (resolved, *resolved.parents) if p.exists()), None)
    except (OSError, ValueError) as exc:
        return f"cannot be examined: {getattr(exc, 'strerror', None) or 'not a valid path'}"
    if existing is None or not existing.is_dir():
        kind = "a file" if existing is not None else "missing"
        where = "it" if existing == resolved else str(existing)
        return f"must be a directory; {where} is {kind}"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == resolved else f"{existing} (where it would be created)"
        return f"must be writable by this user; {where} is not"
    return None


def _endpoint(value: str) -> str | None:
    try:
        endpoints.validate(value)
    except UsageError as exc:
        return str(exc).removeprefix("endpoint").lstrip(": ")
    return None


def _database_url(value: str) -> str | None:
    scheme, sep, _ = value.partition("://")
    if not (sep and scheme.lower() in {"postgres", "postgresql"}):
        # Never echo it: a DSN may carry a password.
        return "must be a postgresql:// URL (the value is not shown: it may hold a password)"
    return dsn.problem(value)


def _env_name(value: str) -> str | None:
    if ENV_NAME_RE.fullmatch(value):
        return None
    # Not echoed: the usual mistake here is pasting the key itself instead of a variable name.
    return "must name an environment variable, like TENCENTCLOUD_SECRET_ID (value not shown)"


def _account_name(value: str) -> str | None:
    if ACCOUNT_RE.fullmatch(value):
        return None
    return f"must be 1-64 letters, digits, '_', '.' or '-' (what policies name), not {value!r}"


def _not_blank(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _profile(value: str) -> str | None:
    # Not echoed: a secret pasted here by mistake must not reach the terminal.
    if not value.strip():
        return "must not be empty"
    if len(value) > 128 or _has_control(value) or set("[]") & set(value):
        return "must be a profile name of at most 128 characters, without [ ] or control characters"
    return None


def _deployment(value: str) -> str | None:
    if DEPLOYMENT_RE.fullmatch(value):
        return None
    return "must be lowercase letters, digits and '-', at most 20, starting with a letter or digit"


NOTIFY_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,39}")


def _notify_name(value: str) -> str | None:
    if NOTIFY_NAME_RE.fullmatch(value):
        return None
    return (
        "must be 1-40 lowercase letters, digits, '_', '.' or '-', starting with a letter or "
        f"digit, not {_describe(value)}"
    )


def _notify_format(value: str) -> str | None:
    if value in notify.FORMATS:
        return None
    return f"must be one of {', '.join(notify.FORMATS)}, not {_describe(value)}"


# Beyond the longest completion window, so a pruned run's slot can never be due again and be
# backed up twice; migration 0008 refuses to delete younger ledger rows as well.
MIN_HISTORY_DAYS, MAX_HISTORY_DAYS = MAX_WINDOW.days + 1, 36500


def _history_days(value: int) -> str | None:
    if MIN_HISTORY_DAYS <= value <= MAX_HISTORY_DAYS:
        return None
    return f"must be {MIN_HISTORY_DAYS} to {MAX_HISTORY_DAYS} days, not {_shown(value)}"


_RULES: Mapping[type, Mapping[str, Check]] = {
    Settings: {
        "database_url": _database_url,
        "home": _home,
        "endpoint": _endpoint,
        "rate_margin": _above_zero(1),
        "limiter_jitter": _from_zero(1),
        "request_timeout": _above_zero(300),
        "max_in_flight": _above_zero(MAX_IN_FLIGHT),
        "lease_seconds": _above_zero(HOUR),
        "poll_interval": _above_zero(HOUR),
        "tracker_min_interval": _above_zero(HOUR),
        "tracker_max_interval": _above_zero(HOUR),
        "shutdown_grace": _from_zero(HOUR),
        "log_format": _log_format,
        "log_level": _log_level,
        "metrics_address": _address,
        "deployment": _deployment,
        "retention_interval": _above_zero(DAY),
        "reconcile_interval": _above_zero(7 * DAY),
        "history_days": _history_days,
    },
    RetrySettings: {
        "transient_base": _above_zero(HOUR),
        "busy_base": _above_zero(HOUR),
        "max_delay": _above_zero(DAY),
        "max_transient_attempts": _above_zero(1000),
        "throttle_delay": _above_zero(HOUR),
    },
    AccountSettings: {
        "name": _account_name,
        "secret_id_env": _env_name,
        "secret_key_env": _env_name,
        "session_token_env": _env_name,
        "profile": _profile,
        "cvm_role": _not_blank,
    },
    NotifySettings: {
        "url": notify_urls.problem,
        "format": _notify_format,
        "name": _notify_name,
        "group_delay": _from_zero(HOUR),
        "timeout": _above_zero(60),
        "give_up_after": _above_zero(7 * DAY),
    },
}
_HINTS: Mapping[type, Mapping[str, object]] = {cls: get_type_hints(cls) for cls in _RULES}

# (smaller, larger): the first must not exceed the second.
# (low, high, share): low must not exceed high / share.
_ORDERED = (
    ("tracker_min_interval", "tracker_max_interval", 1),
    ("retry.transient_base", "retry.max_delay", 1),
    ("retry.busy_base", "retry.max_delay", 1),
    # A CreateImage still on the wire when its job's lease ends could land after another
    # worker took the job over and made the image: the fence (orchestrator.fence) stops
    # sending a call once less than request_timeout of the lease is left, so half the lease
    # is the most a call may take and still leave room to send it.
    ("request_timeout", "lease_seconds", 2),
)


def _field(cls: type, key: str, raw: object) -> Any:
    """`raw` checked for field `key` of `cls`: its annotated type, then its range."""
    hints = _HINTS[cls]
    if key not in hints:
        raise _Invalid(f"unknown key; expected one of {', '.join(sorted(hints))}")
    value = _convert(raw, hints[key])
    check = _RULES[cls].get(key)
    if check is not None and (reason := check(value)) is not None:
        raise _Invalid(reason)
    return value


def _table(
    cls: type, data: Mapping[str, Any], source: str, label: str, problems: _Problems
) -> dict[str, Any]:
    """The good fields of one TOML table for `cls`; every bad one is reported."""
    values = {}
    for key, raw in data.items():
        try:
            values[key] = _field(cls, key, raw)
        except _Invalid as exc:
            problems.add(source, f"{label}{key}", str(exc))
    return values


# ---------------------------------------------------------------- sections of the file


def _limits(raw: object, source: str, problems: _Problems) -> dict[str, int] | None:
    if not isinstance(raw, dict):
        problems.add(source, "limits", f"expected a [limits] table, got {_describe(raw)}")
        return None
    limits = dict(DEFAULT_LIMITS)
    for action, value in raw.items():
        if action not in DEFAULT_LIMITS:
            reason = f"unknown action; expected one of {', '.join(DEFAULT_LIMITS)}"
        elif isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_LIMIT:
            limits[action] = value
            continue
        else:
            reason = (
                f"must be an integer from 1 to {MAX_LIMIT} (calls per second), "
                f"not {_describe(value)}"
            )
        problems.add(source, f"limits.{action}", reason)
    return limits


def _retry(raw: object, source: str, problems: _Problems) -> RetrySettings | None:
    if not isinstance(raw, dict):
        problems.add(source, "retry", f"expected a [retry] table, got {_describe(raw)}")
        return None
    return RetrySettings(**_table(RetrySettings, raw, source, "retry.", problems))


def _accounts(raw: object, source: str, problems: _Problems) -> tuple[AccountSettings, ...] | None:
    if not isinstance(raw, list) or not raw:
        got = "none" if raw == [] else _describe(raw)
        problems.add(source, "accounts", f"expected one or more [[accounts]] tables, got {got}")
        return None
    accounts: dict[int, AccountSettings] = {}
    for index, table in enumerate(raw, start=1):
        label = f"accounts[{index}]"
        if isinstance(table, dict):
            values = _table(AccountSettings, table, source, f"{label}.", problems)
            accounts[index] = AccountSettings(**values)
        else:
            problems.add(source, label, f"expected an [[accounts]] table, got {_describe(table)}")
    _unique_names(accounts, source, problems)
    return tuple(accounts.values())


def _unique_names(
    accounts: Mapping[int, AccountSettings], source: str, problems: _Problems
) -> None:
    seen: dict[str, int] = {}
    for index, account in accounts.items():
        if f"accounts[{index}].name" in problems.fields:
            continue  # already reported; its stand-in default name proves nothing
        if account.name in seen:
            problems.add(
                source,
                f"accounts[{index}].name",
                f"duplicate; accounts[{seen[account.name]}] is already named {account.name!r}",
            )
        seen.setdefault(account.name, index)


def _notify(raw: object, source: str, problems: _Problems) -> tuple[NotifySettings, ...] | None:
    if not isinstance(raw, list) or len(raw) > notify.MAX_TARGETS:
        got = f"{len(raw)} of them" if isinstance(raw, list) else _describe(raw)
        problems.add(
            source, "notify", f"expected at most {notify.MAX_TARGETS} [[notify]] tables, got {got}"
        )
        return None
    targets: dict[int, NotifySettings] = {}
    for index, table in enumerate(raw, start=1):
        label = f"notify[{index}]"
        if not isinstance(table, dict):
            problems.add(source, label, f"expected a [[notify]] table, got {_describe(table)}")
            continue
        if "url" not in table:
            problems.add(source, f"{label}.url", "missing: each [[notify]] needs a webhook URL")
        scalars = {key: value for key, value in table.items() if key != "events"}
        values = _table(NotifySettings, scalars, source, f"{label}.", problems)
        if "events" in table:
            values["events"] = _notify_events(table["events"], source, f"{label}.events", problems)
        targets[index] = NotifySettings(**values)
    _unique_targets(targets, source, problems)
    return tuple(targets.values())


def _notify_events(raw: object, source: str, label: str, problems: _Problems) -> tuple[str, ...]:
    most = len(notify.EVENTS)
    names = raw if isinstance(raw, list) and 0 < len(raw) <= most else None
    if names is None or not all(isinstance(name, str) for name in names):
        reason = f'expected a non-empty array of at most {most} event names like ["job.failed"]'
        problems.add(source, label, reason)
        return notify.EVENTS
    for name in names:
        if name not in notify.EVENTS:
            known = ", ".join(notify.EVENTS)
            reason = f"unknown event {_describe(name)}; expected some of {known}"
            problems.add(source, label, reason)
    return tuple(dict.fromkeys(name for name in names if name in notify.EVENTS))


def _unique_targets(
    targets: Mapping[int, NotifySettings], source: str, problems: _Problems
) -> None:
    seen: dict[str, int] = {}
    for index, target in targets.items():
        if {f"notify[{index}].{key}" for key in ("url", "name", "format")} & problems.fields:
            continue  # already reported
        if target.key in seen:
            # Not echoed: without a name the key is derived from the URL.
            problems.add(
                source,
                f"notify[{index}]",
                f"duplicate of notify[{seen[target.key]}]: the same name, or the same URL and "
                "format; give each [[notify]] its own name",
            )
        seen.setdefault(target.key, index)


_SECTIONS: Mapping[str, Callable[[object, str, _Problems], Any]] = {
    "limits": _limits,
    "retry": _retry,
    "accounts": _accounts,
    "notify": _notify,
}


# ---------------------------------------------------------------- sources


def _read(path: Path, named_by: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found ({named_by})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read config file ({named_by}): {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not valid TOML: the file is not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise UsageError(f"{path}: not valid TOML: nested too deeply") from None
    except ValueError:
        # int() refuses numbers of more than 4300 digits before TOML's own checks run.
        raise UsageError(f"{path}: not valid TOML: a number is too long") from None


def _from_file(path: Path, named_by: str, problems: _Problems) -> dict[str, Any]:
    data, source = _read(path, named_by), str(path)
    plain = {key: raw for key, raw in data.items() if key not in _SECTIONS}
    values = _table(Settings, plain, source, "", problems)
    for key, read in _SECTIONS.items():
        if key in data and (value := read(data[key], source, problems)) is not None:
            values[key] = value
    return values


def _from_env(env: Mapping[str, str], problems: _Problems) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, names in ENVIRONMENT.items():
        name = next((n for n in names if env.get(n)), None)
        if name is None:
            continue
        try:
            values[key] = _field(Settings, key, env[name])
        except _Invalid as exc:
            problems.add(f"environment {name}", key, str(exc))
    return values


def _value(settings: Settings, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _check_order(settings: Settings, source: str, problems: _Problems) -> None:
    """Pairs whose first must not exceed the second, once both are individually good."""
    for low, high, share in _ORDERED:
        if {low, high} & problems.fields:
            continue
        smaller, larger = _value(settings, low), _value(settings, high)
        if smaller > larger / share:
            bound = high if share == 1 else f"1/{share} of {high}"
            problems.add(source, low, f"must not exceed {bound} ({smaller} > {larger / share:g})")


def config_file(env: Mapping[str, str]) -> tuple[Path, str] | None:
    """The config file to read and what named it: CVM_BACKUP_CONFIG (which --config sets),
    else SYSTEM_CONFIG when it exists; None: defaults and environment only."""
    explicit = env.get("CVM_BACKUP_CONFIG")
    if explicit:
        return Path(explicit), _EXPLICIT_CONFIG
    try:
        SYSTEM_CONFIG.stat()
    except FileNotFoundError:
        return None
    except OSError:
        pass  # there but not examinable (a 0700 /etc/cvm-backup): reading it says why
    return SYSTEM_CONFIG, "the default config file; --config or CVM_BACKUP_CONFIG names another"


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from defaults, the config file and the environment, validated."""
    env = os.environ if env is None else env
    problems = _Problems()
    values: dict[str, Any] = {"home": default_home(env)}
    found = config_file(env)
    if found is not None:
        values.update(_from_file(*found, problems))
    values.update(_from_env(env, problems))
    settings = Settings(**values)
    # Only the file sets the ordered pairs, so with no file the defaults hold and pass.
    _check_order(settings, str(found[0]) if found else "config", problems)
    if problems.messages:
        raise UsageError(*problems.messages)
    return settings
