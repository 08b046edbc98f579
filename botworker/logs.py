"""Logging set-up: one line per record with time, level, pid and the process's role (``supervisor``, ``w3``...).

The role is a process-wide value set once after the fork, so every module can log with a plain module logger.
"""

from __future__ import annotations

import logging
import sys

_role = "main"


class _RoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s [%(process)d %(role)s] %(name)s: %(message)s"))
    handler.addFilter(_RoleFilter())
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
