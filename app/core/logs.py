"""Log lines for machines: TUNEFORGE_LOG_FORMAT=json writes one JSON object a line, carrying the
request id, team id and job id of whatever the line was logged for (README, "Metrics and logs").

The ids live in context variables: the API's request middleware and its /v1 dependency set them for a
request (the threadpool copies them into sync routes), a worker's task handler for its job. A
record's own `extra={"job_id": ...}` wins over the context (a None there is left out). text (the default) leaves every
process's logging as it is.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

CONTEXT_FIELDS = ("request_id", "team_id", "job_id", "evaluation_id")
_context: dict[str, ContextVar[str | None]] = {
    name: ContextVar(f"tuneforge_log_{name}", default=None) for name in CONTEXT_FIELDS}

# The attributes every LogRecord has; anything else on a record came from `extra=` and is logged too.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def bind(**ids: str | None) -> None:
    """Set ids (CONTEXT_FIELDS) for the rest of the current context: the request's task, the task's thread."""
    for name, value in ids.items():
        _context[name].set(value)


@contextmanager
def bound(**ids: str | None) -> Iterator[None]:
    """Set ids for the block, and restore the previous ones after it."""
    tokens = {name: _context[name].set(value) for name, value in ids.items()}
    try:
        yield
    finally:
        for name, token in tokens.items():
            _context[name].reset(token)


def current() -> dict[str, str]:
    """The ids set in this context, unset ones left out."""
    return {name: value for name, var in _context.items() if (value := var.get()) is not None}


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", request_id, team_id, job_id, ..., "exception"}: one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(current())
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and value is not None:
                entry[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(log_format: str, *, level: int = logging.INFO) -> None:
    """For json: every handler the process has so far (the root's and those of loggers that do not
    propagate, such as uvicorn's) formats as JSON, and the root gets a stderr handler at `level` when
    it has none. For text: nothing changes. Idempotent."""
    if log_format != "json":
        return
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
        if root.level == logging.NOTSET or root.level > level:
            root.setLevel(level)
    loggers = [root] + [logger for logger in logging.root.manager.loggerDict.values()
                        if isinstance(logger, logging.Logger)]
    formatter = JsonFormatter()
    for logger in loggers:
        for handler in logger.handlers:
            handler.setFormatter(formatter)
