"""Structured logs: every line a request causes carries its room and ranks as key=value pairs.

A handler binds the request's fields once (`bind(room=..., prefill_rank=...)`); they live in a
context variable of the RPC's task (grpc.aio runs each RPC in a task of its own, and tasks the
handler starts copy the context), so every later log line of that request, in any module, carries
them, the typed-failure line of `grpcutil.translate_errors` included. `event(logger, level, msg,
**fields)` adds fields to one line.

Output (`configure`, called by each process's entry point): text lines ending in the fields,
`... prefill done room=123 prefill_rank=1 path=fast_path`, or with `PDMESH_LOG_FORMAT=json` one
JSON object per line with the fields as keys (`{"ts": ..., "level": ..., "logger": ...,
"msg": "prefill done", "room": 123, ...}`). `PDMESH_LOG_LEVEL` sets the level (default INFO).
Field names used across services: room, instance, prefill_instance, decode_instance,
prefill_rank, decode_rank, path, code, reason.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from typing import Any

_FIELDS: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("pdmesh_log_fields", default={})
FIELDS_ATTR = "pdmesh_fields"
TEXT_FORMAT = "%(asctime)s %(levelname)s {process}%(name)s %(message)s"


def bind(**fields: Any) -> None:
    """Add `fields` to every later log line of the current task (and tasks it starts)."""
    _FIELDS.set({**_FIELDS.get(), **{k: v for k, v in fields.items() if v is not None}})


def current() -> dict[str, Any]:
    """The fields bound in the current context."""
    return dict(_FIELDS.get())


def event(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    """Log `msg` with `fields` (and the bound ones) as structured fields of this one line."""
    if logger.isEnabledFor(level):
        logger.log(level, msg, extra={FIELDS_ATTR: {k: v for k, v in fields.items() if v is not None}},
                   stacklevel=2)


def format_fields(fields: dict[str, Any]) -> str:
    """`k=v` pairs, space-separated; values with spaces or quotes are JSON-quoted."""
    return " ".join(f"{k}={_text(v)}" for k, v in fields.items())


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class ContextFilter(logging.Filter):
    """Puts the bound fields (under the line's own) on every record as `record.pdmesh_fields`."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = getattr(record, FIELDS_ATTR, None)
        bound = _FIELDS.get()
        if bound or own:
            setattr(record, FIELDS_ATTR, {**bound, **(own or {})})
        return True


class KeyValueFormatter(logging.Formatter):
    """The usual text line, then the record's fields as `k=v`."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, FIELDS_ATTR, None)
        return f"{line} {format_fields(fields)}" if fields else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, process, msg, the fields, exc if any."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name}
        if self.process:
            out["process"] = self.process
        out["msg"] = record.getMessage()
        for key, value in (getattr(record, FIELDS_ATTR, None) or {}).items():
            out.setdefault(key, value if isinstance(value, (int, float, bool, str)) else str(value))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(process: str | None = None, *, level: str | None = None, fmt: str | None = None) -> None:
    """Set up the root logger of a pdmesh process (stderr; level and format from the environment).

    `process` names the process in each line (`prefill[1]` for a rank). Replaces handlers that an
    earlier configure or `basicConfig` installed, so calling it twice is harmless.
    """
    level = (level or os.environ.get("PDMESH_LOG_LEVEL", "INFO")).upper()
    fmt = (fmt or os.environ.get("PDMESH_LOG_FORMAT", "text")).lower()
    if fmt not in ("text", "json"):
        raise ValueError(f"PDMESH_LOG_FORMAT must be text or json, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        prefix = f"{process} " if process else ""
        handler.setFormatter(KeyValueFormatter(TEXT_FORMAT.format(process=prefix)))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
