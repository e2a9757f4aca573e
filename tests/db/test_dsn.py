"""DSNs: problem() explains without quoting, redact() hides every password, pool errors too."""

from __future__ import annotations

import io
import json
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote

import pytest
import structlog

from orchestrator import logs
from orchestrator.db import dsn as dsn_module
from orchestrator.db import pool
from orchestrator.db.dsn import UNPARSEABLE, problem, redact, redact_text, with_database

FRAGMENT = 3
HASH_DSN = "postgresql://admin:PWha#sh1@127.0.0.1:1/db"


@dataclass(frozen=True)
class Case:
    """A DSN, the secrets in it as written, and whether problem() must accept it."""

    dsn: str
    secrets: tuple[str, ...]
    usable: bool
    host: str | None = "db.example"  # None: the DSN cannot be parsed, so nothing is shown


CASES = [
    Case(HASH_DSN, ("PWha#sh1",), usable=False, host="127.0.0.1:1"),
    Case("postgresql://admin:QRst?uvWX@db.example:5432/app", ("QRst?uvWX",), usable=False),
    Case("postgresql://admin:QRst/uvWX@db.example/app", ("QRst/uvWX",), usable=False),
    Case("postgresql://admin:QR@stuVW@db.example/app", ("QR@stuVW",), usable=False),
    Case("postgresql://admin:QR:stUVW@db.example/app", ("QR:stUVW",), usable=True),
    Case("postgresql://admin:QR%stUVW@db.example/app", ("QR%stUVW",), usable=False),
    Case("postgresql://admin:QR&st=UVW@db.example/app", ("QR&st=UVW",), usable=True),
    Case("postgresql://admin:QR stUVW@db.example/app", ("QR stUVW",), usable=False),
    Case("postgresql://admin:QR'stUVW@db.example/app", ("QR'stUVW",), usable=True),
    Case("postgresql://admin:Q#R?S/T@U:V@db.example/app", ("Q#R?S/T@U:V",), usable=False),
    Case(
        "postgresql://admin:QR%23st%3FUV%2FWX%40YZ%25@db.example/app",
        ("QR%23st%3FUV%2FWX%40YZ%25",),
        usable=True,
    ),
    Case(
        "postgresql://admin@db.example/app?password=QRst%26UVwx&sslmode=require",
        ("QRst%26UVwx",),
        usable=True,
    ),
    Case(
        "postgresql://admin@db.example/app?sslmode=require&password=QRs#tUVw",
        ("QRs#tUVw",),
        usable=False,
    ),
    Case(
        "postgresql://admin:QRstUVwx@db.example/app?sslpassword=KLmnOPqr",
        ("QRstUVwx", "KLmnOPqr"),
        usable=True,
    ),
    Case(
        "postgresql://admin:QR#stUV@h1.example:5432,db.example:5433/app",
        ("QR#stUV",),
        usable=False,
    ),
    Case("host=db.example user=admin password='QR s\\'tUV' dbname=app", ("QR s\\'tUV",), False),
    Case("host=db.example password=QRst\\ UVwx user=admin", ("QRst\\ UVwx",), usable=False),
    Case("host=db.example password='QRsX UVwx", ("QRsX UVwx",), usable=False, host=None),
]


def fragments(secret: str) -> Iterator[str]:
    """Every piece of `secret` (as written and decoded) that would say too much if shown."""
    for form in {secret, unquote(secret)}:
        for start in range(len(form) - FRAGMENT + 1):
            yield form[start : start + FRAGMENT]


def assert_hidden(text: str, case: Case) -> None:
    """No piece of any of the case's secrets appears in `text`."""
    for secret in case.secrets:
        leaked = [piece for piece in fragments(secret) if piece in text]
        assert not leaked, f"{text!r} shows {leaked}"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.dsn)
def test_redact_shows_no_piece_of_any_password(case: Case) -> None:
    """redact() leaves no three characters of a password, whatever it holds."""
    assert_hidden(redact(case.dsn), case)


@pytest.mark.parametrize("case", [c for c in CASES if c.host], ids=lambda c: c.dsn)
def test_redact_keeps_user_and_host(case: Case) -> None:
    """The user and host stay visible, so operators can still tell DSNs apart."""
    shown = redact(case.dsn)
    assert "admin" in shown
    assert str(case.host) in shown


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.dsn)
def test_problem_never_echoes_the_password(case: Case) -> None:
    """problem() accepts exactly the usable DSNs and never quotes a password or the DSN."""
    reason = problem(case.dsn)
    assert (reason is None) == case.usable, reason
    if reason is not None:
        assert_hidden(reason, case)
        assert case.dsn not in reason


