"""Daemon settings: built-in defaults, then the TOML file in `CVM_BACKUP_CONFIG`, then environment.

Environment beats file; file beats defaults (DESIGN §4). Settings are validated once, here, and
are immutable afterwards.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from orchestrator.errors import UsageError

DEFAULT_ENDPOINT = "https://cvm.tencentcloudapi.com"

# Published per-second limits (reference §5); DescribeImageQuota's is the common CVM default.
DEFAULT_LIMITS: Mapping[str, int] = {
    "CreateImage": 10,
    "DeleteImages": 10,
    "DescribeImages": 40,
    "DescribeInstances": 40,
    "DescribeImageQuota": 20,
}


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """Durable retry budgets (DESIGN §3); seconds."""

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
class Settings:
    """Everything that is not a policy."""

    database_url: str | None = None
    home: Path = field(default_factory=lambda: Path("~/.local/share/cvm-backup").expanduser())
    endpoint: str = DEFAULT_ENDPOINT
    limits: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    # An optional cap on the fraction of a limit the limiter may use. The spacing that keeps every
    # one-second window at the server within the limit comes from `limiter_jitter` (seconds of
    # network jitter allowed for); at the defaults this cap does not bind.
    rate_margin: float = 0.97
    limiter_jitter: float = 0.02
    request_timeout: float = 30.0
    max_in_flight: int = 64
    lease_seconds: float = 30.0
    poll_interval: float = 5.0
    tracker_min_interval: float = 0.5
    tracker_max_interval: float = 30.0
    shutdown_grace: float = 20.0
    delete_binded_snap: bool = True
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    metrics_address: str | None = None  # "127.0.0.1:9108" to serve /metrics
    retry: RetrySettings = field(default_factory=RetrySettings)
    accounts: tuple[AccountSettings, ...] = (AccountSettings(),)


def _section(data: Mapping[str, Any], source: str, cls: type[Any]) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(
            f"{source}: unknown key(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(sorted(known))}"
        )
    return dict(data)


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found (CVM_BACKUP_CONFIG)") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    values = _section(data, str(path), Settings)
    if "retry" in values:
        values["retry"] = RetrySettings(
            **_section(values["retry"], f"{path}: [retry]", RetrySettings)
        )
    if "accounts" in values:
        values["accounts"] = tuple(
            AccountSettings(**_section(a, f"{path}: [[accounts]]", AccountSettings))
            for a in values["accounts"]
        )
    if "limits" in values:
        values["limits"] = {**DEFAULT_LIMITS, **values["limits"]}
    if "home" in values:
        values["home"] = Path(values["home"]).expanduser()
    return values


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if url := env.get("CVM_BACKUP_DATABASE_URL") or env.get("DATABASE_URL"):
        values["database_url"] = url
    if home := env.get("CVM_BACKUP_HOME"):
        values["home"] = Path(home).expanduser()
    if endpoint := env.get("CVM_BACKUP_ENDPOINT"):
        values["endpoint"] = endpoint
    if fmt := env.get("CVM_BACKUP_LOG_FORMAT"):
        values["log_format"] = fmt
    return values


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from defaults, the config file and the environment, validated."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    if path := env.get("CVM_BACKUP_CONFIG"):
        values.update(_from_file(Path(path)))
    values.update(_from_env(env))
    try:
        settings = replace(Settings(), **values)
    except TypeError as exc:
        raise UsageError(f"config: {exc}") from None
    _validate(settings)
    return settings


def _validate(settings: Settings) -> None:
    if settings.log_format not in {"auto", "json", "console"}:
        raise UsageError(
            f"config: log_format must be auto, json or console, not {settings.log_format!r}"
        )
    for action, limit in settings.limits.items():
        if not isinstance(limit, int) or limit <= 0:
            raise UsageError(f"config: limits.{action} must be a positive integer, not {limit!r}")
    if not 0 < settings.rate_margin <= 1:
        raise UsageError("config: rate_margin must be in (0, 1]")
