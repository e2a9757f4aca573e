"""Postgres DSNs: whether one is usable, how to show it without its password, another database.

A password must never be shown, not even in part: not in the reason a DSN is refused, not in a
redacted DSN, and not in asyncpg's own parse errors (which quote the piece they choked on, so a
`#` in a password printed the text before it). So `problem` explains without quoting anything,
and `redact` errs towards hiding too much: when it cannot tell where a password ends it hides up
to the last `@`, and what it cannot parse at all becomes a placeholder.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlsplit, urlunsplit

SCHEMES = frozenset({"postgres", "postgresql"})
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
MAX_PORT = 65535
HIDDEN = "***"
UNPARSEABLE = "postgresql://<unparseable DSN>"

_URL = re.compile(r"\s*(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)", re.DOTALL)
# libpq's key/value form: key = 'quoted \' value' or key = unquoted\ value.
_KEYWORD = re.compile(r"\s*(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*")
_VALUE = re.compile(r"'(?:[^'\\]|\\.)*'|(?:[^\s\\]|\\.)+", re.DOTALL)
# In free text: a URL (up to whitespace, since DSN passwords cannot hold a literal space once
# `problem` has passed them), or a password=value pair outside any URL.
_IN_TEXT = re.compile(
    r"(?P<url>[A-Za-z][A-Za-z0-9+.-]*://\S+)"
    r"|(?P<key>\b\w*password\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'?|\S+)",
    re.IGNORECASE | re.DOTALL,
)
_BARE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPACE = re.compile(r"\s")
_DIGITS = re.compile(r"[0-9]{1,5}")
_IPV6 = re.compile(r"\[[^\[\]]+\](?::(?P<port>[^:]*))?")
# Passwords shorter than this are not searched for in free text: every "ab" in an error
# message would be starred out.
_SEARCHED_PASSWORD = 3

_ENCODE = "must percent-encode special characters in the user name and password"
_NOT_SHOWN = "(the value is not shown: it may hold a password)"


def problem(dsn: str) -> str | None:
    """None if `dsn` is a usable postgresql:// URL, else why not, quoting no part of it."""
    checks = (_text_problem, _structure_problem, _character_problem, _host_problem, _query_problem)
    for check in checks:
        reason = check(dsn)
        if reason is not None:
            return f"{reason} {_NOT_SHOWN}"
    if not _asyncpg_parses(dsn):
        return f"is not a DSN asyncpg can parse {_NOT_SHOWN}"
    return None


def redact(dsn: str) -> str:
    """`dsn` with every password replaced by ***, user and host kept; safe to print or log."""
    url = _URL.fullmatch(dsn)
    if url is not None:
        return _redact_url(url["scheme"], url["rest"])
    keywords = _keywords(dsn)
    if keywords is None:
        return UNPARSEABLE
    return " ".join(f"{key}={_redact_value(key, value)}" for key, value in keywords)


