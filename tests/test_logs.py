"""refute.logs: text lines, or one valid JSON object per line with the record's fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from refute.errors import RefuteError
from refute.logs import configure_logging, make_handler
from refute.settings import Settings


@pytest.fixture
def root_restored() -> Iterator[None]:
    """configure_logging replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)


def _logger(settings: Settings, stream: io.StringIO) -> logging.Logger:
    logger = logging.getLogger("refute.test_logs")
    logger.handlers[:] = [make_handler(settings, stream)]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_json_line_is_valid_json_with_fields_extra_and_traceback() -> None:
    stream = io.StringIO()
    logger = _logger(Settings(log_format="json"), stream)
    logger.info("result %s accepted", "res_1", extra={"request_id": "req-9", "result_id": "res_1"})
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logger.exception("spot-check failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # one object per line, newlines in messages escaped
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "INFO"
    assert first["logger"] == "refute.test_logs"
    assert first["message"] == "result res_1 accepted"
    assert first["request_id"] == "req-9" and first["result_id"] == "res_1"
    assert first["time"].endswith("+00:00")
    assert "exc_info" not in first
    assert second["level"] == "ERROR"
    assert "ValueError: boom" in second["exc_info"]
    assert "Traceback" in second["exc_info"]


def test_json_extra_values_that_are_not_json_are_written_as_text() -> None:
    stream = io.StringIO()
    logger = _logger(Settings(log_format="json"), stream)
    logger.warning("odd", extra={"path": object(), "count": 3})
    entry = json.loads(stream.getvalue())
    assert entry["count"] == 3
    assert entry["path"].startswith("<object object")


def test_text_format() -> None:
    stream = io.StringIO()
    _logger(Settings(), stream).warning("plain %d", 7)
    assert stream.getvalue().rstrip().endswith("WARNING refute.test_logs: plain 7")


@pytest.mark.usefixtures("root_restored")
def test_configure_logging_sets_one_root_handler_and_the_level() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_format="json", log_level="warning"), stream=stream)
    root = logging.getLogger()
    assert len(root.handlers) == 1
    assert root.level == logging.WARNING
    logging.getLogger("refute.somewhere").info("dropped")
    logging.getLogger("refute.somewhere").error("kept")
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["kept"]
    configure_logging(Settings(), level="debug", stream=stream)
    assert root.level == logging.DEBUG and len(root.handlers) == 1
    with pytest.raises(RefuteError, match="unknown log level 'LOUD'"):
        configure_logging(Settings(), level="loud", stream=stream)
    assert root.level == logging.DEBUG
