"""The platform database: pooled connections, loading a bot and its conversation, saving an exchange.

One ``Store`` per worker process, created after the fork, on psycopg 3 with a ``psycopg_pool`` pool (thread-safe).
A pooled connection that the server closed is replaced before use or, failing that, its statements run again on a
new one, so a PostgreSQL restart costs no attempt; other failures of the server become ``TransientError`` (the
message is retried), never a lost message.

Exactly-once: ``save_exchange`` writes the user row and the reply row in one transaction under an advisory lock
keyed by the message id, after checking that no row carries that id yet; a second run of the same message returns
the rows the first run wrote instead of writing new ones.
"""

from __future__ import annotations

import logging
import select
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from . import errors
from .config import Config, redact_url
from .errors import MessageError, TransientError, one_line
from .message import Message, jsonable

log = logging.getLogger(__name__)

# Instances created for messages without instanceId get an id derived from the message id, so a retried message
# reuses the instance its first attempt created instead of leaving a second one behind.
INSTANCE_NAMESPACE = uuid.UUID("7d1f3c2e-5b0a-4c7e-9a55-2f0c8e6b9d41")

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
# Serialises two attempts of the same message: held until the save's transaction ends.
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0))"
_SAVE = f"""WITH existing AS (
  SELECT {CHAT_COLUMNS} FROM chat_messages WHERE "botInstanceId" = %(instance)s AND metadata->>'messageId' = %(mid)s),
user_row AS ({_INSERT_ROW}
  SELECT %(uid1)s, %(instance)s, %(user)s, 'user', %(text)s, %(umeta)s, NULL, NULL, %(received)s, %(received)s
  WHERE NOT EXISTS (SELECT 1 FROM existing) RETURNING {CHAT_COLUMNS}),
bot_row AS ({_INSERT_ROW}
  SELECT %(uid2)s, %(instance)s, %(user)s, 'bot', %(reply)s, %(rmeta)s, %(ms)s, %(tokens)s, %(at)s, %(at)s
  WHERE NOT EXISTS (SELECT 1 FROM existing) RETURNING {CHAT_COLUMNS}),
touched AS (UPDATE bot_instances SET "updatedAt" = now() WHERE id = %(instance)s AND NOT EXISTS (SELECT 1 FROM existing))
SELECT * FROM user_row UNION ALL SELECT * FROM bot_row UNION ALL SELECT * FROM existing"""


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


# PostgreSQL errors after which the same statements may well succeed: the server went away or is shutting down,
# a timeout, a serialization clash.
_TRANSIENT = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
)
# Errors that say this client's prepared statements are not on the server session it is talking to: PgBouncer in
# transaction mode (before 1.21, or without max_prepared_statements) gives each transaction any server connection.
_PREPARED_ELSEWHERE = (
    psycopg.errors.DuplicatePreparedStatement,
    psycopg.errors.InvalidSqlStatementName,
    psycopg.errors.ProtocolViolation,  # a Bind to a statement of another shape
)

Params = Mapping[str, Any] | Sequence[Any] | None


class _Connection(psycopg.Connection[dict[str, Any]]):
    """The pool's connections; remembers why the last connection attempt of this process failed (the pool itself
    only says that it timed out)."""

    failure = ""

    @classmethod
    def connect(cls, *args: Any, **kwargs: Any) -> _Connection:  # type: ignore[override]
        try:
            conn = super().connect(*args, **kwargs)
        except psycopg.Error as exc:
            _Connection.failure = one_line(exc)
            raise
        _Connection.failure = ""
        return conn  # type: ignore[return-value]


