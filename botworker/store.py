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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from . import errors
from .config import Config
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

    def _getconn(self) -> psycopg2.extensions.connection:
        """An idle pooled connection, or a new one. (Single-threaded process: a plain list is the pool.)"""
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return psycopg2.connect(**self._connect_args)

    def _putconn(self, conn: psycopg2.extensions.connection, broken: bool) -> None:
        if broken or conn.closed or len(self._idle) >= self.cfg.db_pool_size:
            conn.close()
        else:
            self._idle.append(conn)

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[psycopg2.extras.RealDictCursor]:
        """A pooled connection: one transaction when ``write``, else autocommit (reads skip BEGIN/COMMIT trips).

        A transient failure (server gone, timeout, serialization clash) becomes ``TransientError``; a connection
        that failed is closed, never reused.
        """
        try:
            conn = self._getconn()
            conn.autocommit = not write
        except _TRANSIENT as exc:
            raise TransientError(
                errors.DATABASE_UNAVAILABLE, f"cannot connect to PostgreSQL: {_one_line(exc)}"
            ) from exc
        broken = False
        try:
            # `with conn` would open a transaction even in autocommit mode (psycopg2 >= 2.9): only for writes.
            with conn if write else nullcontext(), conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                yield cur
        except _TRANSIENT as exc:
            broken = conn.closed != 0 or isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))
            raise TransientError(errors.DATABASE_UNAVAILABLE, f"PostgreSQL failed: {_one_line(exc)}") from exc
        finally:
            self._putconn(conn, broken)

    def ping(self) -> None:
        """Raise TransientError unless the database answers."""
        with self.transaction(write=False) as cur:
            cur.execute("SELECT 1")

    # ---- loading -------------------------------------------------------------------------------------------

    def load_context(self, msg: Message) -> BotContext:
        """Bot (owned by the user, active), prompts, tools, instance (found or created), history, earlier save.

        Two or three round trips in autocommit: every statement stands alone (the instance insert is idempotent).
        """
        with self.transaction(write=False) as cur:
            cur.execute(_LOAD_BOT, {"bot": msg.bot_id, "user": msg.user_id, "instance": msg.instance_id})
            row = cur.fetchone()
            if row is None or str(row["userId"]) != msg.user_id:
                # The same answer for "no such bot" and "not yours": ids of other users' bots are not revealed.
                raise MessageError(errors.BOT_NOT_FOUND, f"bot {msg.bot_id} not found for this user")
            if row["user"] is None:
                raise MessageError(errors.USER_NOT_FOUND, f"user {msg.user_id} not found")
            if not row["isActive"]:
                raise MessageError(errors.BOT_INACTIVE, f"bot {msg.bot_id} is not active")
            instance_id = self._instance(cur, msg, row["instance"])
            history, saved = self._conversation(cur, instance_id, msg.message_id)
        row = dict(row)
        user, prompts, tools = row.pop("user"), row.pop("prompts"), row.pop("tools")
        row.pop("instance")
        return BotContext(row, user, prompts, tools, instance_id, history, saved)

    @staticmethod
    def _instance(cur: psycopg2.extensions.cursor, msg: Message, found: dict[str, Any] | None) -> str:
        if msg.instance_id:
            if found is None or found["botId"] != msg.bot_id or found["userId"] != msg.user_id:
                raise MessageError(
                    errors.INSTANCE_NOT_FOUND, f"instance {msg.instance_id} is not an instance of this bot and user"
                )
            return msg.instance_id
        instance_id = str(uuid.uuid5(INSTANCE_NAMESPACE, f"{msg.bot_id}:{msg.user_id}:{msg.message_id}"))
        cur.execute(
            """INSERT INTO bot_instances (id, "botId", "userId", status, "lastStartedAt", "createdAt", "updatedAt")
               VALUES (%s, %s, %s, 'running', now(), now(), now()) ON CONFLICT (id) DO NOTHING""",
            (instance_id, msg.bot_id, msg.user_id),
        )
        return instance_id

    def _conversation(self, cur: psycopg2.extensions.cursor, instance_id: str, message_id: str) -> tuple[list, Any]:
        """The last HISTORY_LIMIT messages (oldest first, this message's own rows excluded), and this message's own
        rows if an earlier attempt saved them: one query."""
        cur.execute(
            f"""(SELECT false AS own, {CHAT_COLUMNS} FROM chat_messages
                 WHERE "botInstanceId" = %(instance)s AND coalesce(metadata->>'messageId', '') <> %(mid)s
                 ORDER BY "createdAt" DESC, id DESC LIMIT %(limit)s)
                UNION ALL
                (SELECT true AS own, {CHAT_COLUMNS} FROM chat_messages
                 WHERE "botInstanceId" = %(instance)s AND metadata->>'messageId' = %(mid)s)""",
            {"instance": instance_id, "mid": message_id, "limit": self.cfg.history_limit},
        )
        rows = cur.fetchall()
        history = [
            {"role": r["role"], "content": r["content"], "createdAt": r["createdAt"]} for r in rows if not r["own"]
        ]
        return history[::-1], _pair([r for r in rows if r["own"]])

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
        """Write both rows in one transaction; returns (user row, reply row, created). Idempotent by message id.

        The advisory lock serialises two attempts of the same message (say, a worker presumed dead that is still
        finishing); the second one finds the first one's rows and returns them.
        """
        with self.transaction() as cur:
            # Two statements, one round trip: lock, then look for an earlier save.
            cur.execute(
                f"""SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0));
                    SELECT {CHAT_COLUMNS} FROM chat_messages
                    WHERE "botInstanceId" = %(instance)s AND metadata->>'messageId' = %(mid)s""",
                {"key": "botworker:" + msg.message_id, "instance": instance_id, "mid": msg.message_id},
            )
            existing = _pair(cur.fetchall())
            if existing:
                return existing[0], existing[1], False
            cur.execute(
                f"""UPDATE bot_instances SET "updatedAt" = now() WHERE id = %s;
                    INSERT INTO chat_messages (id, "botInstanceId", "userId", role, content, metadata,
                                               "responseTime", "tokensUsed", "createdAt", "updatedAt")
                    VALUES (%s, %s, %s, 'user', %s, %s, NULL, NULL, %s, %s),
                           (%s, %s, %s, 'bot', %s, %s, %s, %s, %s, %s)
                    RETURNING {CHAT_COLUMNS}""",
                (
                    instance_id,
                    str(uuid.uuid4()), instance_id, msg.user_id, msg.text, psycopg2.extras.Json(user_meta),
                    msg.received_at, msg.received_at,
                    str(uuid.uuid4()), instance_id, msg.user_id, reply_text, psycopg2.extras.Json(reply_meta),
                    response_ms, tokens_used, reply_at, reply_at,
                ),
            )  # fmt: skip
            user_row, bot_row = _pair(cur.fetchall()) or ({}, {})
        return user_row, bot_row, True


def _pair(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(user row, reply row) as JSON-ready dicts, if both are there."""
    by_role = {r["role"]: jsonable({k: v for k, v in r.items() if k != "own"}) for r in rows}
    if "user" in by_role and "bot" in by_role:
        return by_role["user"], by_role["bot"]
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