def redact_text(text: str, *, dsn: str | None = None) -> str:
    """Free text (a log line, an error message) with DSN passwords hidden.

    Every URL in it is redacted, every `password=value` outside one too; when `dsn` is given,
    its password is also starred out wherever it appears verbatim.
    """
    shown = _IN_TEXT.sub(_redact_match, text)
    for password in _passwords(dsn) if dsn else ():
        shown = shown.replace(password, HIDDEN)
    return shown


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database (URL-form DSNs only)."""
    reason = problem(dsn)
    if reason is not None:
        raise ValueError(f"DSN {redact(dsn)} {reason}")
    parts = _split(dsn)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


def _text_problem(dsn: str) -> str | None:
    scheme, sep, _ = dsn.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        if not sep and _keywords(dsn):
            return "must be a postgresql:// URL; key/value DSNs (host=...) are not accepted"
        return "must be a postgresql:// URL"
    if _CONTROL.search(dsn):
        return f"must not contain control characters; {_ENCODE}"
    return None


def _split(dsn: str) -> SplitResult:
    """urlsplit, for DSNs `_structure_problem` has already let through."""
    return urlsplit(dsn)


def _structure_problem(dsn: str) -> str | None:
    try:
        parts = urlsplit(dsn)
    except ValueError:
        # Not echoed: its message may quote the host part, which may hold the password.
        return f"is not a URL (a '[' or ']' out of place?); {_ENCODE}"
    if "#" in dsn:
        return f"has a '#', which would cut the URL short; {_ENCODE} ('#' is %23)"
    if "@" not in parts.netloc and "@" in dsn:
        return f"has a '/' or '?' before its '@'; {_ENCODE} ('/' is %2F, '?' is %3F)"
    # An '@' in the query is fine (a socket path may hold one); anywhere else, asyncpg would
    # split at the first and take the rest of the password for the host or the database.
    if parts.netloc.count("@") > 1 or "@" in parts.path:
        return f"has more than one '@'; {_ENCODE} ('@' is %40)"
    return None


def _character_problem(dsn: str) -> str | None:
    parts = _split(dsn)
    # Spaces in a query value are fine (socket paths again); in the password they would end the
    # DSN early wherever log scrubbing looks for it.
    if _SPACE.search(parts.netloc + parts.path):
        return f"must not contain spaces before the query; {_ENCODE} (a space is %20)"
    if _BARE_PERCENT.search(parts.netloc):
        return f"has a '%' that starts no escape; {_ENCODE} (a '%' itself is %25)"
    return None


def _host_problem(dsn: str) -> str | None:
    hostlist = _split(dsn).netloc.rpartition("@")[2]
    if not hostlist:
        return None  # hosts come from ?host= or the environment
    for hostspec in hostlist.split(","):
        if not hostspec:
            return "has an empty host in its host list"
        if not _port_ok(_hostspec_port(hostspec)):
            return f"has a malformed host:port (a port is an integer from 1 to {MAX_PORT})"
    return None


def _hostspec_port(hostspec: str) -> str | None:
    """The port text of host[:port] or [v6][:port] (None: no port; '' when malformed)."""
    if hostspec.startswith("["):
        match = _IPV6.fullmatch(hostspec)
        return "" if match is None else match["port"]
    _, colon, port = hostspec.partition(":")
    return unquote(port) if colon else None


def _port_ok(port: str | None) -> bool:
    if port is None:
        return True
    return _DIGITS.fullmatch(port) is not None and 1 <= int(port) <= MAX_PORT


def _query_problem(dsn: str) -> str | None:
    query = _split(dsn).query
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        # Not echoed: its message quotes the offending field.
        return "has a query that is not key=value pairs joined by '&'"
    for key, value in pairs:
        if _secret(key) and _SPACE.search(value):
            return f"has a space in a password parameter; {_ENCODE} (a space is %20)"
        if key == "sslmode" and value not in SSLMODES:
            return f"has an sslmode that is not one of {', '.join(SSLMODES)}"
        if key == "port" and not all(_port_ok(port) for port in value.split(",")):
            return f"has a port that is not an integer from 1 to {MAX_PORT}"
    return None


def _asyncpg_parses(dsn: str) -> bool:
    """Whether asyncpg's own DSN parser accepts `dsn` (its private API, so looked up warily)."""
    # Imported here: logging imports this module, and must not pull asyncpg into every command.
    from asyncpg import connect_utils

    parse: Callable[..., Any] | None = getattr(connect_utils, "_parse_connect_dsn_and_args", None)
    if parse is None:
        return True  # a future asyncpg: our own checks above stand alone
    arguments: dict[str, Any] = dict.fromkeys(inspect.signature(parse).parameters)
    # ssl=False: sslmode was checked above, and verify-full would otherwise need the CA file
    # on this machine just to validate the text.
    arguments.update(dsn=dsn, ssl=False)
    try:
        parse(**arguments)
    except Exception:  # noqa: BLE001 - whatever it raises, its message may quote the password
        return False
    return True


def _url_pieces(rest: str) -> tuple[str | None, str, str | None]:
    """A URL after its `scheme://`: user information (None without an '@'), host and path,
    query (None without a '?').

    The last '@' ends the user information: a password holding a literal '@' is then hidden
    whole, and an '@' in a query value hides the host too, which is safe if unhelpful.
    """
    userinfo, at, after = rest.rpartition("@")
    hostpath, question, query = after.partition("?")
    return (userinfo if at else None), hostpath, (query if question else None)


def _redact_url(scheme: str, rest: str) -> str:
    userinfo, hostpath, query = _url_pieces(rest)
    head = ""
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        head = f"{user}:{HIDDEN}@" if colon else f"{user}@"
    tail = "" if query is None else "?" + "&".join(map(_redact_param, query.split("&")))
    return f"{scheme}://{head}{hostpath}{tail}"


def _redact_param(param: str) -> str:
    key, equals, _ = param.partition("=")
    return f"{key}={HIDDEN}" if equals and _secret(unquote(key)) else param


def _secret(key: str) -> bool:
    # password, sslpassword: libpq's two secret parameters.
    return key.strip().lower().endswith("password")


def _redact_value(key: str, value: str) -> str:
    if _secret(key):
        return HIDDEN
    if "://" in value:
        return redact_text(value)
    return value


def _keywords(dsn: str) -> list[tuple[str, str]] | None:
    """The (key, raw value) pairs of a key/value DSN, or None if it is not one."""
    pairs: list[tuple[str, str]] = []
    position = 0
    while dsn[position:].strip():
        key = _KEYWORD.match(dsn, position)
        value = _VALUE.match(dsn, key.end()) if key else None
        if key is None or value is None:
            return None
        pairs.append((key["key"], value[0]))
        position = value.end()
    return pairs or None


def _redact_match(match: re.Match[str]) -> str:
    if match["url"] is not None:
        return redact(match["url"])
    return f"{match['key']}{HIDDEN}"


def _passwords(dsn: str) -> Iterator[str]:
    """The password(s) in a URL DSN, as written and decoded, long enough to search for."""
    url = _URL.fullmatch(dsn)
    if url is None:
        return
    userinfo, _, query = _url_pieces(url["rest"])
    found = [] if userinfo is None else [userinfo.partition(":")[2]]
    params = (param.partition("=") for param in (query or "").split("&"))
    found += [value for key, _, value in params if _secret(unquote(key))]
    for password in found:
        for form in {password, unquote(password)}:
            if len(form) >= _SEARCHED_PASSWORD:
                yield form
