"""The store's connections: the pooled ones (how they ask for their session settings, and rows as dicts) and
the one database tools run on."""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg

from ..config import Config, redact_url
from ..errors import one_line

log = logging.getLogger(__name__)


def dict_rows(cursor: psycopg.Cursor[Any]) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """Rows as dicts, the names read from the result itself (psycopg's ``dict_row`` builds the cursor's whole
    description for them: a third of the client's time on these small results)."""
    res = cursor.pgresult
    names = [res.fname(i).decode() for i in range(res.nfields)] if res is not None else []  # type: ignore[union-attr]
    return lambda values: dict(zip(names, values, strict=True))


class PooledConnection(psycopg.Connection[dict[str, Any]]):
    """The pool's connections. They ask for the store's session settings in the startup packet (``options``);
    a pooler that refuses that parameter (PgBouncer's default) gets a connection without it, and the store
    remembers to set them in every transaction instead. Also remembers why the last connection attempt failed (the
    pool itself only says that it timed out)."""

    # Per store: each Store connects through a subclass of its own (``for_store``), so these never leak between two.
    failure = ""
    without_options = False  # a pooler refused the `options` startup parameter: never send it again

    @classmethod
    def for_store(cls) -> type[PooledConnection]:
        return type("PooledConnection", (cls,), {"failure": "", "without_options": False})

    @classmethod
    def connect(cls, *args: Any, **kwargs: Any) -> PooledConnection:  # type: ignore[override]
        if cls.without_options:
            kwargs.pop("options", None)
        try:
            conn = super().connect(*args, **kwargs)
        except psycopg.OperationalError as exc:
            if "options" not in kwargs or "unsupported startup parameter" not in str(exc):
                cls.failure = one_line(exc)
                raise
            log.info("the server refused the `options` startup parameter (a pooler): settings go in each transaction")
            cls.without_options = True
            return cls.connect(*args, **kwargs)
        except psycopg.Error as exc:
            cls.failure = one_line(exc)
            raise
        cls.failure = ""
        return conn  # type: ignore[return-value]


class ToolConnection:
    """The connections database tools run on: opened at the first tool call, kept idle for the next one (as many
    as the store's pool has, at most), one per thread that is running a database tool."""

    def __init__(self, cfg: Config, connect_args: dict[str, Any]) -> None:
        self.cfg = cfg
        self._connect_args = connect_args
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for one tool call: psycopg 3 in autocommit mode, never one of the pool's, logged in as
        DB_TOOL_URL's role when set. psycopg 3 binds parameters on the server (extended protocol), so a tool's
        values never appear in the statement text that ``pg_stat_activity`` and server logs show, and the server
        itself refuses a second statement. After each use it is rolled back and ``DISCARD ALL``-ed (session
        settings, advisory locks, temporary tables): nothing one call does reaches the next, another user's.
        Errors of the tools' own statements pass through untranslated: the tool reports them."""
        conn = self._take()
        try:
            yield conn
        finally:
            try:
                conn.execute("ROLLBACK")
                conn.execute("DISCARD ALL")  # not in a transaction block: a statement of its own
            except psycopg.Error:
                conn.close()
            else:
                self._give(conn)

    def _take(self) -> psycopg.Connection[Any]:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and not has_news(conn):
                    return conn
                # Bytes waiting on an idle connection: the server ended it (terminated, idle timeout, failover).
                # Replace it now rather than fail the next call, another user's perhaps.
                conn.close()
        return self._connect_tools()

    def _give(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if len(self._idle) < self.cfg.pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def _connect_tools(self) -> psycopg.Connection[Any]:
        url = self.cfg.db_tool_url or self.cfg.database_url
        try:
            conn = psycopg.connect(
                url,
                autocommit=True,
                prepare_threshold=None,  # no automatic server-side PREPARE: DISCARD ALL after each call drops them
                **{**self._connect_args, "application_name": "botworker-tool"},
            )
        except psycopg.Error as exc:
            # libpq's message can quote the URL; the tool (and so the user, the LLM, the events) gets none of it.
            text = one_line(exc).replace(url, "***")
            password = urlsplit(url).password
            for form in {password, unquote(password or "")} - {None, ""}:
                text = text.replace(str(form), "***")
            log.error("cannot connect to the tool database %s: %s", redact_url(url), text)
            raise psycopg.OperationalError("cannot connect to the tool database (see the worker log)") from None
        _warn_if_tool_login_is_powerful(conn)
        return conn


def has_news(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection's socket is readable: the server said something unasked (it is closing), or
    closed it."""
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True


def _warn_if_tool_login_is_powerful(conn: psycopg.Connection[Any]) -> None:
    """Say once per connection what a bot owner's SQL could do with this login beyond reading its grants."""
    row = conn.execute(
        """SELECT current_user, r.rolsuper, r.rolbypassrls,
                  has_function_privilege('pg_cancel_backend(integer)', 'EXECUTE') AS can_cancel,
                  pg_has_role('pg_read_server_files', 'MEMBER') AS reads_files
           FROM pg_roles r WHERE r.rolname = current_user"""
    ).fetchone()
    if row is None:
        return
    user, superuser, bypass, can_cancel, reads_files = row
    risks = [
        text
        for flag, text in (
            (superuser, "is a superuser (reads every table, server files)"),
            (bypass, "bypasses row-level security"),
            (reads_files, "can read server files"),
            (can_cancel, "can cancel other tool queries of the same login (pg_cancel_backend)"),
        )
        if flag
    ]
    if risks:
        log.warning(
            "database tools run as %r, which %s: set DB_TOOL_URL to a login granted only what tools may read "
            "(docs/tools.md)",
            user,
            "; ".join(risks),
        )
