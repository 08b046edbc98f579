"""The platform database: pooled connections, loading a bot and its conversation, saving an exchange.

One ``Store`` per worker process, created after the fork. Connections come from a small pool and are reused across
messages; a connection that fails is closed, never handed out again, and the failure becomes a ``TransientError``
(the message is retried), so a PostgreSQL restart costs a retry, not a message.

Exactly-once: ``save_exchange`` writes the user row and the reply row in one transaction under an advisory lock
keyed by the message id, after checking that no row carries that id yet; a second run of the same message returns
the rows the first run wrote instead of writing new ones.
"""

from __future__ import annotations

import logging
import select
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from . import errors
from .config import Config, redact_url
from .errors import MessageError, TransientError
from .message import Message

log = logging.getLogger(__name__)

# Instances created for messages without instanceId get an id derived from the message id, so a retried message
# reuses the instance its first attempt created instead of leaving a second one behind.
INSTANCE_NAMESPACE = uuid.UUID("7d1f3c2e-5b0a-4c7e-9a55-2f0c8e6b9d41")

# Errors after which the same statement may well succeed: the server went away, a timeout, a serialization clash.
_TRANSIENT = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    psycopg2.errors.SerializationFailure,
    psycopg2.errors.DeadlockDetected,
)

CHAT_COLUMNS = (
    'id, "botInstanceId", "userId", role, content, metadata, "responseTime", "tokensUsed", "createdAt", "updatedAt"'
)

_LOAD_BOT = """
SELECT b.id, b.name, b."displayName", b.description, b."isActive", b.model, b."userId",
  (SELECT row_to_json(u) FROM (SELECT id, email, "firstName", "lastName", role, "isActive"
                               FROM users WHERE id = %(user)s) u) AS "user",
  (SELECT coalesce(json_agg(p ORDER BY p."createdAt", p.name), '[]'::json) FROM (
      SELECT DISTINCT ON (pr.id) pr.id AS "promptId", pr.name, pr."createdAt", pv.content, pv.version, pv.type
      FROM bot_prompts bp JOIN prompts pr ON pr.id = bp."promptId"
      JOIN prompt_versions pv ON pv."promptId" = pr.id AND pv."isActive"
      WHERE bp."botId" = b.id ORDER BY pr.id, pv.version DESC) p) AS prompts,
  (SELECT coalesce(json_agg(t ORDER BY t."createdAt", t.name), '[]'::json) FROM (
      SELECT id, name, "displayName", description, type, config, "requiresAuth", "createdAt"
      FROM bot_tools WHERE "botId" = b.id AND "isActive") t) AS tools,
  (SELECT json_build_object('botId', i."botId", 'userId', i."userId")
   FROM bot_instances i WHERE i.id = %(instance)s) AS instance
FROM bots b WHERE b.id = %(bot)s
"""

# Everything a message needs, in one statement: creates the instance (only for the bot's owner, only if active),
# and returns the bot with its user, prompts, tools, the instance's owner, the last messages and this message's
# own rows if an earlier attempt saved them.
_LOAD = f"""
WITH created AS (
  INSERT INTO bot_instances (id, "botId", "userId", status, "lastStartedAt", "createdAt", "updatedAt")
  SELECT %(instance)s, b.id, b."userId", 'running', now(), now(), now()
  FROM bots b WHERE %(create)s AND b.id = %(bot)s AND b."userId" = %(user)s AND b."isActive"
  ON CONFLICT (id) DO NOTHING)
SELECT q.*,
  (SELECT coalesce(json_agg(h ORDER BY h."createdAt", h.id), '[]'::json) FROM (
     SELECT id, role, content, "createdAt" FROM chat_messages
     WHERE "botInstanceId" = %(instance)s AND "userId" = %(user)s
       AND coalesce(metadata->>'messageId', '') <> %(mid)s
     ORDER BY "createdAt" DESC, id DESC LIMIT %(limit)s) h) AS history,
  (SELECT json_agg(o) FROM (
     SELECT {CHAT_COLUMNS} FROM chat_messages
     WHERE "botInstanceId" = %(instance)s AND metadata->>'messageId' = %(mid)s) o) AS own
FROM ({_LOAD_BOT}) q
"""

_INSERT_ROW = """INSERT INTO chat_messages (id, "botInstanceId", "userId", role, content, metadata, "responseTime",
                                           "tokensUsed", "createdAt", "updatedAt")"""
