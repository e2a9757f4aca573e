"""One POST to a webhook, and what its answer means: delivered, try again, or give up.

Chat services answer HTTP 200 for most refusals and put the verdict in the body: WeCom and
DingTalk `{"errcode": 0, "errmsg": "ok"}`, Feishu `{"code": 0, "msg": "success"}` (older
receivers `{"StatusCode": 0}`); a non-zero code (a rate limit, a keyword or IP rule) is retried
like a 5xx. Slack answers `ok`, or a 4xx with a reason such as `no_service`. A 4xx other than
408/425/429, or a redirect (never followed: it would take the message elsewhere), is permanent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

# Enough of an answer to read a verdict from; receivers that send more are cut off.
MAX_ANSWER = 64 * 1024
_RETRY_STATUSES = frozenset({408, 425, 429})
# Where each chat service puts its verdict in a 2xx answer; 0 is success.
_VERDICT_KEYS: Mapping[str, tuple[str, ...]] = {
    "wecom": ("errcode",),
    "dingtalk": ("errcode",),
    "feishu": ("code", "StatusCode"),
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt went. `error` may quote the receiver: scrub it before showing it."""

    ok: bool
    permanent: bool = False
    status: int | None = None
    error: str | None = None


async def post(
    session: aiohttp.ClientSession, url: str, fmt: str, body: Mapping[str, Any], within: float
) -> Outcome:
    """POST `body` as JSON to `url` within `within` seconds; network trouble is an outcome too."""
    data = json.dumps(body, ensure_ascii=False).encode()
    try:
        async with session.post(
            url,
            data=data,
            headers={"Content-Type": "application/json; charset=utf-8"},
            timeout=aiohttp.ClientTimeout(total=within),
            allow_redirects=False,
        ) as response:
            answer = (await response.content.read(MAX_ANSWER)).decode("utf-8", "replace")
            return judge(fmt, response.status, answer)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return Outcome(ok=False, error=_describe(exc))


def judge(fmt: str, status: int, answer: str) -> Outcome:
    """What an HTTP answer means for format `fmt`."""
    if 200 <= status < 300:
        refusal = _refusal(fmt, answer)
        return Outcome(ok=refusal is None, status=status, error=refusal)
    error = f"HTTP {status}: {_short(answer)}" if answer.strip() else f"HTTP {status}"
    retry = status >= 500 or status in _RETRY_STATUSES
    return Outcome(ok=False, permanent=not retry, status=status, error=error)


def _refusal(fmt: str, answer: str) -> str | None:
    """The service's refusal inside a 2xx answer, if it made one."""
    keys = _VERDICT_KEYS.get(fmt)
    if not keys:
        return None
    try:
        verdict = json.loads(answer)
    except ValueError:
        return None  # not the service's JSON (a proxy's page): the POST itself was taken
    if not isinstance(verdict, dict):
        return None
    for key in keys:
        code = verdict.get(key)
        if code not in (None, 0):
            text = verdict.get("errmsg") or verdict.get("msg") or verdict.get("StatusMessage")
            return f"{key} {code}: {_short(str(text or ''))}"
    return None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _describe(exc: BaseException) -> str:
    # aiohttp's connector errors name host and port only; the caller scrubs the rest anyway.
    detail = str(exc)
    return f"{type(exc).__name__}: {_short(detail)}" if detail else type(exc).__name__
