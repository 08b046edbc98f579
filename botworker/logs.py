"""Logging set-up, and the process titles: one line per record, as text or JSON (``LOG_FORMAT``), with time, level,
pid, the process's role
(``supervisor``, ``w3``...) and, on every line written while a message is in hand, its message and bot ids.

The role is a process-wide value set once after the fork; the message is the calling thread's (``about``), so every
module can log with a plain module logger and its lines still say which message they are about. Under systemd
(stderr is the journal: ``JOURNAL_STREAM`` names it), each line starts with its syslog priority (``<3>`` for an
error...), so that ``journalctl -p err`` finds the errors.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import setproctitle

_role = "main"
_thread = threading.local()  # .ids: (message id, bot id) of the message this thread is handling
# sd-daemon(3) priorities, by logging level
_PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
TEXT = "%(asctime)s %(levelname)-7s [%(process)d %(role)s%(about)s] %(name)s: %(message)s"


@contextmanager
def about(message_id: str, bot_id: str | None = None) -> Iterator[None]:
    """Every line this thread logs inside carries the message's id (and its bot's)."""
    previous = getattr(_thread, "ids", None)
    _thread.ids = (message_id, bot_id)
    try:
        yield
    finally:
        _thread.ids = previous


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        message_id, bot_id = getattr(_thread, "ids", None) or (None, None)
        record.message_id = getattr(record, "message_id", None) or message_id
        record.bot_id = getattr(record, "bot_id", None) or bot_id
        record.about = f" {record.message_id}" if record.message_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, pid, role, logger, message, and when known messageId, botId, stage
    and durationMs (``extra={"stage": ..., "duration_ms": ...}``), and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "pid": record.process,
            "role": getattr(record, "role", _role),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field, key in (("message_id", "messageId"), ("bot_id", "botId"), ("stage", "stage")):
            if getattr(record, field, None):
                line[key] = getattr(record, field)
        if getattr(record, "duration_ms", None) is not None:
            line["durationMs"] = record.duration_ms
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class _Prioritized(logging.Formatter):
    """Each line (a multi-line one too) prefixed with its syslog priority, as journald reads it."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITIES.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def to_journal(stream: object = None) -> bool:
    """Whether stderr is the journal: systemd sets JOURNAL_STREAM to its device and inode (systemd.exec(5))."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        found = os.fstat((stream or sys.stderr).fileno())  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{found.st_dev}:{found.st_ino}"


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT)
    handler.setFormatter(_Prioritized(formatter) if to_journal() else formatter)
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # HTTP client libraries log every request at INFO (the Gemini SDK's httpx): one line per LLM call is noise.
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # psycopg's pool warns of every connection it discards or fails to open; the store logs the outage itself,
    # with the reason, once per failed attempt.
    logging.getLogger("psycopg.pool").setLevel(max(logging.ERROR, logging.getLevelName(level)))


def set_role(role: str) -> None:
    global _role
    _role = role


_title = ""


def set_title(text: str) -> None:
    """The process title ps and top show (``botworker: worker 2 busy <messageId>``), set only when it changes."""
    global _title
    if text != _title:
        _title = text
        setproctitle.setproctitle(f"botworker: {text}")
