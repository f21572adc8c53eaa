"""Standard logging for the service's processes: text lines, or one JSON object per line.

:func:`configure_logging` is called once at the start of ``refute serve`` and ``refute worker``
(and by Celery's ``setup_logging`` signal in a worker started with ``celery`` itself). Library
code only ever calls ``logging.getLogger(__name__)``; it never prints.

The JSON form (``REFUTE_LOG_FORMAT=json``) has ``time`` (ISO 8601, UTC), ``level``, ``logger``
and ``message``, then every field passed with ``extra=`` (``request_id``, ``result_id``, …), and
``exc_info`` (the formatted traceback) when the record carries an exception.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from refute.errors import RefuteError
from refute.settings import Settings

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every :class:`logging.LogRecord` has; anything else on a record came from
#: ``extra=`` and is written out as a field of its own.
_RECORD_ATTRIBUTES: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def make_handler(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the configured format."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(settings: Settings, *, level: str | int | None = None,
                      stream: TextIO | None = None) -> None:
    """Send every log record of this process to one handler in ``settings.log_format``, at
    ``level`` (default ``settings.log_level``; an unknown name is refused before anything
    changes). Calling it again replaces the configuration."""
    if level is None:
        level = settings.log_level
    if isinstance(level, str):
        level = level.upper()
        if not isinstance(logging.getLevelName(level), int):
            raise RefuteError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(make_handler(settings, stream))
    root.setLevel(level)
    logging.captureWarnings(True)
