"""Credentials and the SDK's provider chain: environment, profile file, CVM role, TKE OIDC role.

A provider is anything with `async def get(self) -> Credentials`. Each call may return fresh
credentials (temporary role keys are refreshed before they expire), so callers ask per request.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import math
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from orchestrator import __version__, logs
from orchestrator.config import AccountSettings
from orchestrator.errors import UsageError
from orchestrator.tencent import endpoints, transport
from orchestrator.tencent.errors import TencentError

METADATA_URL = "http://metadata.tencentyun.com/latest/meta-data/"
ROLE_PATH = "cam/security-credentials/"
# The server refuses timestamps more than 300 s off, so the SDK renews keys this long before expiry.
REFRESH_MARGIN = 300.0
NO_CREDENTIALS = "AuthFailure.NoCredentials"

# TKE's OIDC role, as the SDK's DefaultTkeOIDCRoleArnProvider reads it (all four required).
TKE_ENV = ("TKE_REGION", "TKE_PROVIDER_ID", "TKE_WEB_IDENTITY_TOKEN_FILE", "TKE_ROLE_ARN")
STS_URL = "https://sts.tencentcloudapi.com"
STS_ACTION = "AssumeRoleWithWebIdentity"
STS_VERSION = "2018-08-13"
# The SDK asks for two hours; STS grants at most twelve.
TKE_DURATION = 7200
STS_MAX_DURATION = 43200
# A projected service-account token is a JWT of about 1 KB; anything this big is not one.
TOKEN_FILE_LIMIT = 64 * 1024
_STS_MESSAGE_LIMIT = 300

log = logs.get("tencent.credentials")


def _mask(value: str) -> str:
    return f"{value[:4]}***{value[-4:]}" if len(value) > 12 else "***"


# A profile name is shown only while it cannot be a pasted key (a SecretKey has 32 characters).
_PROFILE_SHOWN = re.compile(r"[A-Za-z0-9_.-]{1,20}")


def shown_profile(profile: str) -> str:
    """The profile name as it may be printed: masked when it could be a secret pasted there."""
    return profile if _PROFILE_SHOWN.fullmatch(profile) else _mask(profile)


@dataclass(frozen=True, slots=True, repr=False)
class Credentials:
    """A secret id and key, plus a token for temporary keys. Its repr never shows the secrets."""

    secret_id: str
    secret_key: str
    token: str | None = None
    expires_at: float | None = None  # Unix time; None for long-lived keys
    source: str = field(default="static", compare=False)

    def __post_init__(self) -> None:
        for name in ("secret_id", "secret_key"):
            value = getattr(self, name)
            if not value or value.strip() != value:
                raise CredentialsError(f"{self.source}: {name} is empty or has surrounding spaces")

    def __repr__(self) -> str:
        token = ", token=***" if self.token else ""
        return f"Credentials(secret_id={_mask(self.secret_id)!r}{token}, source={self.source!r})"

    __str__ = __repr__

    def expiring(self, now: float, margin: float = REFRESH_MARGIN) -> bool:
        """Whether these keys expire within `margin` seconds of `now`."""
        return self.expires_at is not None and self.expires_at - now <= margin


class CredentialsError(TencentError):
    """No usable credentials from a provider; an account-wide stop (an `AuthFailure.*` code)."""

    def __init__(self, message: str, *, malformed: bool = False) -> None:
        super().__init__(NO_CREDENTIALS, message)
        # A file that exists but cannot be read as credentials: the operator's input is wrong,
        # which `check` reports as a usage error (exit 2), not as an unhealthy system.
        self.malformed = malformed


class CredentialsProvider(Protocol):
    """Anything that yields the credentials to sign the next request with."""

    async def get(self) -> Credentials:
        """Credentials valid for at least the next request."""
        ...


class StaticCredentials:
    """Fixed credentials (tests, the simulator, explicit configuration)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def __repr__(self) -> str:
        return f"StaticCredentials({self._credentials!r})"

    async def get(self) -> Credentials:
        """The fixed credentials."""
        return self._credentials


