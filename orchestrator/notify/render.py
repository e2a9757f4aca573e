"""Message bodies: one grouped message in generic JSON or a chat service's incoming-webhook shape.

Pure functions of a `Message` (one outbox row and, for a run, its current tally). The shapes
are the documented incoming-webhook bodies:

* WeCom group robot: `{"msgtype": "markdown", "markdown": {"content": ...}}`; the content may
  be at most 4096 bytes.
* DingTalk custom robot: `{"msgtype": "markdown", "markdown": {"title": ..., "text": ...}}`.
* Feishu custom bot: `{"msg_type": "text", "content": {"text": ...}}`; the body at most 20 KB.
* Slack incoming webhook: `{"text": ...}` in mrkdwn, where `&`, `<` and `>` must be escaped.
* generic: the structured message (every listed event as an object) plus the same text.

Chat text is cut to `CHAT_BUDGET` bytes with a line saying how much was left out, so a bad night
is one readable message rather than one the service refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from orchestrator.notify import EVENTS

# Under WeCom's 4096-byte markdown limit, the smallest of the four services.
CHAT_BUDGET = 3800
# Instances named on one line of a run's message; the rest are counted.
LINE_INSTANCES = 20
_LABELS = {
    "job.failed": "failed",
    "job.expired": "expired",
    "quota.exhausted": "quota exhausted",
    "account.paused": "account paused",
    "account.resumed": "account resumed",
    "daemon.task_failed": "daemon task failed",
}


@dataclass(frozen=True, slots=True)
class Message:
    """One outbox message: a run's job outcomes (`subject` names the run) or other events."""

    id: int
    deployment: str
    items: Sequence[Mapping[str, Any]]
    total: int
    counts: Mapping[str, int]
    subject: Mapping[str, Any] = field(default_factory=dict)
    # The run's jobs by state when the message is sent, and whether the run has completed.
    tally: Mapping[str, int] | None = None
    completed: bool = False

    @property
    def omitted(self) -> int:
        """Events counted but not listed (a group keeps only its first ones)."""
        return max(self.total - len(self.items), 0)


def body(fmt: str, message: Message) -> dict[str, Any]:
    """The JSON body to POST for `message` in format `fmt` (one of orchestrator.notify.FORMATS)."""
    return _SHAPES[fmt](message)


def title(message: Message) -> str:
    """One line: the deployment, what the group is about and how many of each event."""
    kinds = sorted(message.counts, key=lambda k: EVENTS.index(k) if k in EVENTS else len(EVENTS))
    summary = ", ".join(f"{message.counts[k]} {_LABELS.get(k, k)}" for k in kinds)
    subject = message.subject
    if "run" in subject:
        slot = _slot(subject.get("slot"))
        return f"cvm-backup {message.deployment}: policy {subject.get('policy')}, {slot}: {summary}"
    return f"cvm-backup {message.deployment}: {summary}"


def lines(message: Message) -> list[str]:
    """The message's body lines, most important first, without any markup."""
    if "run" in message.subject:
        found = [_tally_line(message), *_job_lines(message.items)]
    else:
        found = _event_lines(message.items)
    if message.omitted:
        found.append(f"… and {message.omitted} more not listed (see `cvm-backup status`)")
    return [line for line in found if line]


def _slot(value: object) -> str:
    try:
        when = datetime.fromisoformat(str(value)).astimezone(UTC)
    except ValueError:
        return f"slot {value}"
    return f"slot {when:%Y-%m-%d %H:%M} UTC"


def _tally_line(message: Message) -> str:
    if message.tally is None:
        return ""
    states = ("succeeded", "failed", "expired", "skipped")
    parts = [f"{message.tally[s]} {s}" for s in states if message.tally.get(s)]
    jobs = sum(message.tally.values())
    done = "completed" if message.completed else "still running"
    finished = ", ".join(parts) or "no job finished"
    return f"run {message.subject.get('run')} ({done}): {finished} of {jobs} jobs"