@pytest.mark.parametrize(
    "dsn",
    [
        HASH_DSN,
        "postgresql://admin:QRst?uvWX@db.example/app",
        "postgresql://admin:QRst/uvWX@db.example/app",
        "postgresql://admin:QR@stuVW@db.example/app",
        "postgresql://admin:QR%stUVW@db.example/app",
    ],
)
def test_unencoded_specials_ask_for_percent_encoding(dsn: str) -> None:
    """A literal '#', '?', '/', '@' or '%' in a password is reported as needing encoding."""
    assert "percent-encode" in (problem(dsn) or "")


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://admin:pw@db.example:99999/app",
        "postgresql://admin:pw@db.example:abc/app",
        "postgresql://admin:pw@db.example:0/app",
        "postgresql://admin:pw@db.example:+543/app",
        "postgresql://admin:pw@h1.example:5432,h2.example:abc/app",
        "postgresql://admin:pw@[::1]:70000/app",
        "postgresql://admin:pw@db.example/app?port=70000",
    ],
)
def test_ports_must_be_integers_in_range(dsn: str) -> None:
    """A port outside 1..65535, or not a plain integer, in any host of a list is refused."""
    assert "port" in (problem(dsn) or "")


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://admin:pw@db.example/app",
        "postgres://admin@db.example:5432/app?sslmode=verify-full",
        "postgresql://admin:pw@h1.example:5432,h2.example:5433/app?target_session_attrs=any",
        "postgresql://admin:pw@[::1]:5432/app",
        "postgresql://postgres:@/postgres?host=/tmp/pg-socket-dir",
        "postgresql://postgres:@/postgres?host=/home/me/My Backups/pg",
        "postgresql://postgres:@/postgres?host=/srv/a@b/100%/pg",
        "postgresql:///app",
    ],
)
def test_ordinary_dsns_are_usable(dsn: str) -> None:
    """Multi-host lists, IPv6, sockets (even odd embedded-server paths) and the usual forms pass."""
    assert problem(dsn) is None


@pytest.mark.parametrize(
    ("dsn", "words"),
    [
        ("postgresql://admin:pw@db.example/app?sslmode=bogus", "sslmode"),
        ("mysql://admin:pw@db.example/app", "postgresql://"),
        ("host=db.example password=pw", "key/value"),
        ("postgresql://admin:pw@db.example/app?target_session_attrs=bogus", "asyncpg"),
        ("postgresql://admin:pw@db.example/app?oops", "query"),
        ("postgresql://admin:pw@h1.example,/app", "empty host"),
        ("postgresql://admin@db.example/app?password=QR%20st UV", "space"),
        ("postgresql://admin:pw@db.example/app\n", "control"),
        ("postgresql://admin:pw@db.example/a@pp", "'@'"),
    ],
)
def test_other_problems_are_named(dsn: str, words: str) -> None:
    """Bad sslmode, scheme, form, asyncpg-only rules, query and host lists each get a reason."""
    assert words in (problem(dsn) or "")


def test_unparseable_key_value_dsn_becomes_a_placeholder() -> None:
    """A DSN redact() cannot parse is replaced whole rather than risk a fragment."""
    assert redact("host=db.example password='QRsX UVwx") == UNPARSEABLE
    assert redact("not a dsn") == UNPARSEABLE


def test_redact_keeps_the_known_short_form() -> None:
    """The usual DSN is shown as user:***@host:port/database, as messages always did."""
    assert (
        redact("postgresql://cvm:s3cret-pw@127.0.0.1:1/x") == "postgresql://cvm:***@127.0.0.1:1/x"
    )


def test_redact_text_hides_dsns_and_password_pairs_in_prose() -> None:
    """Free text loses URL passwords, password=value pairs and the given DSN's password."""
    text = (
        "connect to postgresql://admin:QRstUVwx@db.example/app failed; "
        "password='KL mnOP' tried; also saw QRstUVwx bare"
    )
    shown = redact_text(text, dsn="postgresql://admin:QRstUVwx@db.example/app")
    assert_hidden(shown, Case("", ("QRstUVwx", "KL mnOP"), usable=False))
    assert "db.example/app failed" in shown