_SAVE = f"""SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0));
WITH existing AS (
  SELECT {CHAT_COLUMNS} FROM chat_messages WHERE "botInstanceId" = %(instance)s AND metadata->>'messageId' = %(mid)s),
user_row AS ({_INSERT_ROW}
  SELECT %(uid1)s, %(instance)s, %(user)s, 'user', %(text)s, %(umeta)s, NULL, NULL, %(received)s, %(received)s
  WHERE NOT EXISTS (SELECT 1 FROM existing) RETURNING {CHAT_COLUMNS}),
bot_row AS ({_INSERT_ROW}
  SELECT %(uid2)s, %(instance)s, %(user)s, 'bot', %(reply)s, %(rmeta)s, %(ms)s, %(tokens)s, %(at)s, %(at)s
  WHERE NOT EXISTS (SELECT 1 FROM existing) RETURNING {CHAT_COLUMNS}),
touched AS (UPDATE bot_instances SET "updatedAt" = now() WHERE id = %(instance)s AND NOT EXISTS (SELECT 1 FROM existing))
SELECT true AS created, * FROM user_row UNION ALL SELECT true, * FROM bot_row
UNION ALL SELECT false, * FROM existing"""

# The two statements every message runs are prepared once per connection (DB_PREPARE): PostgreSQL then neither
# parses nor plans them again, which is most of its work per message. name -> (statement, parameters and types).
_PREPARED: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "botworker_load": (
        _LOAD,
        [("instance", "uuid"), ("create", "boolean"), ("bot", "uuid"), ("user", "uuid"), ("mid", "text"),
         ("limit", "integer")],
    ),
    "botworker_save": (
        _SAVE.split(";", 1)[1],  # the statement after the advisory lock
        [("instance", "uuid"), ("mid", "text"), ("user", "uuid"), ("uid1", "uuid"), ("text", "text"),
         ("umeta", "jsonb"), ("received", "timestamptz"), ("uid2", "uuid"), ("reply", "text"), ("rmeta", "jsonb"),
         ("ms", "integer"), ("tokens", "integer"), ("at", "timestamptz")],
    ),
}  # fmt: skip


def _prepare_sql() -> str:
    """PREPARE statements for a new connection: each %(name)s becomes its $n."""
    out = []
    for name, (sql, params) in _PREPARED.items():
        for i, (param, _) in enumerate(params, 1):
            sql = sql.replace(f"%({param})s", f"${i}")
        out.append(f"PREPARE {name} ({', '.join(t for _, t in params)}) AS {sql}")
    return ";\n".join(out)


def _execute(name: str) -> str:
    """The EXECUTE of a prepared statement, with psycopg2 placeholders for its parameters."""
    return f"EXECUTE {name} (" + ", ".join(f"%({p})s" for p, _ in _PREPARED[name][1]) + ")"


_PREPARE = _prepare_sql()
_LOAD_PREPARED = _execute("botworker_load")
_SAVE_PREPARED = _SAVE.split(";", 1)[0] + ";\n" + _execute("botworker_save")


@dataclass(frozen=True)
class BotContext:
    """Everything the pipeline needs about the bot, the user and the conversation."""

    bot: dict[str, Any]
    user: dict[str, Any]
    prompts: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    instance_id: str
    history: list[dict[str, Any]]
    saved: tuple[dict[str, Any], dict[str, Any]] | None  # this message's rows, if an earlier attempt saved them


