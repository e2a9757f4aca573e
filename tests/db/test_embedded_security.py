"""The embedded server is reachable only by the daemon's own user, and widens no directory."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from orchestrator.db import embedded
from orchestrator.errors import UsageError
from tests.fixtures.pg import run_async

CLI = str(Path(sys.executable).parent / "cvm-backup")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: connects as user nobody (setuid), and root is where pgserver widened "
    "ancestors and moved the socket",
)

Modes = dict[Path, tuple[int, int, int]]


def _modes(*paths: Path) -> Modes:
    """Mode, owner and group of each path and all its ancestors."""
    found: Modes = {}
    for path in paths:
        for p in (path, *path.parents):
            if p.exists():
                info = p.stat()
                found[p] = (info.st_mode, info.st_uid, info.st_gid)
    return found


def _nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    try:
        gid = grp.getgrnam("nogroup").gr_gid
    except KeyError:
        gid = entry.pw_gid
    return entry.pw_uid, gid


def _connect_as_nobody(dsn: str) -> str:
    """What a connection attempt as user nobody ends with: "connected" or the error."""
    # A forked child, not a subprocess: nobody may not be able to reach any Python or psql
    # binary (a 0700 /root holding pyenv), which would fail for the wrong reason.
    uid, gid = _nobody()
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        child = os.fork()
    if child == 0:
        outcome = "child failed"
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

            async def attempt() -> str:
                conn = await asyncpg.connect(dsn, timeout=5)
                await conn.close()
                return "connected"

            try:
                outcome = asyncio.run(attempt())
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write_end, outcome.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(child, 0)
    return outcome


async def _query(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


def _socket_path(server: embedded.EmbeddedServer) -> Path:
    return server.socket_dir / f".s.PGSQL.{embedded.PORT}"


@pytest.fixture
def serve() -> Iterator[list[embedded.EmbeddedServer]]:
    """Servers a test starts (append them); each is left and must be stopped afterwards."""
    servers: list[embedded.EmbeddedServer] = []
    yield servers
    for server in servers:
        server.cleanup()
        assert _stopped(server.pid), f"the server of {server.pgdata} is still running"


def _stopped(pid: int) -> bool:
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return True
    return bool(status == psutil.STATUS_ZOMBIE)


def _assert_private(server: embedded.EmbeddedServer) -> None:
    """Socket directory 0700 and ours, socket 0700, no TCP, pg_hba without trust or host."""
    info = server.socket_dir.lstat()
    assert stat.S_ISDIR(info.st_mode)
    assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, os.geteuid())
    assert stat.S_IMODE(_socket_path(server).stat().st_mode) == 0o700
    assert stat.S_IMODE(server.pgdata.stat().st_mode) == 0o700
    rows = run_async(
        lambda: _query(
            server.get_uri(),
            "SELECT type, auth_method, current_setting('listen_addresses') AS listen,"
            " current_user AS who FROM pg_hba_file_rules",
        )
    )
    assert [(r["type"], r["auth_method"], r["listen"], r["who"]) for r in rows] == [
        ("local", "peer", "", "postgres")
    ]
    assert psutil.Process(server.pid).net_connections(kind="inet") == []


@needs_root
def test_private_home_is_unreachable_by_nobody(
    tmp_path: Path, serve: list[embedded.EmbeddedServer]
) -> None:
    """A 0700 home: socket in the 0700 data dir, nobody cannot connect, no ancestor changed."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    home = private / "home"
    home.mkdir(mode=0o700)
    before = _modes(home, embedded.bin_dir())

    server = embedded.start(home, cleanup_mode="stop")
    serve.append(server)

    assert server.socket_dir == home / "pgdata"
    _assert_private(server)
    outcome = _connect_as_nobody(server.get_uri())
    assert outcome.startswith("PermissionError"), outcome
    server.cleanup()
    assert _modes(home, embedded.bin_dir()) == before


@needs_root
def test_long_home_puts_the_socket_in_a_private_directory(
    tmp_path: Path, serve: list[embedded.EmbeddedServer]
) -> None:
    """A home too long for a socket path: a fresh 0700 directory, nobody cannot connect."""
    home = tmp_path / ("d" * 100) / "home"
    assert len(os.fsencode(home / "pgdata" / ".s.PGSQL.5432")) > embedded.SOCKET_PATH_MAX
    before = _modes(home.parent, embedded.bin_dir(), Path(tempfile.gettempdir()))

    server = embedded.start(home, cleanup_mode="stop")
    serve.append(server)

    assert server.socket_dir != home / "pgdata"
    assert server.socket_dir.name.startswith(embedded.SOCKET_PREFIX)
    _assert_private(server)
    outcome = _connect_as_nobody(server.get_uri())
    assert outcome.startswith("PermissionError"), outcome
    socket_dir = server.socket_dir
    server.cleanup()
    assert not socket_dir.exists()
    after = _modes(home.parent, embedded.bin_dir(), Path(tempfile.gettempdir()))
    assert {p: m for p, m in after.items() if p in before} == before


