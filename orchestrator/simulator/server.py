"""The HTTP face of the simulator: Tencent Cloud API 3.0 on `POST /`, inspection on `/_sim/`.

One call goes through: authenticate, pick the action, count it against the rate window, draw
its fault, run it, answer. Everything between reading the body and answering runs without an
await except the injected latency, so each action sees and changes the store atomically.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from orchestrator.simulator.apierror import ApiError
from orchestrator.simulator.auth import Verifier
from orchestrator.simulator.context import Action, CallContext, Json
from orchestrator.simulator.create_image import create_image
from orchestrator.simulator.denials import message
from orchestrator.simulator.faults import Decision, Fault, FaultInjector
from orchestrator.simulator.images import delete_images, describe_image_quota, describe_images
from orchestrator.simulator.instances import describe_instances
from orchestrator.simulator.params import parse_body
from orchestrator.simulator.records import Call
from orchestrator.simulator.state import SimState
from orchestrator.simulator.sync_images import sync_images

ACTIONS: dict[str, Action] = {
    "CreateImage": create_image,
    "DescribeImages": describe_images,
    "DeleteImages": delete_images,
    "DescribeImageQuota": describe_image_quota,
    "DescribeInstances": describe_instances,
    "SyncImages": sync_images,
}
# Exactly this: the SDK ignores error bodies served with any other Content-Type
# (docs/design.md#answers).
JSON_HEADERS = {"Content-Type": "application/json"}
API_VERSION = "2017-03-12"
DROPPED = "DROPPED"
HTTP_5XX = 502
STATE_KEY = web.AppKey("sim_state", SimState)
MAX_BODY = 1024 * 1024
_log = logging.getLogger(__name__)


def _answer(fields: Json, request_id: str) -> web.Response:
    body = json.dumps({"Response": {**fields, "RequestId": request_id}})
    return web.Response(body=body.encode(), headers=JSON_HEADERS)


def _error(error: ApiError, request_id: str) -> web.Response:
    return _answer({"Error": {"Code": error.code, "Message": error.message}}, request_id)


@dataclass(slots=True)
class _Call:
    """What is known about one call while it is being answered."""

    request: web.Request
    request_id: str
    action: str
    region: str
    account: str = ""


class ApiHandler:
    """Answers API 3.0 calls against one store."""

    __slots__ = ("_faults", "_state", "_verifier")

    def __init__(self, state: SimState, verifier: Verifier, faults: FaultInjector) -> None:
        self._state = state
        self._verifier = verifier
        self._faults = faults

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Handle one `POST /`: always an API answer, never aiohttp's bare HTTP 500."""
        call = _Call(
            request=request,
            request_id=str(uuid.uuid4()),
            action=request.headers.get("X-TC-Action", ""),
            region=request.headers.get("X-TC-Region", ""),
        )
        try:
            return await self._handle(call)
        except ConnectionError:
            raise  # the client is gone: nobody to answer
        except Exception:  # noqa: BLE001 - a simulator bug answers as Tencent's own would
            _log.exception("simulator: unexpected error in %s", call.action)
            return self._reply_error(call, _internal_error())

    async def _handle(self, call: _Call) -> web.StreamResponse:
        request = call.request
        try:
            body = await _read(request)
            decision = self._admit(call, body)
        except ApiError as error:
            return self._reply_error(call, error)
        if decision.latency:
            await asyncio.sleep(decision.latency)
        if decision.fault is not None and not decision.after:
            return self._inject(call, decision.fault)
        return self._run(call, body, decision)

    def _admit(self, call: _Call, body: bytes) -> Decision:
        call.account = self._verifier.verify(call.request.headers, body)
        if call.action not in ACTIONS:
            raise ApiError("InvalidAction", f"The action `{call.action}` is not supported.")
        version = call.request.headers.get("X-TC-Version", "")
        if version != API_VERSION:
            raise ApiError("NoSuchVersion", f"The API version `{version}` does not exist.")
        refusal = self._state.account_error(call.action, call.account, call.region)
        if refusal is not None:
            # Like Tencent: a refusal comes after authentication, before any work.
            raise ApiError(refusal, message(refusal, call.action, call.region))
        self._state.windows.admit(call.account, call.action)
        return self._faults.decide(call.action)

    def _run(self, call: _Call, body: bytes, decision: Decision) -> web.StreamResponse:
        try:
            fields = self._execute(call, body)
        except ApiError as error:
            answer, code = _error(error, call.request_id), error.code
        else:
            answer, code = _answer(fields, call.request_id), "OK"
        if decision.fault is not None:
            # The work is done; the client only learns of a failure, as when a real answer is
            # lost (docs/design.md#retries-in-the-official-sdk): what the crash tests need.
            return self._inject(call, decision.fault)
        self._record(call, code)
        return answer

    def _execute(self, call: _Call, body: bytes) -> Json:
        if not call.region:
            raise ApiError(
                "MissingParameter", "The request is missing a required parameter `Region`."
            )
        self._state.regions.check(call.region, call.action)
        context = CallContext(state=self._state, account=call.account, region=call.region)
        return ACTIONS[call.action](context, parse_body(body))

    def _inject(self, call: _Call, fault: Fault) -> web.StreamResponse:
        if fault is Fault.INTERNAL_ERROR:
            return self._reply_error(call, _internal_error())
        if fault is Fault.HTTP_5XX:
            self._record(call, f"HTTP{HTTP_5XX}")
            return web.Response(
                status=HTTP_5XX,
                text="<html><body>502 Bad Gateway</body></html>",
                content_type="text/html",
            )
        self._record(call, DROPPED)
        return _drop(call.request)

    def _reply_error(self, call: _Call, error: ApiError) -> web.Response:
        self._record(call, error.code)
        return _error(error, call.request_id)

    def _record(self, call: _Call, code: str) -> None:
        self._state.record_call(
            Call(call.action, call.account, call.region, code, call.request_id, self._state.now())
        )