class Store:
    """Pooled access to the platform database for one process.

    Every statement batch runs in pipeline mode in one implicit transaction and one round trip: first the
    transaction's own settings (``statement_timeout``, ``TimeZone`` = UTC, by ``set_config(..., true)``), then the
    statements, then one Sync. Settings travel with each transaction, not with the connection (no ``options``
    startup parameter, no session ``SET``), so the store works behind PgBouncer in transaction mode.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._tool_conn: psycopg.Connection[Any] | None = None
        # psycopg prepares a statement on the server the first time it runs (threshold 0) when DB_PREPARE is on.
        self._threshold: int | None = 0 if cfg.db_prepare else None
        self._frame = (
            f"SELECT set_config('statement_timeout', '{int(cfg.db_statement_timeout * 1000)}', true), "
            "set_config('TimeZone', 'UTC', true)"
        )
        self._connect_args: dict[str, Any] = {
            "connect_timeout": cfg.db_connect_timeout,
            "application_name": "botworker",
            # A silently dead server is noticed in about a minute instead of hanging on TCP.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
        self.pool: ConnectionPool[_Connection] = ConnectionPool(
            cfg.database_url,
            connection_class=_Connection,
            kwargs={**self._connect_args, "autocommit": True, "row_factory": dict_row, "prepare_threshold": None},
            min_size=1,
            max_size=cfg.db_pool_size,
            timeout=cfg.db_connect_timeout,  # how long a caller waits for a connection
            # A failed connection attempt is retried with back-off for this long, then given up: the next caller
            # starts a fresh attempt at once, so a server that is back is used within seconds.
            reconnect_timeout=cfg.db_connect_timeout,
            num_workers=1,
            name="botworker",
            open=True,
        )

    def close(self) -> None:
        self.pool.close(timeout=1.0)
        if self._tool_conn is not None:
            self._tool_conn.close()
            self._tool_conn = None

    # ---- running statements --------------------------------------------------------------------------------

    def fetch(self, sql: str, params: Params = None) -> list[dict[str, Any]]:
        """The rows of one statement on a pooled connection, with the store's timeouts (platform operations,
        secrets). Transient failures become ``TransientError``."""
        return self._run([(sql, params)])

    def ping(self) -> None:
        """Raise TransientError unless the database answers."""
        self._run([("SELECT 1", None)])

    def _run(self, steps: Sequence[tuple[str, Params]]) -> list[dict[str, Any]]:
        """Run ``steps`` in one transaction and one round trip; the rows of the last one.

        A connection that the server closed while it was pooled (a restart) is replaced: the steps run once more on
        a new one, so a PostgreSQL restart costs no message an attempt. They are safe to run again: an aborted
        transaction wrote nothing, and the save is idempotent by message id.
        """
        for attempt in (1, 2):
            try:
                conn = self._checkout()
            except PoolTimeout:
                why = _Connection.failure or f"no connection within {self.cfg.db_connect_timeout}s"
                raise TransientError(errors.DATABASE_UNAVAILABLE, f"cannot connect to PostgreSQL: {why}") from None
            try:
                conn.prepare_threshold = self._threshold
                with conn.pipeline():
                    conn.execute(self._frame)
                    for sql, params in steps:
                        cur = conn.execute(sql, params)
                return cur.fetchall() if cur.description else []
            except _PREPARED_ELSEWHERE as exc:
                self._stop_preparing(exc)
                conn.close()  # its idea of which statements the server holds is wrong
                if attempt == 2:
                    raise TransientError(errors.DATABASE_UNAVAILABLE, f"PostgreSQL failed: {one_line(exc)}") from exc
            except _TRANSIENT as exc:
                if attempt == 2 or not (conn.closed or conn.broken):
                    raise TransientError(errors.DATABASE_UNAVAILABLE, f"PostgreSQL failed: {one_line(exc)}") from exc
                log.info("a pooled PostgreSQL connection was lost (%s): running the statements again on a new one",
                         one_line(exc))  # fmt: skip
            finally:
                self.pool.putconn(conn)
        raise AssertionError("unreachable")

    def _checkout(self) -> _Connection:
        """A pooled connection that the server has not closed while it idled (a restart, an idle timeout, a
        failover: bytes or end-of-file wait on its socket); found without a round trip. Stale ones are closed, and
        the pool makes new ones."""
        for _ in range(self.cfg.db_pool_size):
            conn = self.pool.getconn()
            if not (conn.closed or conn.broken or _has_news(conn)):
                return conn
            conn.close()
            self.pool.putconn(conn)
        return self.pool.getconn()

    def _stop_preparing(self, exc: psycopg.Error) -> None:
        if self._threshold is None:
            return
        self._threshold = None
        log.error(
            "PostgreSQL reports prepared statements missing or clashing (%s): is a connection pooler such as "
            "PgBouncer in transaction mode between us? This worker stops preparing statements; set DB_PREPARE=false "
            "(or give PgBouncer >= 1.21 max_prepared_statements)",
            one_line(exc),
        )
        self.pool.drain()  # every pooled connection may hold statements the server session does not

    # ---- database tools ------------------------------------------------------------------------------------

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
        rows = self._run([(_LOAD, params)])
        row = rows[0] if rows else None
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
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Write both rows atomically; returns (user row, reply row). Idempotent by message id.

        One round trip: an advisory lock keyed by the message id, then one statement that inserts both rows and
        touches the instance unless rows with this message id exist, and returns whichever rows there are, in one
        transaction. The lock serialises two attempts of the same message (say, a worker presumed dead that is
        still finishing): the second one gets the first one's rows.
        """
        params = {
            "instance": instance_id,
            "mid": msg.message_id,
            "user": msg.user_id,
            "uid1": str(uuid.uuid4()),
            "text": msg.text,
            "umeta": Jsonb(user_meta),
            "received": msg.received_at,
            "uid2": str(uuid.uuid4()),
            "reply": reply_text,
            "rmeta": Jsonb(reply_meta),
            "ms": response_ms,
            "tokens": tokens_used,
            "at": reply_at,
        }
        rows = self._run([(_LOCK, {"key": "botworker:" + msg.message_id}), (_SAVE, params)])
        pair = _pair([_chat_row(r) for r in rows])
        if pair is None:
            raise TransientError(errors.DATABASE_UNAVAILABLE, f"message {msg.message_id}: rows not found after saving")
        return pair


def _chat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A chat_messages row as the events carry it: timestamps as the API shows them, uuids as strings."""
    out = {k: v for k, v in row.items() if k != "created"}
    for key in ("createdAt", "updatedAt"):
        if isinstance(out.get(key), str):  # from json_agg: ISO text without the 'Z'
            out[key] = datetime.fromisoformat(out[key])
    return jsonable(out, api_stamps=True)


def _pair(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(user row, reply row), if both are there."""
    by_role = {r["role"]: r for r in rows}
    if "user" in by_role and "bot" in by_role:
        return by_role["user"], by_role["bot"]
    return None


def _has_news(conn: psycopg.Connection[Any]) -> bool:
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
            "(README: Tools)",
            user,
            "; ".join(risks),
        )
