"""Webhook notifications ([[notify]]): grouped per run, durable, never in a job's way, no leaks."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from orchestrator import config
from orchestrator.config import NotifySettings
from orchestrator.context import EngineContext
from orchestrator.daemon import Engine, Signals
from orchestrator.errors import UsageError
from orchestrator.notify import FORMATS, MAX_TARGETS, MAX_URL_LENGTH
from orchestrator.notify.task import Notifier
from orchestrator.simulator.config import SimConfig
from orchestrator.simulator.runner import Simulator
from tests.fixtures.engine import drain, insert_policy
from tests.fixtures.logs import LogCapture
from tests.fixtures.polling import wait_for
from tests.fixtures.sim import make_sim_config

FLEET = 12
FAILING = 8  # the first eight instances make images that end CREATEFAILED
# Tokens as the chat services put them: in the path (Feishu, Slack) and the query (WeCom, DingTalk).
PATH_TOKEN = "pAtHtOkEn0123456789abcdef"
QUERY_TOKEN = "qUeRyToKeN9876543210fedcba"
TERMINAL = ("succeeded", "failed", "expired", "skipped")


@pytest.fixture
def sim_config() -> SimConfig:
    """Twelve instances; the first eight end CREATEFAILED, so their jobs fail."""
    base = make_sim_config(FLEET)
    instances = tuple(
        replace(instance, behaviour="fail") if n < FAILING else instance
        for n, instance in enumerate(base.instances)
    )
    return replace(base, instances=instances)


@dataclass(frozen=True)
class Received:
    """One POST the receiver took."""

    path: str
    query: str
    body: Any


class Receiver:
    """A webhook receiver on loopback that answers as each chat service does (by path prefix).

    `modes` picks a behaviour per first path segment (else `mode`): `ok`; `error` (HTTP 500
    whose body quotes the request's path and query, token included); `missing` (HTTP 404);
    `hang` (no answer until `release`). It is down until `start` and after `stop`.
    """

    def __init__(self) -> None:
        self.port = _free_port()
        self.mode = "ok"
        self.modes: dict[str, str] = {}
        self.received: list[Received] = []
        self.attempts = 0
        self.hanging = 0
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    def url(self, path: str) -> str:
        """A webhook URL at this receiver, with a path token and a query token."""
        return f"http://127.0.0.1:{self.port}{path}/{PATH_TOKEN}?key={QUERY_TOKEN}"

    async def start(self) -> None:
        """Start listening (again)."""
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Stop listening; hanging requests are released first."""
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def release(self) -> None:
        """Let hanging requests be answered (as `ok`)."""
        self.mode = "ok"
        self.modes.clear()
        self._release.set()

    def bodies(self, prefix: str) -> list[Any]:
        """The bodies taken at paths under /prefix."""
        return [r.body for r in self.received if r.path.split("/")[1] == prefix]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.attempts += 1
        body = await request.json()
        prefix = request.path.split("/")[1]
        mode = self.modes.get(prefix, self.mode)
        if mode == "hang":
            self.hanging += 1
            await self._release.wait()
        elif mode == "error":
            return web.Response(status=500, text=f"cannot take {request.path_qs}")
        elif mode == "missing":
            return web.Response(status=404, text="no_service")
        self.received.append(Received(request.path, request.query_string, body))
        return _answer(prefix)


def _answer(prefix: str) -> web.Response:
    if prefix in {"wecom", "dingtalk"}:
        return web.json_response({"errcode": 0, "errmsg": "ok"})
    if prefix == "feishu":
        return web.json_response({"code": 0, "msg": "success", "data": {}})
    return web.Response(text="ok")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A receiver that is not listening yet (tests start it); stopped at the end."""
    made = Receiver()
    yield made
    await made.stop()


def _targets(receiver: Receiver, *formats: str, **changes: Any) -> tuple[NotifySettings, ...]:
    return tuple(
        NotifySettings(url=receiver.url(f"/{fmt}/hook"), format=fmt, name=fmt, **changes)
        for fmt in formats or FORMATS
    )


def _with(ctx: EngineContext, targets: tuple[NotifySettings, ...]) -> EngineContext:
    return replace(ctx, settings=replace(ctx.settings, notify=targets))


@asynccontextmanager
async def _daemon(ctx: EngineContext) -> AsyncIterator[Engine]:
    """The engine as a daemon (scheduler included), stopped as SIGTERM would."""
    signals = Signals()
    engine = Engine(ctx, signals)
    running = asyncio.create_task(engine.run())
    try:
        yield engine
    finally:
        signals.stop.set()
        await asyncio.wait_for(running, 30)


async def _policy(pool: asyncpg.Pool, sim: Simulator) -> list[str]:
    ids = [i.instance_id for i in sim.config.instances]
    await insert_policy(pool, "nightly", instance_ids=ids)
    return ids


async def _count(pool: asyncpg.Pool, table: str) -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {table}"))


async def _run_completed(pool: asyncpg.Pool) -> bool:
    done = await pool.fetchval("SELECT count(*) FROM runs WHERE state = 'completed'")
    terminal = await pool.fetchval("SELECT count(*) FROM jobs WHERE state = ANY($1)", TERMINAL)
    return int(done) == 1 and int(terminal) == FLEET


def _logged(logs: LogCapture, event: str) -> list[dict[str, Any]]:
    return [line for line in logs.lines if line["event"] == event]


async def test_a_run_with_failures_is_one_message_per_target_in_each_format(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator, receiver: Receiver
) -> None:
    """Eight failed jobs of one run: one message per target, in each service's shape."""
    ids = await _policy(pg_pool, simulator)
    failing = ids[:FAILING]
    await receiver.start()
    assert await drain(_with(engine_ctx, _targets(receiver))) == 1  # some jobs failed
    await wait_for(lambda: _sizes(receiver, len(FORMATS)))
    assert sorted(r.path.split("/")[1] for r in receiver.received) == sorted(FORMATS)

    (generic,) = receiver.bodies("generic")
    assert generic["source"] == "cvm-backup"
    assert generic["counts"] == {"job.failed": FAILING}
    assert generic["total"] == FAILING
    assert generic["omitted"] == 0
    assert sorted(e["instance"] for e in generic["events"]) == sorted(failing)
    assert {e["code"] for e in generic["events"]} == {"ImageCreateFailed"}
    assert generic["run"]["policy"] == "nightly"
    assert generic["run"]["completed"] is True
    assert generic["run_jobs"] == {"succeeded": FLEET - FAILING, "failed": FAILING}

    (wecom,) = receiver.bodies("wecom")
    assert wecom["msgtype"] == "markdown"
    assert set(wecom["markdown"]) == {"content"}
    assert len(wecom["markdown"]["content"].encode()) <= 4096
    (dingtalk,) = receiver.bodies("dingtalk")
    assert dingtalk["msgtype"] == "markdown"
    assert set(dingtalk["markdown"]) == {"title", "text"}
    (feishu,) = receiver.bodies("feishu")
    assert feishu["msg_type"] == "text"
    assert set(feishu["content"]) == {"text"}
    (slack,) = receiver.bodies("slack")
    assert set(slack) == {"text"}
    for text in (
        wecom["markdown"]["content"],
        dingtalk["markdown"]["text"],
        feishu["content"]["text"],
        slack["text"],
    ):
        assert f"{FAILING} failed" in text
        assert "nightly" in text
        assert all(instance in text for instance in failing)
        assert not any(instance in text for instance in ids[FAILING:])
    # Delivered messages and consumed events leave nothing behind.
    assert await _count(pg_pool, "notify_outbox") == 0
    assert await _count(pg_pool, "notify_events") == 0


async def _sizes(receiver: Receiver, count: int) -> bool:
    return len(receiver.received) >= count


async def test_a_receiver_that_is_down_gets_the_message_once_it_is_back(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    receiver: Receiver,
    captured_logs: LogCapture,
) -> None:
    """Connection refused: retried with backoff while the daemon runs; delivered when it is up."""
    await _policy(pg_pool, simulator)
    async with _daemon(_with(engine_ctx, _targets(receiver, "generic"))):
        await wait_for(lambda: _run_completed(pg_pool))

        async def refused() -> bool:
            return len(_logged(captured_logs, "notify.failed")) >= 2

        await wait_for(refused)
        row = await pg_pool.fetchrow("SELECT attempts, last_error FROM notify_outbox")
        assert row is not None
        assert row["attempts"] >= 2
        assert "ClientConnectorError" in row["last_error"]
        await receiver.start()
        await wait_for(lambda: _sizes(receiver, 1))
    (message,) = receiver.bodies("generic")
    assert message["counts"] == {"job.failed": FAILING}
    assert _logged(captured_logs, "notify.sent")[0]["attempt"] >= 3
    assert await _count(pg_pool, "notify_outbox") == 0


async def test_undelivered_messages_survive_a_restart(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator, receiver: Receiver
) -> None:
    """`run --once` with the receiver down keeps the message; the next daemon sends it."""
    await _policy(pg_pool, simulator)
    ctx = _with(engine_ctx, _targets(receiver, "wecom"))
    assert await drain(ctx) == 1
    assert await _count(pg_pool, "notify_outbox") == 1
    assert receiver.received == []
    await receiver.start()
    async with _daemon(ctx):
        await wait_for(lambda: _sizes(receiver, 1))
    (message,) = receiver.bodies("wecom")
    assert f"{FAILING} failed" in message["markdown"]["content"]
    assert await _count(pg_pool, "notify_outbox") == 0


async def test_a_receiver_that_hangs_never_delays_the_jobs(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, simulator: Simulator, receiver: Receiver
) -> None:
    """While a POST hangs, a whole run is scheduled and finishes; its message follows later."""
    receiver.mode = "hang"
    await receiver.start()
    targets = _targets(receiver, "generic", group_delay=0.0, timeout=60.0)
    async with _daemon(_with(engine_ctx, targets)):
        # Something to send before any job exists: the sender is stuck in its POST from now on.
        await pg_pool.execute(
            "INSERT INTO events (kind, account, reason)"
            " VALUES ('account.resumed', 'default', 'operator')"
        )

        async def stuck() -> bool:
            return receiver.hanging == 1

        await wait_for(stuck)
        await _policy(pg_pool, simulator)
        await wait_for(lambda: _run_completed(pg_pool))
        # Every job reached its terminal state while the notifier waited on the receiver.
        assert receiver.hanging == 1
        assert receiver.received == []
        receiver.release()

        async def all_sent() -> bool:
            return _failures_sent(receiver) == FAILING

        await wait_for(all_sent)
    first, *rest = receiver.bodies("generic")
    assert first["counts"] == {"account.resumed": 1}
    # group_delay 0: the run's failures went as they came, in one message or a few.
    assert all(set(body["counts"]) == {"job.failed"} for body in rest)


def _failures_sent(receiver: Receiver) -> int:
    return sum(body["counts"].get("job.failed", 0) for body in receiver.bodies("generic"))


async def test_secrets_in_the_url_never_reach_logs_or_the_database(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    receiver: Receiver,
    captured_logs: LogCapture,
) -> None:
    """Refusals that quote the URL, retries and the final send: no token in logs or rows."""
    receiver.mode = "error"  # answers 500 quoting the request's path and query
    await receiver.start()
    await _policy(pg_pool, simulator)
    async with _daemon(_with(engine_ctx, _targets(receiver, "generic", "feishu"))):

        async def refused() -> bool:
            return len(_logged(captured_logs, "notify.failed")) >= 4

        await wait_for(refused)
        rows = await pg_pool.fetch("SELECT * FROM notify_outbox")
        stored = " ".join(str(dict(row)) for row in rows)
        assert "HTTP 500" in stored
        receiver.release()
        await wait_for(lambda: _sizes(receiver, 2))
    events = await pg_pool.fetch("SELECT * FROM events")
    for text in (captured_logs.text, stored, " ".join(str(dict(e)) for e in events)):
        assert PATH_TOKEN not in text
        assert QUERY_TOKEN not in text
    failed = _logged(captured_logs, "notify.failed")[0]
    assert failed["host"] == f"127.0.0.1:{receiver.port}"
    assert failed["error"].startswith("HTTP 500: cannot take ")


async def test_a_permanent_refusal_or_the_time_bound_gives_the_message_up(
    engine_ctx: EngineContext,
    pg_pool: asyncpg.Pool,
    simulator: Simulator,
    receiver: Receiver,
    captured_logs: LogCapture,
) -> None:
    """A 404 is given up at once; 5xx answers are retried until give_up_after, then given up."""
    receiver.modes = {"generic": "missing", "slack": "error"}
    await receiver.start()
    await _policy(pg_pool, simulator)
    targets = (
        *_targets(receiver, "generic"),
        *_targets(receiver, "slack", give_up_after=1.0),
    )
    async with _daemon(_with(engine_ctx, targets)):

        async def both_given_up() -> bool:
            return len(_logged(captured_logs, "notify.gave_up")) == 2

        await wait_for(both_given_up)
    gave_up = {line["target"]: line for line in _logged(captured_logs, "notify.gave_up")}
    assert gave_up["generic"]["reason"] == "permanent"
    assert gave_up["generic"]["attempts"] == 1
    assert gave_up["generic"]["error"] == "HTTP 404: no_service"
    assert gave_up["slack"]["reason"] == "give_up_after"
    assert await _count(pg_pool, "notify_outbox") == 0
    assert receiver.received == []


async def test_other_events_are_grouped_into_one_message(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """A pause, a quota storm and a dead task: one message, repeats counted."""
    await receiver.start()
    ctx = _with(engine_ctx, _targets(receiver, "generic", "dingtalk", group_delay=0.5))
    notifier = Notifier(ctx)
    await pg_pool.execute(
        "INSERT INTO events (kind, account, region, reason, details) VALUES"
        " ('account.paused', 'default', NULL, 'AuthFailure.SecretIdNotFound',"
        '  \'{"message": "The SecretId is not found"}\')'
    )
    for _ in range(5):
        await pg_pool.execute(
            "INSERT INTO events (kind, account, region, reason) VALUES"
            " ('quota.exhausted', 'default', 'ap-guangzhou', 'nothing of ours to evict')"
        )
    await notifier.task_failed("tracker", "RuntimeError('boom')")
    stop = asyncio.Event()
    running = asyncio.create_task(notifier.run(stop))
    try:
        await wait_for(lambda: _sizes(receiver, 2))
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    (generic,) = receiver.bodies("generic")
    assert generic["counts"] == {"account.paused": 1, "quota.exhausted": 5, "daemon.task_failed": 1}
    assert generic["run"] is None
    (dingtalk,) = receiver.bodies("dingtalk")
    text = dingtalk["markdown"]["text"]
    assert "account default paused: AuthFailure.SecretIdNotFound" in text
    assert "(5 times)" in text
    assert "daemon task tracker failed" in text


async def test_a_storm_is_one_message_with_a_bounded_listing(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """Sixty failures of one run in two waves, each with a long error: one message that fits."""
    await receiver.start()
    # `once`: the final flush seals what is gathering, as at the end of `run --once`.
    ctx = _with(engine_ctx, _targets(receiver, "generic", "wecom"))
    notifier = Notifier(ctx, once=True)
    stop = asyncio.Event()
    running = asyncio.create_task(notifier.run(stop))
    try:
        for first in (1, 31):  # the second wave appends to the message the first one opened
            await pg_pool.execute(
                "INSERT INTO notify_events (kind, run_id, instance_id, code, message)"
                " SELECT 'job.failed', 77, 'ins-' || n, 'Code' || n, repeat('x', 400)"
                " FROM generate_series($1::int, $1::int + 29) n",
                first,
            )

            async def filed() -> bool:
                return await _count(pg_pool, "notify_events") == 0

            await wait_for(filed)
        assert receiver.received == []
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
    (generic,) = receiver.bodies("generic")
    assert generic["total"] == 60
    assert generic["counts"] == {"job.failed": 60}
    assert [e["instance"] for e in generic["events"]] == [f"ins-{n}" for n in range(1, 51)]
    assert generic["omitted"] == 10
    (wecom,) = receiver.bodies("wecom")
    content = wecom["markdown"]["content"]
    assert len(content.encode()) <= 4096
    assert "60 failed" in content
    assert "more lines cut to fit the message" in content


async def test_two_replicas_send_each_message_once(
    engine_ctx: EngineContext, pg_pool: asyncpg.Pool, receiver: Receiver
) -> None:
    """Two notifiers on one database: twenty messages, each delivered exactly once."""
    await receiver.start()
    ctx = _with(engine_ctx, _targets(receiver, "generic", group_delay=0.0))
    # Twenty runs' failures (the runs themselves are not needed to group them).
    await pg_pool.execute(
        "INSERT INTO notify_events (kind, run_id, instance_id, code)"
        " SELECT 'job.failed', 1000 + n, 'ins-' || n, 'InternalError' FROM generate_series(1, 20) n"
    )
    stop = asyncio.Event()
    replicas = [Notifier(ctx), Notifier(replace(ctx, worker_id="other:1:abc"))]
    running = [asyncio.create_task(n.run(stop)) for n in replicas]
    try:
        await wait_for(lambda: _sizes(receiver, 20))
        await asyncio.sleep(1.5)  # a double send would arrive within the next tick
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*running), 10)
    ids = [body["id"] for body in receiver.bodies("generic")]
    assert len(ids) == len(set(ids)) == 20
    assert await _count(pg_pool, "notify_outbox") == 0


# ---------------------------------------------------------------- configuration


def _load(tmp_path: Path, text: str) -> config.Settings:
    path = tmp_path / "cvm-backup.toml"
    path.write_text(text, encoding="utf-8")
    return config.load({"CVM_BACKUP_CONFIG": str(path)})


def test_a_notify_entry_reads_with_defaults(tmp_path: Path) -> None:
    """url and format are enough: every default event, a name derived without the URL."""
    url = f"https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key={QUERY_TOKEN}"
    settings = _load(tmp_path, f'[[notify]]\nurl = "{url}"\nformat = "wecom"\n')
    (target,) = settings.notify
    assert target.url == url
    assert target.format == "wecom"
    assert target.events == (
        "job.failed",
        "job.expired",
        "quota.exhausted",
        "account.paused",
        "account.resumed",
        "daemon.task_failed",
    )
    assert target.key.startswith("wecom-")
    assert QUERY_TOKEN not in target.key
    assert QUERY_TOKEN not in repr(settings)


BAD_ENTRIES: Mapping[str, tuple[str, str]] = {
    'url = "hooks.example.com/x"': ("notify[1].url", "must be an https:// URL"),
    f'url = "http://hooks.example.com/x?key={QUERY_TOKEN}"': (
        "notify[1].url",
        "plain http:// is only for a receiver on loopback",
    ),
    f'url = "https://bot:{QUERY_TOKEN}@hooks.example.com/x"': (
        "notify[1].url",
        "must not carry user information",
    ),
    f'url = "https://hooks.example.com/{"a" * MAX_URL_LENGTH}"': (
        "notify[1].url",
        f"must be at most {MAX_URL_LENGTH} characters",
    ),
    'url = "https://h.example.com/x"\nformat = "teams"': (
        "notify[1].format",
        "must be one of generic, wecom, dingtalk, feishu, slack, not string 'teams'",
    ),
    'url = "https://h.example.com/x"\nevents = ["job.failed", "job.exploded"]': (
        "notify[1].events",
        "unknown event string 'job.exploded'",
    ),
    'url = "https://h.example.com/x"\nevents = []': (
        "notify[1].events",
        "expected a non-empty array of at most 6 event names",
    ),
    'url = "https://h.example.com/x"\ntimeout = 0': (
        "notify[1].timeout",
        "must be greater than 0 and at most 60",
    ),
    'format = "slack"': ("notify[1].url", "missing"),
}


@pytest.mark.parametrize("entry", list(BAD_ENTRIES))
def test_a_bad_notify_entry_names_its_field_and_reason(tmp_path: Path, entry: str) -> None:
    """Each bad [[notify]] value is refused with its field and why, never echoing a token."""
    field, reason = BAD_ENTRIES[entry]
    with pytest.raises(UsageError) as caught:
        _load(tmp_path, f"[[notify]]\n{entry}\n")
    message = str(caught.value)
    assert f": {field}: " in message, message
    assert reason in message, message
    assert QUERY_TOKEN not in message


def test_more_targets_than_the_bound_are_refused(tmp_path: Path) -> None:
    """At most MAX_TARGETS [[notify]] entries; duplicates are named."""
    entry = '[[notify]]\nurl = "https://h.example.com/x"\n'
    with pytest.raises(UsageError, match=r"notify: expected at most 10 \[\[notify\]\] tables"):
        _load(tmp_path, entry * (MAX_TARGETS + 1))
    with pytest.raises(UsageError, match=r"notify\[2\]: duplicate of notify\[1\]"):
        _load(tmp_path, entry * 2)


def test_the_daemon_exits_2_on_a_bad_notify_entry(tmp_path: Path) -> None:
    """`run --once` with a plain-http webhook elsewhere: exit 2, field and reason, no traceback."""
    path = tmp_path / "cvm-backup.toml"
    path.write_text(
        f'[[notify]]\nname = "ops"\nurl = "http://hooks.example.com/x?key={QUERY_TOKEN}"\n',
        encoding="utf-8",
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CVM_BACKUP_", "TENCENTCLOUD_")) and k != "DATABASE_URL"
    }
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", "--once"],
        env={**env, "CVM_BACKUP_CONFIG": str(path), "CVM_BACKUP_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{path}: notify[1].url: plain http:// is only for a receiver on loopback" in done.stderr
    assert QUERY_TOKEN not in done.stderr + done.stdout
    assert not (tmp_path / "pgdata").exists()  # refused before any database was made
