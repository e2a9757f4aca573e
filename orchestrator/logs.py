"""structlog setup: JSON lines for machines, console rendering on a TTY, secrets scrubbed.

Event names are dotted (`job.retry_scheduled`); context (policy, instance, job, attempt) is
bound once with `structlog.contextvars.bound_contextvars` by the code that owns it.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from orchestrator.db.dsn import redact_text

# Keys whose values are never logged, whatever code tried to log them.
_SECRET_KEYS = re.compile(r"secret|password|token|authorization|credential", re.IGNORECASE)
_HANDLER_NAME = "cvm-backup"
# What a string must contain before the (slower) DSN scrub is worth running on it.
_MAYBE_DSN = re.compile(r"://|password", re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def _secret_key(key: str) -> bool:
    # Log keys come from a small fixed vocabulary: remembering the answer keeps the scrub
    # (which runs on every line) from searching each key with a regex again.
    return _SECRET_KEYS.search(key) is not None


def scrub(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Processor: redact secret-looking keys, and DSN passwords inside any string value.

    It runs after `format_exc_info`, so a DSN quoted in an exception's message or traceback is
    scrubbed as well.
    """
    for key, value in event.items():
        if _secret_key(key) and value is not None:
            event[key] = "***"
        elif isinstance(value, str) and _MAYBE_DSN.search(value):
            event[key] = redact_text(value)
    return event


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog process-wide; `fmt` is auto, json or console."""
    stream = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            scrub,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _route_stdlib(renderer, stream)


def _route_stdlib(renderer: Any, stream: TextIO) -> None:
    """Libraries that log through `logging` (asyncpg's pool, aiohttp) come out as our lines."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                scrub,
            ],
        )
    )
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    # Replace only our own handler, so a reconfigure (or pytest's capture) is left intact.
    root.handlers = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(logging.WARNING)


def get(name: str | None = None) -> Any:
    """A logger; `name` is bound as `logger`."""
    return _Named(name) if name else structlog.get_logger()


class _Named:
    """Binds `logger=name` once per structlog configuration, so module-level loggers follow a
    later configure() (tests, `run`) without paying for a bind on every call."""

    __slots__ = ("_bound", "_name", "_source")

    def __init__(self, name: str) -> None:
        self._name = name
        self._source: tuple[Any, ...] = ()
        self._bound: Any = None

    def __getattr__(self, method: str) -> Any:
        return getattr(self._logger(), method)

    def _logger(self) -> Any:
        config = structlog.get_config()
        # The configuration objects themselves, held here, so a new configure() never matches
        # an old one by a reused id().
        source = (config["processors"], config["wrapper_class"], config["logger_factory"])
        if len(self._source) != len(source) or any(
            a is not b for a, b in zip(self._source, source, strict=True)
        ):
            self._bound = structlog.get_logger().bind(logger=self._name)
            self._source = source
        return self._bound
