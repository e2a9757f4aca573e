"""A tiny loopback fake of the Tencent Cloud API, for client unit behaviour only.

Each action answers from a script of steps (first in, first out) and, when the script is empty,
from a default handler. Every request is recorded with its headers and body.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

Json = dict[str, Any]
Step = Callable[[web.Request, Json], Awaitable[web.StreamResponse]]

_ids = itertools.count(1)


def request_id() -> str:
    """A fresh request id."""
    return f"req-{next(_ids):06d}"


def answer(body: Json) -> web.Response:
    """A 200 JSON answer with exactly the content type Tencent sends."""
    return web.Response(body=json.dumps(body).encode(), content_type="application/json")


def ok(**fields: Any) -> Step:
    """A success carrying `fields` and a RequestId."""

    async def step(_: web.Request, __: Json) -> web.StreamResponse:
        return answer({"Response": {**fields, "RequestId": request_id()}})

    return step


def error(code: str, message: str = "fake error") -> Step:
    """A Tencent error answer (HTTP 200, as the real API does)."""

    async def step(_: web.Request, __: Json) -> web.StreamResponse:
        err = {"Code": code, "Message": message}
        return answer({"Response": {"Error": err, "RequestId": request_id()}})

    return step


def http(status: int, body: bytes = b"upstream trouble") -> Step:
    """A non-200 HTTP answer."""

    async def step(_: web.Request, __: Json) -> web.StreamResponse:
        return web.Response(status=status, body=body)

    return step


def raw(body: bytes) -> Step:
    """A 200 with an arbitrary body."""

    async def step(_: web.Request, __: Json) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    return step


def drop() -> Step:
    """Close the connection without answering."""

    async def step(request: web.Request, _: Json) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    return step


def hang(release: asyncio.Event) -> Step:
    """Answer nothing until `release` is set (the client times out first)."""

    async def step(_: web.Request, __: Json) -> web.StreamResponse:
        await release.wait()
        return answer({"Response": {"RequestId": request_id()}})

    return step


@dataclass(frozen=True)
class Received:
    """One request as the fake saw it."""

    action: str
    headers: CIMultiDict[str]
    body: bytes

    @property
    def params(self) -> Json:
        """The JSON body."""
        data: Json = json.loads(self.body)
        return data


def paginated(key: str, items: Sequence[Json], id_key: str, ids_param: str) -> Step:
    """A Describe* handler over `items`: ids or Offset/Limit, with an exact TotalCount."""

    async def step(_: web.Request, params: Json) -> web.StreamResponse:
        chosen = list(items)
        if ids_param in params:
            chosen = [i for i in items if i[id_key] in params[ids_param]]
        for f in params.get("Filters", ()):
            if f["Name"] == "image-name":  # fuzzy, like the real API
                chosen = [i for i in chosen if any(v in i["ImageName"] for v in f["Values"])]
        offset, limit = params.get("Offset", 0), params.get("Limit", 20)
        page = chosen[offset : offset + limit]
        return answer(
            {"Response": {key: page, "TotalCount": len(chosen), "RequestId": request_id()}}
        )

    return step


class FakeApi:
    """The fake server; `url` is its endpoint once started."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.scripts: dict[str, deque[Step]] = {}
        self.defaults: dict[str, Step] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None

    def script(self, action: str, *steps: Step) -> None:
        """Queue answers for the next calls of `action`."""
        self.scripts.setdefault(action, deque()).extend(steps)

    def calls(self, action: str) -> list[Received]:
        """The requests received for `action`."""
        return [r for r in self.received if r.action == action]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        action = request.headers.get("X-TC-Action", "")
        body = await request.read()
        self.received.append(Received(action, CIMultiDict(request.headers), body))
        script = self.scripts.get(action)
        step = script.popleft() if script else self.defaults.get(action, ok())
        return await step(request, json.loads(body))

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Stop listening and close connections."""
        if self._runner is not None:
            await self._runner.cleanup()
