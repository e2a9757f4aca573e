"""Webhook URLs: which are acceptable, how a target is named, and keeping their tokens out of text.

A webhook URL is a credential: WeCom and DingTalk put the robot's key in the query
(`?key=...`, `?access_token=...`), Feishu and Slack in the path (`/hook/<token>`,
`/services/T../B../<secret>`). So no message built here repeats a URL: problems name the rule
that was broken, logs show only the host, and any text that may quote a URL (an exception, a
receiver's answer) goes through `scrub` first.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from urllib.parse import SplitResult, parse_qsl, urlsplit

from orchestrator.notify import MAX_URL_LENGTH

_HIDDEN = " (the URL is not shown: it may hold a token)"
# Path segments and query values at least this long are treated as possible tokens.
_TOKEN_MIN = 4
_MASK = "…"


def problem(url: str) -> str | None:
    """Why `url` cannot be a webhook, without repeating it; None when it can."""
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters, not {len(url)}{_HIDDEN}"
    if not url or any(char.isspace() or not char.isprintable() for char in url):
        return f"must be a URL without spaces or control characters{_HIDDEN}"
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError for ":abc" and ":99999"
    except ValueError:
        return f"must be a URL like https://host/path{_HIDDEN}"
    reason = _shape(parts, port)
    return None if reason is None else f"{reason}{_HIDDEN}"


def _shape(parts: SplitResult, port: int | None) -> str | None:
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return "must be an https:// URL like https://host/path"
    if "@" in parts.netloc:
        return "must not carry user information (user:password@)"
    if port == 0 or (":" in parts.netloc.rpartition("]")[2] and port is None):
        return "the port must be an integer from 1 to 65535"
    if parts.fragment:
        return "must have no #fragment"
    if parts.scheme == "http" and not _loopback(parts.hostname):
        # The token and every message would cross the network in clear.
        return (
            "plain http:// is only for a receiver on loopback (127.0.0.1, ::1, localhost); "
            "use https://"
        )
    return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host(url: str) -> str:
    """What logs show of a webhook: host and port, never path or query."""
    parts = urlsplit(url)
    name = parts.hostname or "?"
    shown = f"[{name}]" if ":" in name else name
    return f"{shown}:{parts.port}" if parts.port else shown


def target_key(name: str | None, fmt: str, url: str) -> str:
    """The target's name in the outbox and in logs: its name, else format and a short hash."""
    if name:
        return name
    # Ten hex digits of SHA-256 tell targets apart without letting anyone recover the token.
    return f"{fmt}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


def secrets_of(url: str) -> set[str]:
    """Every part of `url` that may be a token: the URL itself, its path, query and their pieces."""
    parts = urlsplit(url)
    found = {url, parts.path, parts.query, parts.netloc + parts.path}
    found.update(parts.path.split("/"))
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        found.update((value, f"{key}={value}"))
    found.update(parts.query.split("&"))
    return {piece for piece in found if len(piece) >= _TOKEN_MIN and piece != "/"}


def scrub(text: str, urls: Iterable[str]) -> str:
    """`text` with every possible token of `urls` masked."""
    pieces = set().union(*(secrets_of(url) for url in urls))
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, _MASK)
    return text