class EnvCredentials:
    """Keys from environment variables (names configurable per account)."""

    def __init__(
        self, account: AccountSettings | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        account = account or AccountSettings()
        self._env = env
        self._vars = (account.secret_id_env, account.secret_key_env, account.session_token_env)

    def __repr__(self) -> str:
        return f"EnvCredentials(vars={self._vars!r})"

    async def get(self) -> Credentials:
        """Keys from the environment, read at call time."""
        env = os.environ if self._env is None else self._env
        id_var, key_var, token_var = self._vars
        secret_id, secret_key = env.get(id_var, ""), env.get(key_var, "")
        if not secret_id or not secret_key:
            raise CredentialsError(f"environment: {id_var} and {key_var} are not both set")
        return Credentials(secret_id, secret_key, env.get(token_var) or None, source="environment")


def default_profile_paths() -> tuple[Path, ...]:
    """Where the SDK looks for the credentials file, in order."""
    return (Path("~/.tencentcloud/credentials").expanduser(), Path("/etc/tencentcloud/credentials"))


def _read_profile(paths: Sequence[Path], profile: str) -> Credentials:
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise CredentialsError(f"profile file: none of {', '.join(map(str, paths))} exists")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as exc:
        reason = f"not a valid INI file ({type(exc).__name__})"
        raise CredentialsError(f"{path}: {reason}", malformed=True) from None
    except UnicodeDecodeError as exc:
        reason = f"not a valid INI file (not UTF-8 at byte {exc.start})"
        raise CredentialsError(f"{path}: {reason}", malformed=True) from None
    name = shown_profile(profile)
    if not parser.has_section(profile):
        raise CredentialsError(f"{path}: no [{name}] profile")
    section = parser[profile]
    secret_id = section.get("secret_id", "").strip()
    secret_key = section.get("secret_key", "").strip()
    if not secret_id or not secret_key:
        raise CredentialsError(f"{path}: [{name}] needs secret_id and secret_key")
    token = section.get("token", "").strip() or None
    return Credentials(secret_id, secret_key, token, source=f"{path}[{name}]")


class ProfileCredentials:
    """Keys from `~/.tencentcloud/credentials` (INI): `[default]` or a named profile."""

    def __init__(self, profile: str | None = None, paths: Sequence[Path] | None = None) -> None:
        self._profile = profile or "default"
        self._paths = tuple(paths) if paths is not None else default_profile_paths()

    def __repr__(self) -> str:
        return f"ProfileCredentials(profile={shown_profile(self._profile)!r})"

    async def get(self) -> Credentials:
        """Keys from the first credentials file that exists."""
        return await asyncio.to_thread(_read_profile, self._paths, self._profile)


def _role_credentials(data: Any, role: str) -> Credentials:
    if not isinstance(data, dict) or data.get("Code") != "Success":
        code = data.get("Code") if isinstance(data, dict) else None
        raise CredentialsError(f"CVM role {role!r}: metadata answered Code={code!r}")
    try:
        return Credentials(
            str(data["TmpSecretId"]),
            str(data["TmpSecretKey"]),
            str(data["Token"]),
            expires_at=float(data["ExpiredTime"]),
            source=f"cvm-role:{role}",
        )
    except (KeyError, TypeError, ValueError):
        raise CredentialsError(f"CVM role {role!r}: metadata answer lacks keys") from None


class RefreshingKeys:
    """Temporary keys from `fetch`, cached and fetched again within `margin` of their expiry.

    A failed refresh keeps keys still inside their lifetime (the metadata service, STS or a
    token file may blip); expired keys are never handed out.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Credentials]],
        margin: float,
        clock: Callable[[], float],
        **about: Any,
    ) -> None:
        self._fetch, self._margin, self._clock, self._about = fetch, margin, clock, about
        self._cached: Credentials | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Credentials:
        """The cached keys, refreshed first when they expire within the margin."""
        async with self._lock:
            cached = self._cached
            if cached is None or cached.expiring(self._clock(), self._margin):
                cached = self._cached = await self._refresh(cached)
            return cached

    async def _refresh(self, cached: Credentials | None) -> Credentials:
        try:
            fresh = await self._fetch()
        except TencentError as exc:
            if cached is not None and not cached.expiring(self._clock(), 0):
                about = self._about or {"source": cached.source}
                log.warning("credentials.refresh_failed", code=exc.code, **about)
                return cached
            raise
        about = self._about or {"source": fresh.source}
        log.debug("credentials.refreshed", expires_at=fresh.expires_at, **about)
        return fresh


class CvmRoleCredentials:
    """Temporary keys of the instance's CAM role, from the CVM metadata service, renewed early."""

    def __init__(
        self,
        role: str | None = None,
        *,
        base_url: str = METADATA_URL,
        refresh_margin: float = REFRESH_MARGIN,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._role = role
        self._base = base_url if base_url.endswith("/") else base_url + "/"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._keys = RefreshingKeys(self._fetch, refresh_margin, clock, role=role)

    def __repr__(self) -> str:
        return f"CvmRoleCredentials(role={self._role!r}, base_url={self._base!r})"

    async def get(self) -> Credentials:
        """Cached role keys, fetched again when they are within the refresh margin of expiry."""
        return await self._keys.get()

    async def _fetch(self) -> Credentials:
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            role = self._role or await self._discover(session)
            text = await self._get_text(session, self._base + ROLE_PATH + role)
        try:
            data = json.loads(text)
        except ValueError:
            raise CredentialsError(f"CVM role {role!r}: metadata answer is not JSON") from None
        return _role_credentials(data, role)

    async def _discover(self, session: aiohttp.ClientSession) -> str:
        text = await self._get_text(session, self._base + ROLE_PATH)
        role = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if not role:
            raise CredentialsError("CVM role: the instance has no CAM role bound")
        self._role = role
        return role

    async def _get_text(self, session: aiohttp.ClientSession, url: str) -> str:
        try:
            async with session.get(url) as resp:
                if resp.status != 200:
                    raise CredentialsError(f"CVM role: metadata {url} answered HTTP {resp.status}")
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = type(exc).__name__
            raise CredentialsError(f"CVM role: metadata {url} unreachable ({reason})") from None


@dataclass(frozen=True, slots=True, repr=False)
class _TkeIdentity:
    """What one AssumeRoleWithWebIdentity call needs; read again before every call."""

    region: str
    provider_id: str
    token: str
    role_arn: str


def _token_error(path: Path, reason: str, *, malformed: bool = False) -> CredentialsError:
    # The path comes from TKE_WEB_IDENTITY_TOKEN_FILE; the token itself is never shown.
    message = f"TKE OIDC: web identity token file {path}: {reason}"
    return CredentialsError(message, malformed=malformed)


def _read_token(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(TOKEN_FILE_LIMIT + 1)
    except OSError as exc:
        raise _token_error(path, exc.strerror or type(exc).__name__) from None
    if len(data) > TOKEN_FILE_LIMIT:
        raise _token_error(path, f"larger than {TOKEN_FILE_LIMIT} bytes", malformed=True)
    try:
        # A JWT is ASCII without whitespace: a trailing newline from an editor is not part of it.
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise _token_error(path, "not a token (not ASCII text)", malformed=True) from None
    if not token:
        raise _token_error(path, "empty")
    return token


def _tke_identity(env: Mapping[str, str]) -> _TkeIdentity:
    values = {name: env.get(name, "").strip() for name in TKE_ENV}
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise CredentialsError(f"TKE OIDC: {', '.join(missing)} not set")
    token = _read_token(Path(values["TKE_WEB_IDENTITY_TOKEN_FILE"]))
    return _TkeIdentity(
        values["TKE_REGION"], values["TKE_PROVIDER_ID"], token, values["TKE_ROLE_ARN"]
    )


def sts_endpoint(url: str) -> endpoints.Endpoint:
    """The STS endpoint of `url` (https, or http to loopback only); a bad one is a UsageError."""
    try:
        return endpoints.resolve(url)
    except UsageError as exc:
        raise UsageError(f"CVM_BACKUP_STS_URL: {exc}") from None


def _without_token(text: str, token: str) -> str:
    # STS should never echo the token, but an error message is the one place it could appear:
    # blank the token and each of its JWT segments, and keep the message short.
    for part in (token, *token.split(".")):
        if len(part) >= 16:
            text = text.replace(part, "***")
    return text[:_STS_MESSAGE_LIMIT]


def _sts_failure(identity: _TkeIdentity, exc: TencentError) -> CredentialsError:
    message = _without_token(exc.message, identity.token)
    request = f" (RequestId {exc.request_id})" if exc.request_id else ""
    return CredentialsError(
        f"TKE OIDC role {identity.role_arn!r}: STS {STS_ACTION} answered {exc.code}: "
        f"{message}{request}"
    )


def _sts_credentials(response: Any, role_arn: str, now: float) -> Credentials:
    failure = f"TKE OIDC role {role_arn!r}: STS answer"
    try:
        keys = response["Credentials"]
        expires_at = float(response["ExpiredTime"])
        secret_id, secret_key, token = keys["TmpSecretId"], keys["TmpSecretKey"], keys["Token"]
    except (KeyError, TypeError, ValueError):
        raise CredentialsError(f"{failure} lacks Credentials or ExpiredTime") from None
    if not all(isinstance(v, str) for v in (secret_id, secret_key, token)):
        raise CredentialsError(f"{failure} has keys that are not strings")
    if not math.isfinite(expires_at) or expires_at <= now:
        # Keys already expired by our clock would be fetched again on every request.
        raise CredentialsError(
            f"{failure} ExpiredTime {expires_at} is not after now ({now:.0f}): check the clock"
        )
    # No grant outlives STS's maximum: a bogus far-future time must not pin keys for good.
    expires_at = min(expires_at, now + STS_MAX_DURATION)
    return Credentials(
        secret_id, secret_key, token, expires_at=expires_at, source=f"tke-oidc:{role_arn}"
    )


class TkeOidcCredentials:
    """Temporary keys of a TKE pod's OIDC role (AssumeRoleWithWebIdentity), renewed early.

    As the SDK does, the environment and the token file are read again before each STS call
    (the kubelet rotates the projected token), the call is not signed (`Authorization: SKIP`),
    keys are asked for two hours and renewed a tenth of that before they expire.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        sts_url: str = STS_URL,
        duration: int = TKE_DURATION,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < duration <= STS_MAX_DURATION:
            raise ValueError(f"duration must be 1 to {STS_MAX_DURATION} s, not {duration}")
        self._env = env
        self._endpoint = sts_endpoint(sts_url)
        self._duration = duration
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._keys = RefreshingKeys(self._fetch, max(REFRESH_MARGIN, duration / 10), clock)

    def __repr__(self) -> str:
        return f"TkeOidcCredentials(sts_url={self._endpoint.url!r})"

    async def get(self) -> Credentials:
        """Cached role keys, fetched again when they are within the refresh margin of expiry."""
        return await self._keys.get()

    async def _fetch(self) -> Credentials:
        env = os.environ if self._env is None else self._env
        identity = await asyncio.to_thread(_tke_identity, env)
        payload = transport.encode(
            {
                "ProviderId": identity.provider_id,
                "WebIdentityToken": identity.token,
                "RoleArn": identity.role_arn,
                "RoleSessionName": f"cvm-backup-{time.time_ns() // 1000}",
                "DurationSeconds": self._duration,
            }
        )
        try:
            async with aiohttp.ClientSession() as session:
                response = await transport.post(
                    session, self._endpoint.url, self._headers(identity), payload, self._timeout
                )
        except TencentError as exc:
            raise _sts_failure(identity, exc) from None
        return _sts_credentials(response, identity.role_arn, self._clock())

    def _headers(self, identity: _TkeIdentity) -> dict[str, str]:
        # The SDK's unsigned request: no X-TC-Token, and "SKIP" where a signature would be.
        return {
            "Authorization": "SKIP",
            "Content-Type": "application/json",
            "Host": self._endpoint.host,
            "X-TC-Action": STS_ACTION,
            "X-TC-Version": STS_VERSION,
            "X-TC-Timestamp": str(int(time.time())),
            "X-TC-Region": identity.region,
            "X-TC-Language": "en-US",
            "X-TC-RequestClient": f"CVM_BACKUP_{__version__}",
            "X-TC-TraceId": str(uuid.uuid4()),
        }


class ChainCredentials:
    """The first provider that yields credentials wins and is kept, as the SDK's chain does."""

    def __init__(self, providers: Sequence[CredentialsProvider]) -> None:
        self._providers = tuple(providers)
        self._chosen: CredentialsProvider | None = None

    def __repr__(self) -> str:
        return f"ChainCredentials({list(self._providers)!r})"

    async def get(self) -> Credentials:
        """Credentials from the chosen provider, choosing one on first use."""
        if self._chosen is not None:
            return await self._chosen.get()
        reasons, malformed = [], False
        for provider in self._providers:
            try:
                found = await provider.get()
            except CredentialsError as exc:
                reasons.append(exc.message)
                malformed = malformed or exc.malformed
                continue
            self._chosen = provider
            log.debug("credentials.chosen", source=found.source)
            return found
        raise CredentialsError("no credentials found: " + "; ".join(reasons), malformed=malformed)


def default_chain(
    account: AccountSettings | None = None,
    *,
    env: Mapping[str, str] | None = None,
    profile_paths: Sequence[Path] | None = None,
    metadata_url: str | None = None,
    sts_url: str | None = None,
) -> ChainCredentials:
    """The SDK's chain for one account: environment, profile file, CVM role, TKE OIDC role.

    `CVM_BACKUP_METADATA_URL` replaces the metadata service address and `CVM_BACKUP_STS_URL` the
    STS endpoint (private mirrors, tests); a bad STS URL is a UsageError.
    """
    account = account or AccountSettings()
    metadata_url = metadata_url or os.environ.get("CVM_BACKUP_METADATA_URL") or METADATA_URL
    sts_url = sts_url or os.environ.get("CVM_BACKUP_STS_URL") or STS_URL
    return ChainCredentials(
        [
            EnvCredentials(account, env),
            ProfileCredentials(account.profile, profile_paths),
            CvmRoleCredentials(account.cvm_role, base_url=metadata_url),
            # Last, as in the SDK's DefaultCredentialProvider: a CVM role bound to the node wins.
            TkeOidcCredentials(env, sts_url=sts_url),
        ]
    )