def _iso(value: Any) -> Any:
    """Timestamps as the platform's API shows them (UTC, milliseconds, 'Z'); uuids as strings."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.isoformat(timespec="milliseconds") + "Z"
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _iso(v) for k, v in row.items()}


class Store:
    """Pooled access to the platform database for one process."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._idle: list[psycopg2.extensions.connection] = []
        self._tool_conn: psycopg.Connection[Any] | None = None
        self._connect_args: dict[str, Any] = {
            "dsn": cfg.database_url,
            "connect_timeout": cfg.db_connect_timeout,
            "application_name": "botworker",
            # Timestamps are written and read in UTC whatever the server's default; a stuck statement is bounded.
            "options": f"-c timezone=UTC -c statement_timeout={int(cfg.db_statement_timeout * 1000)}",
            # A silently dead server is noticed in about a minute instead of hanging on TCP.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        if self._tool_conn is not None:
            self._tool_conn.close()
            self._tool_conn = None

    @contextmanager
    def tool_connection(self) -> Iterator[psycopg.Connection[Any]]:
        """The connection database tools run on: psycopg 3 in autocommit mode, one of its own (never the pool's),
        logged in as DB_TOOL_URL's role when set. psycopg 3 binds parameters on the server (extended protocol), so
        a tool's values never appear in the statement text that ``pg_stat_activity`` and server logs show, and
        the server itself refuses a second statement. After each use it is rolled back and ``DISCARD ALL``-ed
        (session settings, advisory locks, temporary tables): nothing one call does reaches the next, another
        user's. Errors of the tools' own statements pass through untranslated: the tool reports them."""
        conn = self._tool_conn
        if conn is not None and not conn.closed and _has_news(conn):
            # An idle connection with bytes waiting was ended by the server (terminated, idle timeout, failover):
            # replace it now rather than fail the next call, another user's perhaps.
            conn.close()
        if conn is None or conn.closed:
            conn = self._tool_conn = self._connect_tools()
        try:
            yield conn
        finally:
            try:
                conn.execute("ROLLBACK")
                conn.execute("DISCARD ALL")  # not in a transaction block: a statement of its own
            except psycopg.Error:
                conn.close()
                self._tool_conn = None

    def _connect_tools(self) -> psycopg.Connection[Any]:
        url = self.cfg.db_tool_url or self.cfg.database_url
        try:
            conn = psycopg.connect(
                url,
                autocommit=True,
                prepare_threshold=None,  # no automatic server-side PREPARE: DISCARD ALL after each call drops them
                **{**{k: v for k, v in self._connect_args.items() if k != "dsn"}, "application_name": "botworker-tool"},
            )
        except psycopg.Error as exc:
            # libpq's message can quote the URL; the tool (and so the user, the LLM, the events) gets none of it.
            text = _one_line(exc).replace(url, "***")
            password = urlsplit(url).password
            for form in {password, unquote(password or "")} - {None, ""}:
                text = text.replace(str(form), "***")
            log.error("cannot connect to the tool database %s: %s", redact_url(url), text)
            raise psycopg.OperationalError("cannot connect to the tool database (see the worker log)") from None
        _warn_if_tool_login_is_powerful(conn)
        return conn

    def _getconn(self) -> psycopg2.extensions.connection:
        """An idle pooled connection, or a new one. (Single-threaded process: a plain list is the pool.)"""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        conn = psycopg2.connect(**self._connect_args)
        if self.cfg.db_prepare:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(_PREPARE)
        return conn

    def _putconn(self, conn: psycopg2.extensions.connection, broken: bool) -> None:
        if broken or conn.closed or len(self._idle) >= self.cfg.db_pool_size:
            conn.close()
        else:
            self._idle.append(conn)

    @contextmanager
    def cursor(self, autocommit: bool = True) -> Iterator[psycopg2.extras.RealDictCursor]:
        """A cursor on a pooled connection. Autocommit by default: every statement string is its own implicit
        transaction (a string of several statements runs as one), with no BEGIN/COMMIT round trips; with
        ``autocommit=False`` the block is one transaction, committed at its end.

        A transient failure (server gone, timeout, serialization clash) becomes ``TransientError``; a connection
        that failed is closed, never reused.
        """
        try:
            conn = self._getconn()
            conn.autocommit = autocommit
        except _TRANSIENT as exc:
            raise TransientError(
                errors.DATABASE_UNAVAILABLE, f"cannot connect to PostgreSQL: {_one_line(exc)}"
            ) from exc
        broken = False
        try:
            # `with conn` would open a transaction even in autocommit mode (psycopg2 >= 2.9).
            with (
                nullcontext() if autocommit else conn,
                conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur,
            ):
                yield cur
        except _TRANSIENT as exc:
            broken = conn.closed != 0 or isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))
            raise TransientError(errors.DATABASE_UNAVAILABLE, f"PostgreSQL failed: {_one_line(exc)}") from exc
        finally:
            self._putconn(conn, broken)

    def ping(self) -> None:
        """Raise TransientError unless the database answers."""
        with self.cursor() as cur:
            cur.execute("SELECT 1")

    # ---- loading -------------------------------------------------------------------------------------------

    def load_context(self, msg: Message) -> BotContext:
        """Bot (owned by the user, active), prompts, tools, instance (found or created), history, earlier save:
        one statement, one round trip."""
        if msg.instance_id:
            instance_id = msg.instance_id
        else:
            instance_id = str(uuid.uuid5(INSTANCE_NAMESPACE, f"{msg.bot_id}:{msg.user_id}:{msg.message_id}"))
        params = {
            "bot": msg.bot_id,
            "user": msg.user_id,
            "instance": instance_id,
            "create": msg.instance_id is None,
            "mid": msg.message_id,
            "limit": self.cfg.history_limit,
        }
        with self.cursor() as cur:
            cur.execute(_LOAD_PREPARED if self.cfg.db_prepare else _LOAD, params)
            row = cur.fetchone()
        if row is None or str(row["userId"]) != msg.user_id:
            # The same answer for "no such bot" and "not yours": ids of other users' bots are not revealed.
            raise MessageError(errors.BOT_NOT_FOUND, f"bot {msg.bot_id} not found for this user")
        if row["user"] is None:
            raise MessageError(errors.USER_NOT_FOUND, f"user {msg.user_id} not found")
        if not row["isActive"]:
            raise MessageError(errors.BOT_INACTIVE, f"bot {msg.bot_id} is not active")
        found = row["instance"]
        if msg.instance_id and (found is None or found["botId"] != msg.bot_id or found["userId"] != msg.user_id):
            raise MessageError(
                errors.INSTANCE_NOT_FOUND, f"instance {msg.instance_id} is not an instance of this bot and user"
            )
        bot = {k: v for k, v in row.items() if k not in ("user", "prompts", "tools", "instance", "history", "own")}
        own = _pair([_chat_row(r) for r in row["own"] or []])
        return BotContext(bot, row["user"], row["prompts"], row["tools"], instance_id, row["history"], own)

    # ---- saving --------------------------------------------------------------------------------------------

    def save_exchange(
        self,
        msg: Message,
        instance_id: str,
        reply_text: str,
        reply_at: datetime,
        tokens_used: int,
        response_ms: int,
        user_meta: dict[str, Any],
        reply_meta: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """Write both rows atomically; returns (user row, reply row, created). Idempotent by message id.

        One round trip: an advisory lock keyed by the message id, then one statement that inserts both rows and
        touches the instance unless rows with this message id exist, and returns whichever rows there are. Both
        statements run as one implicit transaction. The lock serialises two attempts of the same message (say, a
        worker presumed dead that is still finishing): the second one gets the first one's rows.
        """
        params = {
            "key": "botworker:" + msg.message_id,
            "instance": instance_id,
            "mid": msg.message_id,
            "user": msg.user_id,
            "uid1": str(uuid.uuid4()),
            "text": msg.text,
            "umeta": psycopg2.extras.Json(user_meta),
            "received": msg.received_at,
            "uid2": str(uuid.uuid4()),
            "reply": reply_text,
            "rmeta": psycopg2.extras.Json(reply_meta),
            "ms": response_ms,
            "tokens": tokens_used,
            "at": reply_at,
        }
        with self.cursor() as cur:
            cur.execute(_SAVE_PREPARED if self.cfg.db_prepare else _SAVE, params)
            rows = cur.fetchall()
        pair = _pair([_chat_row(r) for r in rows])
        if pair is None:
            raise TransientError(errors.DATABASE_UNAVAILABLE, f"message {msg.message_id}: rows not found after saving")
        return pair[0], pair[1], bool(rows[0]["created"])


def _chat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A chat_messages row as the events carry it: timestamps as the API shows them, uuids as strings."""
    out = {k: v for k, v in row.items() if k != "created"}
    for key in ("createdAt", "updatedAt"):
        if isinstance(out.get(key), str):  # from json_agg: ISO text without the 'Z'
            out[key] = datetime.fromisoformat(out[key])
    return jsonable(out)


def _pair(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(user row, reply row), if both are there."""
    by_role = {r["role"]: r for r in rows}
    if "user" in by_role and "bot" in by_role:
        return by_role["user"], by_role["bot"]
    return None


def _has_news(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection's socket is readable: the server said something unasked (it is closing)."""
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


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
            "(README: Tools)",
            user,
            "; ".join(risks),
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