@needs_root
def test_peer_auth_refuses_other_users_even_on_an_open_socket(
    serve: list[embedded.EmbeddedServer],
) -> None:
    """Second line of defence: with the socket opened to all, nobody still gets no login."""
    base = Path(tempfile.mkdtemp(prefix="cvmbk-peer-"))
    try:
        if any(not p.stat().st_mode & stat.S_IXOTH for p in base.parents):
            pytest.skip(f"an ancestor of {base} is not searchable by others")
        server = embedded.start(base / "home", cleanup_mode="stop")
        serve.append(server)
        # Open every door nobody would need: only pg_hba.conf is left to keep it out.
        for directory in (base, base / "home", server.pgdata):
            directory.chmod(0o711)
        _socket_path(server).chmod(0o777)
        try:
            outcome = _connect_as_nobody(server.get_uri())
        finally:
            server.pgdata.chmod(0o700)
        assert outcome.startswith("InvalidAuthorizationSpecificationError"), outcome
        assert "peer authentication failed" in outcome.lower(), outcome
    finally:
        for started in serve:  # before its directory goes
            started.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def _serve_as_nobody(home: Path, report: int, proceed: int) -> None:
    """Child of a fork: as nobody, start on `home`, report the DSN and our own login's user,
    wait for the parent, leave the server. Never returns."""
    outcome = "child failed"
    try:
        uid, gid = _nobody()
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        server = embedded.start(home, cleanup_mode="stop")
        try:
            user = run_async(lambda: _query(server.get_uri(), "SELECT current_user AS u"))[0]["u"]
            os.write(report, f"{server.get_uri()} {user}\n".encode())
            os.read(proceed, 1)
        finally:
            server.cleanup()
        outcome = "stopped" if embedded._running_postmaster(server.pgdata) is None else "running"
    except BaseException as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        os.write(report, outcome.encode())
        os._exit(0)


@needs_root
def test_unprivileged_user_gets_a_server_that_refuses_root() -> None:
    """Run as nobody: no namespace needed, nobody logs in, root (another user) is refused."""
    if any(not p.stat().st_mode & stat.S_IXOTH for p in embedded.bin_dir().parents):
        pytest.skip(f"nobody cannot reach {embedded.bin_dir()}")
    embedded.bundled_major_version()  # cached before the fork, as root
    base = Path(tempfile.mkdtemp(prefix="cvmbk-nobody-"))
    os.chown(base, *_nobody())
    report_r, report_w = os.pipe()
    proceed_r, proceed_w = os.pipe()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
            child = os.fork()
        if child == 0:
            _serve_as_nobody(base / "home", report_w, proceed_r)
        os.close(report_w)
        with os.fdopen(report_r, "rb") as report:
            first = report.readline().decode()
            try:
                dsn, user = first.split()
            except ValueError:
                pytest.fail(f"the child as nobody failed: {first}{report.read().decode()}")
            with pytest.raises(
                asyncpg.InvalidAuthorizationSpecificationError,
                match=r"[Pp]eer authentication failed",
            ):
                run_async(lambda: _query(dsn, "SELECT 1"))
            os.write(proceed_w, b"x")
            outcome = report.read().decode()
        os.waitpid(child, 0)
        assert (user, outcome) == ("postgres", "stopped")
    finally:
        os.close(proceed_w)
        os.close(proceed_r)
        shutil.rmtree(base, ignore_errors=True)


def test_other_major_version_is_refused_with_how_to_upgrade(tmp_path: Path) -> None:
    """A PG_VERSION of another major: UsageError (CLI exit 2) naming pg_dump, pg_upgrade, mv."""
    home = tmp_path / "home"
    pgdata = home / "pgdata"
    pgdata.mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text("16\n")
    with pytest.raises(UsageError) as refused:
        embedded.start(home)
    message = str(refused.value)
    for needed in ("PostgreSQL 16", f"PostgreSQL {embedded.bundled_major_version()}"):
        assert needed in message
    for needed in ("pg_dump", "pg_upgrade", f"mv {pgdata} {pgdata}.pg16", "docs/embedded-postgres"):
        assert needed in message
    assert sorted(p.name for p in pgdata.iterdir()) == ["PG_VERSION"]

    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env["CVM_BACKUP_HOME"] = str(home)
    done = subprocess.run(
        [CLI, "policy", "list"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    assert "PostgreSQL 16 data directory" in done.stderr


def test_home_writable_by_others_is_refused(tmp_path: Path) -> None:
    """A group/other-writable home is refused (chmod go-w named) and nothing is created in it."""
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o777)
    with pytest.raises(UsageError, match="chmod go-w"):
        embedded.start(home)
    assert list(home.iterdir()) == []
    assert stat.S_IMODE(home.stat().st_mode) == 0o777
