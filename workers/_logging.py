"""Structured logging for workers: one line per lifecycle event or failure, text or JSON.

``event(log, logging.INFO, "ready", consumer="x", channels=["a"])`` writes

- text: ``2026-01-02T03:04:05.678Z INFO ready consumer=x channels=a worker=w/host/0 pid=42``
- json: ``{"ts": "2026-01-02T03:04:05.678Z", "level": "info", "event": "ready", "consumer": ...}``

Lines from the library (``broker.*``) come out in the same shape, their message as the event.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "TextFormatter", "configure", "event"]

_FIELDS = "worker_fields"


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log event ``name`` with structured ``fields``."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={_FIELDS: fields})


def _ts(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class _Base(logging.Formatter):
    def __init__(self, static: dict[str, Any]) -> None:
        super().__init__()
        self.static = static

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        given = getattr(record, _FIELDS, None) or {}
        fields: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if not record.name.startswith("workers"):
            fields["logger"] = record.name
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        return {**fields, **self.static}


class JsonFormatter(_Base):
    """One JSON object per line: ``ts``, ``level``, ``event``, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        head = {"ts": _ts(record), "level": record.levelname.lower(), "event": record.getMessage()}
        return json.dumps({**head, **self.fields(record)}, default=str)


class TextFormatter(_Base):
    """``ts LEVEL event key=value ...``; values with spaces are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_ts(record), record.levelname, record.getMessage()]
        parts += [f"{k}={_text(v)}" for k, v in self.fields(record).items()]
        return " ".join(parts)


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):
        value = ",".join(map(str, value))
    text = str(value)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text)
    return text


def configure(level: str = "info", fmt: str = "text", **static: Any) -> None:
    """Send every log line of this process to stderr in ``fmt`` (``text`` or ``json``) at
    ``level``, each carrying ``static`` fields (the worker's id, the pid)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(static) if fmt == "json" else TextFormatter(static))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
