"""Postgres DSN helpers: never show a password, and point a DSN at another database."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# user:password@ in a URL; the user is kept so operators can still tell DSNs apart.
_PASSWORD = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@]*):[^@]*@", re.IGNORECASE)
# password=... in a URL query or a key/value DSN.
_PASSWORD_PARAM = re.compile(r"(?P<key>\bpassword\s*=\s*)(?P<value>'[^']*'|[^\s&]+)", re.IGNORECASE)


def redact(dsn: str) -> str:
    """The DSN with any password replaced by ***, safe to print or log."""
    shown = _PASSWORD.sub(r"\g<scheme>\g<user>:***@", dsn)
    return _PASSWORD_PARAM.sub(r"\g<key>***", shown)


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database (URL-form DSNs only)."""
    parts = urlsplit(dsn)
    if not parts.scheme.startswith("postgres"):
        raise ValueError(f"not a postgres:// URL: {redact(dsn)}")
    return urlunsplit(parts._replace(path=f"/{database}"))