def _internal_error() -> ApiError:
    return ApiError("InternalError", "An internal error occurred; please retry later.")


def _too_large() -> ApiError:
    return ApiError("RequestSizeLimitExceeded", f"The request body exceeds {MAX_BODY} bytes.")


async def _read(request: web.Request) -> bytes:
    declared = request.content_length
    if declared is not None and declared > MAX_BODY:
        # Refused up front: reading would wait for a body that may never come.
        raise _too_large()
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        # The API's own answer rather than aiohttp's bare 413.
        raise _too_large() from None
    except web.RequestPayloadError:
        # A gzip or deflate Content-Encoding whose data does not decompress.
        raise ApiError("InvalidParameter", "The request body could not be decoded.") from None


def _drop(request: web.Request) -> web.StreamResponse:
    # Closing the transport before anything is written looks, to the client, like a server
    # that died mid-call: no status line, no body.
    # aiohttp then fails to write the returned response and drops it quietly.
    transport = request.transport
    if transport is not None:
        transport.abort()
    return web.Response()


async def state_view(request: web.Request) -> web.Response:
    """`GET /_sim/state`: the observable state as JSON (`?calls=0` leaves the calls out)."""
    state = request.app[STATE_KEY]
    include_calls = request.query.get("calls", "1") not in ("0", "false", "no")
    body: Any = state.to_json(include_calls=include_calls)
    return web.Response(body=json.dumps(body).encode(), headers=JSON_HEADERS)


def build_app(state: SimState, verifier: Verifier, faults: FaultInjector) -> web.Application:
    """The aiohttp application of one simulator."""
    app = web.Application(client_max_size=MAX_BODY)
    app[STATE_KEY] = state
    app.router.add_post("/", ApiHandler(state, verifier, faults).handle)
    app.router.add_get("/_sim/state", state_view)
    return app
