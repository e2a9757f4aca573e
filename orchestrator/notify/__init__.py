"""Webhook notifications without Prometheus: `[[notify]]` targets, a durable outbox, delivery.

The flow (migration 0007): triggers copy each failed or expired job and each quota.exhausted,
account.paused and account.resumed ledger row into `notify_events`, in the transaction of the
change itself; the daemon records daemon.task_failed there too. The notifier
(`orchestrator.notify.task`) folds those rows into one message per (target, group) in
`notify_outbox` (a run's job outcomes, or the other events of a short while), seals a group when
its run completes or after a quiet `group_delay`, and posts sealed messages with backoff until
delivered or `give_up_after` has passed. Nothing on a job's path waits for any of it.

This module holds only the vocabulary the config loader checks against, so that importing it
pulls in nothing else.
"""

from __future__ import annotations

# The message shapes: generic JSON, and the incoming-webhook bodies of four chat services.
FORMATS = ("generic", "wecom", "dingtalk", "feishu", "slack")
# What can be sent; every one of them by default.
EVENTS = (
    "job.failed",
    "job.expired",
    "quota.exhausted",
    "account.paused",
    "account.resumed",
    "daemon.task_failed",
)
MAX_TARGETS = 10
# Real webhook URLs are under 200 characters; this leaves room without inviting a pasted blob.
MAX_URL_LENGTH = 2048