def test_redact_text_leaves_plain_urls_alone() -> None:
    """URLs without credentials come through unchanged."""
    text = "POST https://cvm.tencentcloudapi.com/?Action=DescribeImages ok"
    assert redact_text(text) == text


def test_with_database_keeps_server_credentials_and_query() -> None:
    """Only the database changes; its name is percent-encoded."""
    got = with_database("postgresql://admin:p%40ss@db.example:5433/app?sslmode=require", "a b")
    assert got == "postgresql://admin:p%40ss@db.example:5433/a%20b?sslmode=require"


def test_with_database_refuses_a_bad_dsn_without_echo() -> None:
    """A DSN that cannot be used is refused by with_database without its password."""
    with pytest.raises(ValueError, match="percent-encode") as info:
        with_database(HASH_DSN, "other")
    assert_hidden(str(info.value), CASES[0])


def test_scrub_redacts_dsns_in_any_string_value() -> None:
    """The log processor redacts DSNs inside messages, not only whole-DSN values."""
    event = {"event": "db.failed", "error": f"could not use {HASH_DSN} now", "attempt": 2}
    scrubbed = logs.scrub(None, "error", event)
    assert_hidden(json.dumps(scrubbed), CASES[0])
    assert scrubbed["attempt"] == 2


def test_logged_exception_tracebacks_are_scrubbed() -> None:
    """A DSN in a logged exception's message is redacted in the rendered traceback."""
    stream = io.StringIO()
    logs.configure("json", "info", stream)
    try:
        try:
            raise RuntimeError(f"boom at {HASH_DSN}")
        except RuntimeError:
            structlog.get_logger().exception("db.crashed")
    finally:
        structlog.reset_defaults()
    line = json.loads(stream.getvalue())
    assert "boom at postgresql://admin:***@" in line["exception"]
    assert_hidden(stream.getvalue(), CASES[0])


def assert_opaque(exc: BaseException, case: Case) -> None:
    """`exc` and its whole printed traceback show no piece of the password."""
    assert exc.__context__ is None or exc.__suppress_context__
    assert exc.__cause__ is None
    assert_hidden("".join(traceback.format_exception(exc)), case)


async def test_connecting_with_a_hash_in_the_password_hides_it() -> None:
    """Connecting with a raw '#' in the password raises our error with no piece of it."""
    with pytest.raises(pool.DatabaseMisconfigured) as info:
        await pool.connect_dsn(HASH_DSN)
    assert "percent-encode" in str(info.value)
    assert_opaque(info.value, CASES[0])


async def test_creating_a_pool_with_a_hash_in_the_password_hides_it() -> None:
    """Pool creation refuses the same DSN the same way."""
    with pytest.raises(pool.DatabaseMisconfigured) as info:
        await pool.create_pool_dsn(HASH_DSN)
    assert_opaque(info.value, CASES[0])


async def test_asyncpg_parse_errors_are_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even past our checks, asyncpg's fragment-quoting parse error never surfaces."""
    monkeypatch.setattr(pool, "problem", lambda _dsn: None)
    with pytest.raises(pool.DatabaseMisconfigured, match="ValueError") as info:
        await pool.connect_dsn(HASH_DSN)
    assert info.value.__context__ is None
    assert_opaque(info.value, CASES[0])


async def test_unreachable_server_names_the_redacted_dsn() -> None:
    """A refused connection is DatabaseUnavailable naming user and host, not the password."""
    case = Case("postgresql://admin:QR%23stUVW@127.0.0.1:1/app", ("QR%23stUVW",), usable=True)
    with pytest.raises(pool.DatabaseUnavailable) as info:
        await pool.connect_dsn(case.dsn)
    assert "postgresql://admin:***@127.0.0.1:1/app is unreachable" in str(info.value)
    assert info.value.__context__ is None
    assert_opaque(info.value, case)


def test_problem_survives_a_missing_asyncpg_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should asyncpg drop its private parser, our own checks still decide."""
    from asyncpg import connect_utils

    monkeypatch.delattr(connect_utils, "_parse_connect_dsn_and_args")
    assert problem("postgresql://admin:pw@db.example/app") is None
    assert problem(HASH_DSN) is not None
    assert dsn_module.problem("postgresql://admin:pw@db.example:0/app") is not None