def _job_lines(items: Sequence[Mapping[str, Any]]) -> list[str]:
    """Job outcomes grouped by (outcome, code or reason): a line per cause, naming instances."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for item in items:
        cause = str(item.get("code") or item.get("reason") or "no reason recorded")
        groups.setdefault((str(item.get("kind")), cause), []).append(item)
    found = []
    for (kind, cause), members in groups.items():
        shown = [str(m.get("instance")) for m in members[:LINE_INSTANCES]]
        more = f" and {len(members) - len(shown)} more" if len(members) > len(shown) else ""
        sample = next((str(m["message"]) for m in members if m.get("message")), "")
        found.append(
            f"{_LABELS.get(kind, kind)}, {cause} ({len(members)}): {', '.join(shown)}{more}"
            + (f" — {sample}" if sample else "")
        )
    return found


def _event_lines(items: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per distinct event, repeats counted (a quota storm is one line)."""
    seen: dict[str, int] = {}
    for item in items:
        line = _event_line(item)
        seen[line] = seen.get(line, 0) + 1
    return [line if n == 1 else f"{line} ({n} times)" for line, n in seen.items()]


def _event_line(item: Mapping[str, Any]) -> str:
    details: Mapping[str, Any] = item.get("details") or {}
    account, region = item.get("account"), item.get("region")
    scope = f" in {details['scope_region']}" if details.get("scope_region") else ""
    kind = item.get("kind")
    if kind == "account.paused":
        message = f": {details['message']}" if details.get("message") else ""
        return f"account {account} paused{scope}: {item.get('reason')}{message}"
    if kind == "account.resumed":
        return f"account {account} resumed{scope} (by {item.get('reason')})"
    if kind == "quota.exhausted":
        return f"image quota exhausted for account {account} in {region}: {item.get('reason')}"
    if kind == "daemon.task_failed":
        where = f" on {details['worker']}" if details.get("worker") else ""
        return f"daemon task {details.get('task')} failed{where}: {details.get('error')}"
    return f"{kind}: {item.get('reason')}"


def _fit(head: str, body_lines: Sequence[str], budget: int) -> list[str]:
    """`body_lines` that fit in `budget` bytes after `head`, and a line counting the rest."""
    kept: list[str] = []
    used = len(head.encode())
    for index, line in enumerate(body_lines):
        cost = len(line.encode()) + 8  # a newline and a little markup
        if used + cost > budget - 80:  # room for the closing line
            kept.append(f"… {len(body_lines) - index} more lines cut to fit the message")
            break
        kept.append(line)
        used += cost
    return kept


def _plain(message: Message) -> str:
    head = title(message)
    return "\n".join([head, *_fit(head, lines(message), CHAT_BUDGET)])


def _markdown(message: Message, heading: str) -> str:
    head = f"{heading}{title(message)}"
    return "\n".join([head, "", *(f"- {line}" for line in _fit(head, lines(message), CHAT_BUDGET))])


def _generic(message: Message) -> dict[str, Any]:
    run = message.subject if "run" in message.subject else None
    return {
        "source": "cvm-backup",
        # Delivery is at least once: a receiver can drop a message whose id it has seen.
        "id": f"{message.deployment}:{message.id}",
        "deployment": message.deployment,
        "title": title(message),
        "text": "\n".join([title(message), *lines(message)]),
        "run": None if run is None else {**run, "completed": message.completed},
        "run_jobs": dict(message.tally) if message.tally is not None else None,
        "counts": dict(message.counts),
        "total": message.total,
        "omitted": message.omitted,
        "events": [dict(item) for item in message.items],
    }


def _wecom(message: Message) -> dict[str, Any]:
    return {"msgtype": "markdown", "markdown": {"content": _markdown(message, "### ")}}


def _dingtalk(message: Message) -> dict[str, Any]:
    # The title is what the notification preview shows.
    return {
        "msgtype": "markdown",
        "markdown": {"title": title(message)[:100], "text": _markdown(message, "#### ")},
    }


def _feishu(message: Message) -> dict[str, Any]:
    return {"msg_type": "text", "content": {"text": _plain(message)}}


def _slack(message: Message) -> dict[str, Any]:
    head = f"*{_slack_escape(title(message))}*"
    kept = _fit(head, [_slack_escape(line) for line in lines(message)], CHAT_BUDGET)
    return {"text": "\n".join([head, *(f"• {line}" for line in kept)])}


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_SHAPES: Mapping[str, Callable[[Message], dict[str, Any]]] = {
    "generic": _generic,
    "wecom": _wecom,
    "dingtalk": _dingtalk,
    "feishu": _feishu,
    "slack": _slack,
}
