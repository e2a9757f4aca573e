"""The daemon under test: `python -m orchestrator run [--once]` as its own process.

A subprocess keeps the measurement honest: the daemon's memory and CPU are its own, not shared
with the simulator or the bench, and it is started exactly as a user starts it (environment,
config file, JSON logs on stderr).
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.bench.simside import SECRET_ID, SECRET_KEY

# Variables of the caller's own setup that must not leak into the daemon under test.
_DROPPED_PREFIXES = ("CVM_BACKUP_", "TENCENTCLOUD_", "DATABASE_URL")
_PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
_STOP_GRACE = 30.0


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """What the daemon's CVM_BACKUP_CONFIG file sets beyond the product defaults."""

    settings: Mapping[str, float] = field(default_factory=dict)
    limits: Mapping[str, int] = field(default_factory=dict)
    retry: Mapping[str, float] = field(default_factory=dict)
    log_level: str = "info"

    def toml(self) -> str:
        """The config file's text."""
        lines = ['log_format = "json"', f'log_level = "{self.log_level}"']
        lines.extend(f"{key} = {value!r}" for key, value in self.settings.items())
        for table, values in (("limits", self.limits), ("retry", self.retry)):
            if values:
                lines.append(f"[{table}]")
                lines.extend(f"{key} = {value!r}" for key, value in values.items())
        return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Memory:
    """Resident memory of a process, in MiB: now and its high-water mark."""

    rss: float
    peak: float


def read_memory(pid: int) -> Memory | None:
    """VmRSS and VmHWM from /proc (Linux); None when unavailable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        rss, peak = (int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))
    except (KeyError, ValueError):
        return None
    return Memory(rss=round(rss, 1), peak=round(peak, 1))


def children_cpu() -> float:
    """CPU seconds (user + system) of every child this process has reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def daemon_env(
    dsn: str,
    endpoint: str,
    config: Path,
    home: Path,
    *,
    secret_id: str = SECRET_ID,
    secret_key: str = SECRET_KEY,
) -> dict[str, str]:
    """A daemon's environment: the given database and simulator, simulator-only keys.

    Nothing of the caller's own cvm-backup, Tencent, database or proxy settings leaks in.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_DROPPED_PREFIXES) and k not in _PROXIES
    }
    env.update(
        CVM_BACKUP_DATABASE_URL=dsn,
        CVM_BACKUP_ENDPOINT=endpoint,
        CVM_BACKUP_CONFIG=str(config),
        CVM_BACKUP_HOME=str(home),
        CVM_BACKUP_LOG_FORMAT="json",
        TENCENTCLOUD_SECRET_ID=secret_id,
        TENCENTCLOUD_SECRET_KEY=secret_key,
    )
    return env


class Daemon:
    """One daemon process: started, watched, stopped; its log kept in `workdir`."""

    def __init__(
        self, workdir: Path, name: str, dsn: str, endpoint: str, config: DaemonConfig
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"daemon-{name}.log"
        config_path = workdir / f"daemon-{name}.toml"
        config_path.write_text(config.toml(), encoding="utf-8")
        self._env = daemon_env(dsn, endpoint, config_path, workdir)
        self._proc: asyncio.subprocess.Process | None = None
        self._cpu_before = 0.0
        self.started_at = 0.0  # wall clock, when the process was spawned
        self.cpu_seconds: float | None = None

    @property
    def pid(self) -> int:
        """The process id (started daemons only)."""
        assert self._proc is not None, "the daemon was not started"
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self, *, once: bool) -> None:
        """Spawn `python -m orchestrator run [--once]`."""
        args = ["-m", "orchestrator", "run", *(["--once"] if once else [])]
        self._cpu_before = children_cpu()
        self.started_at = time.time()
        with self.log_path.open("ab") as sink:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *args,
                env=self._env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )

    def memory(self) -> Memory | None:
        """The process's memory right now."""
        return read_memory(self.pid) if self.running else None

    async def wait(self, within: float) -> int:
        """The exit code; the process is killed when it outlives `within` seconds."""
        assert self._proc is not None, "the daemon was not started"
        try:
            code = await asyncio.wait_for(self._proc.wait(), within)
        except TimeoutError:
            await self.kill()
            raise
        self.cpu_seconds = round(children_cpu() - self._cpu_before, 2)
        return code

    async def stop(self) -> int:
        """SIGTERM (graceful stop) and the exit code."""
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGTERM)
        return await self.wait(_STOP_GRACE)

    async def kill(self) -> None:
        """SIGKILL the process if it still runs, and reap it."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()

    def tail(self, lines: int = 20) -> str:
        """The end of the daemon's log, for error messages."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])
