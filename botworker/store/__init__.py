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
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from .. import errors
from ..config import Config
from ..errors import MessageError, TransientError, one_line
from ..message import Message, jsonable
from .connections import PooledConnection, ToolConnection, dict_rows, has_news
from .statements import EXECUTE, NAMED, PREPARE_ALL


def database_health(database_url: str, connect_timeout: int) -> dict[str, Any]:
    """`botworker status`'s look at PostgreSQL: reachable or why not, its version, one round trip's time, and how
    many connections the fleet holds (application_name ``botworker``; through a pooler, the pooler's)."""
    try:
        with psycopg.connect(database_url, connect_timeout=connect_timeout, autocommit=True) as conn:
            started = time.monotonic()
            conn.execute("SELECT 1")
            took = (time.monotonic() - started) * 1000
            row = conn.execute(
                "SELECT current_setting('server_version') AS version, (SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'botworker') AS fleet"
            ).fetchone()
    except psycopg.Error as exc:
        return {"ok": False, "error": one_line(str(exc))}
    version, fleet = row if row else (None, None)
    return {"ok": True, "version": version, "selectMs": round(took, 2), "fleetConnections": fleet}


PROBE_SHARED = 0.5  # seconds a probe's answer (the database is up, or down and why) serves every thread

log = logging.getLogger(__name__)

# Instances created for messages without instanceId get an id derived from the message id, so a retried message
# reuses the instance its first attempt created instead of leaving a second one behind.
INSTANCE_NAMESPACE = uuid.UUID("7d1f3c2e-5b0a-4c7e-9a55-2f0c8e6b9d41")
FRAME_STATEMENTS = 2  # the SET LOCALs that open a transaction when the session cannot hold the settings


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


class Store:
    """Pooled access to the platform database for one process.

    Each step (load, save, a platform operation) is one query string, its values quoted in by psycopg's
    ``ClientCursor``: one round trip, one implicit transaction. The session settings (``statement_timeout``,
    ``TimeZone`` = UTC) are asked for when a connection opens (the ``options`` startup parameter) and checked. Behind
    a pooler in transaction mode, which refuses or drops them and would hand a session ``SET`` to other clients,
    every transaction starts with ``SET LOCAL`` of both instead: the store works behind PgBouncer with its default
    settings. (psycopg's pipeline mode would also give one round trip, with values bound on the server, but its
    synchronous wait polls the socket until the answer comes: +0.35 ms of worker CPU per message, 20% of the
    throughput, measured side by side.)
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._prepare = cfg.db_prepare
        timeout = int(cfg.db_statement_timeout * 1000)
        self._session = {"statement_timeout": str(timeout), "TimeZone": "UTC"}
        # Sent first in every transaction when the session cannot be trusted to hold the settings (a pooler).
        self._frame = f"SET LOCAL statement_timeout = {timeout}; SET LOCAL TimeZone = 'UTC'"
        self._per_transaction = False
        self._connect_args: dict[str, Any] = {
            "connect_timeout": cfg.db_connect_timeout,
            "application_name": "botworker",
            # A silently dead server is noticed in about a minute instead of hanging on TCP.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
        self.tools = ToolConnection(cfg, self._connect_args)
        self._probing = threading.Lock()
        self._probed_at = -PROBE_SHARED
        self._probe_error: str | None = None  # why the last probe failed
        self._connection_class = PooledConnection.for_store()
        options = f"-c statement_timeout={timeout} -c TimeZone=UTC"
        self.pool: ConnectionPool[PooledConnection] = ConnectionPool(
            cfg.database_url,
            connection_class=self._connection_class,
            kwargs={
                **self._connect_args,
                "options": options,
                "autocommit": True,
                "row_factory": dict_rows,
                "cursor_factory": psycopg.ClientCursor,
                "prepare_threshold": None,
            },
            configure=self._configure,
            # A fixed size: a pool that grows when a caller waits would rotate this process's statements over more
            # server backends than it has callers (measured: 10-20% of the throughput with a second idle backend).
            min_size=cfg.pool_size,
            max_size=cfg.pool_size,
            timeout=cfg.db_connect_timeout,  # how long a caller waits for a connection
            # A failed connection attempt is retried with back-off (1 s, 2 s, ...) for this long, then given up: the
            # next caller starts a fresh attempt at once. One second, so that the consumers' probe (about once a
            # second during an outage) meets no back-off and a server that is back is used within about a second.
            reconnect_timeout=1.0,
            # ...and when an attempt is given up, the next one starts at once: a caller waiting for a connection
            # (up to DB_CONNECT_TIMEOUT) gets one within about a second of the server's return.
            reconnect_failed=lambda pool: pool.check(),
            num_workers=1,
            name="botworker",
            open=True,
        )

    def close(self) -> None:
        self.pool.close(timeout=1.0)
        self.tools.close()

    # ---- running statements --------------------------------------------------------------------------------

    def fetch(self, sql: str, params: Params = None) -> list[dict[str, Any]]:
        """The rows of one statement on a pooled connection, with the store's timeouts (platform operations,
        secrets). Transient failures become ``TransientError``."""
        return self._run([(sql, params)])

    def ping(self) -> None:
        """Raise TransientError unless the database answers. Asked on a fresh connection, not a pooled one: during
        an outage the pool retries with back-off, and a server that is back should be seen at once. One probe at a
        time per process, its answer shared for PROBE_SHARED seconds (a process's waiting threads then cost the
        server one connection, not one each); when the server answers, the pool checks its connections and grows
        back at once."""
        probed = False
        with self._probing:
            if time.monotonic() - self._probed_at >= PROBE_SHARED:
                probed = True
                try:
                    with psycopg.connect(self.cfg.database_url, **self._connect_args) as conn:
                        conn.execute("SELECT 1")
                    self._probe_error = None
                except psycopg.Error as exc:
                    self._probe_error = f"cannot connect to PostgreSQL: {one_line(str(exc))}"
                self._probed_at = time.monotonic()
            failed = self._probe_error
        if failed is not None:
            raise TransientError(errors.DATABASE_UNAVAILABLE, failed)
        if probed:  # (once per answer, not once per thread that shared it)
            self.pool.check()

    def _run(self, steps: Sequence[tuple[str, Params]]) -> list[dict[str, Any]]:
        """Run ``steps`` in one transaction and one round trip; the rows of the last one."""
        return self._run_all(steps)[-1]

    def _run_all(self, steps: Sequence[tuple[str, Params]]) -> list[list[dict[str, Any]]]:
        """Run ``steps`` in one transaction and one round trip; the rows of each.

        A connection that the server closed while it was pooled (a restart) is replaced: the steps run once more on
        a new one, so a PostgreSQL restart costs no message an attempt. They are safe to run again: an aborted
        transaction wrote nothing, and the save is idempotent by message id.
        """
        for attempt in (1, 2):
            try:
                conn = self._checkout()
            except PoolTimeout:
                why = self._connection_class.failure or f"no connection within {self.cfg.db_connect_timeout}s"
                raise TransientError(errors.DATABASE_UNAVAILABLE, f"cannot connect to PostgreSQL: {why}") from None
            try:
                with conn.cursor() as cur:
                    query, framed = self._query(cur, steps)
                    cur.execute(query)
                    sets = [_rows(cur)]
                    while cur.nextset():
                        sets.append(_rows(cur))
                    return sets[framed:]
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

    def _checkout(self) -> PooledConnection:
        """A pooled connection that the server has not closed while it idled (a restart, an idle timeout, a
        failover: bytes or end-of-file wait on its socket); found without a round trip. Stale ones are closed, and
        the pool makes new ones."""
        for _ in range(self.cfg.pool_size):
            conn = self.pool.getconn()
            if not (conn.closed or conn.broken or has_news(conn)):
                return conn
            conn.close()
            self.pool.putconn(conn)
        return self.pool.getconn()

    def _query(self, cur: psycopg.ClientCursor[Any], steps: Sequence[tuple[str, Params]]) -> tuple[str, int]:
        """One query string: the settings, then each step (a named statement, or SQL) with its values quoted in;
        and how many result sets the settings give before the steps' own."""
        framed = self._per_transaction or self._connection_class.without_options
        parts = [self._frame] if framed else []
        for sql, params in steps:
            if sql in NAMED:
                sql = EXECUTE[sql] if self._prepare else NAMED[sql][0]
            parts.append(cur.mogrify(sql, params) if params is not None else sql)
        return ";\n".join(parts), FRAME_STATEMENTS if framed else 0

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """A new pooled connection: check that the session holds the settings asked for in the startup packet (a
        pooler may drop them silently: then they go in every transaction), and prepare the named statements
        (DB_PREPARE). A clash says that a pooler shares server sessions between clients: then nothing is prepared
        any more."""
        if not self._per_transaction:
            shown = conn.execute(  # pg_settings gives the timeout in ms ("30000"); current_setting says "30s"
                "SELECT (SELECT setting FROM pg_settings WHERE name = 'statement_timeout') AS t,"
                " current_setting('TimeZone') AS z"
            )
            row = shown.fetchone() or {}
            if (row.get("t"), row.get("z")) != (self._session["statement_timeout"], self._session["TimeZone"]):
                log.info("the session did not keep its settings (a pooler?): they go in every transaction")
                self._per_transaction = True
        if not self._prepare:
            return
        try:
            conn.execute(PREPARE_ALL)
        except psycopg.errors.DuplicatePreparedStatement as exc:
            self._stop_preparing(exc, drain=False)

    def _stop_preparing(self, exc: psycopg.Error, drain: bool = True) -> None:
        if not self._prepare:
            return
        self._prepare = False
        log.error(
            "PostgreSQL reports prepared statements missing or clashing (%s): is a connection pooler such as "
            "PgBouncer in transaction mode between us? This worker stops preparing statements; set DB_PREPARE=false "
            "(or give PgBouncer >= 1.21 max_prepared_statements)",
            one_line(exc),
        )
        if drain:
            self.pool.drain()  # every pooled connection may hold statements the server session does not

    def tool_connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """Database tools' own connection, never one of the pool's (``ToolConnection`` says how it is kept clean)."""
        return self.tools.connection()

    # ---- loading -------------------------------------------------------------------------------------------

    def load_context(self, msg: Message) -> BotContext:
        """Bot (owned by the user, active), prompts, tools, instance (found or created), history, earlier save:
        one statement, one round trip."""
        instance_id, params = self._load_params(msg)
        return _context(msg, instance_id, self._run([("botworker_load", params)]))

    def load_contexts(self, msgs: Sequence[Message]) -> list[BotContext | MessageError]:
        """``load_context`` of several messages in one round trip (and one transaction): each message's context,
        or the MessageError that says why it has none."""
        if not msgs:
            return []
        loads = [self._load_params(msg) for msg in msgs]
        sets = self._run_all([("botworker_load", params) for _, params in loads])
        out: list[BotContext | MessageError] = []
        for msg, (instance_id, _), rows in zip(msgs, loads, sets, strict=True):
            try:
                out.append(_context(msg, instance_id, rows))
            except MessageError as exc:
                out.append(exc)
        return out

    def _load_params(self, msg: Message) -> tuple[str, dict[str, Any]]:
        if msg.instance_id:
            instance_id = msg.instance_id
        else:
            instance_id = str(uuid.uuid5(INSTANCE_NAMESPACE, f"{msg.bot_id}:{msg.user_id}:{msg.message_id}"))
        return instance_id, {
            "bot": msg.bot_id,
            "user": msg.user_id,
            "instance": instance_id,
            "create": msg.instance_id is None,
            "mid": msg.message_id,
            "limit": self.cfg.history_limit,
        }

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
        ex = Exchange(msg, instance_id, reply_text, reply_at, tokens_used, response_ms, user_meta, reply_meta)
        return self.save_exchanges([ex])[0]

    def save_exchanges(self, exchanges: Sequence[Exchange]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """``save_exchange`` of several messages in one round trip and one transaction (all saved, or none: the
        caller may then save them one by one). Their locks are taken in one order, so two batches sharing a
        message cannot deadlock."""
        if not exchanges:
            return []
        order = sorted(range(len(exchanges)), key=lambda i: exchanges[i].msg.message_id)
        steps: list[tuple[str, Params]] = []
        for i in order:
            ex = exchanges[i]
            steps += [("botworker_lock", {"key": "botworker:" + ex.msg.message_id}), ("botworker_save", ex.params())]
        sets = self._run_all(steps)
        pairs: list[tuple[dict[str, Any], dict[str, Any]]] = [({}, {})] * len(exchanges)
        for n, i in enumerate(order):
            pair = _pair([_chat_row(r) for r in sets[2 * n + 1]])
            if pair is None:
                mid = exchanges[i].msg.message_id
                raise TransientError(errors.DATABASE_UNAVAILABLE, f"message {mid}: rows not found after saving")
            pairs[i] = pair
        return pairs


@dataclass(frozen=True)
class Exchange:
    """One message's exchange to save: the user's message and the bot's reply, with their metadata."""

    msg: Message
    instance_id: str
    reply_text: str
    reply_at: datetime
    tokens_used: int
    response_ms: int
    user_meta: dict[str, Any]
    reply_meta: dict[str, Any]

    def params(self) -> dict[str, Any]:
        return {
            "instance": self.instance_id,
            "mid": self.msg.message_id,
            "user": self.msg.user_id,
            "uid1": str(uuid.uuid4()),
            "text": self.msg.text,
            "umeta": Jsonb(self.user_meta),
            "received": self.msg.received_at,
            "uid2": str(uuid.uuid4()),
            "reply": self.reply_text,
            "rmeta": Jsonb(self.reply_meta),
            "ms": self.response_ms,
            "tokens": self.tokens_used,
            "at": self.reply_at,
        }


def _context(msg: Message, instance_id: str, rows: list[dict[str, Any]]) -> BotContext:
    """The load statement's row -> the message's context, or the MessageError that says why there is none."""
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


def _rows(cur: psycopg.ClientCursor[Any]) -> list[dict[str, Any]]:
    """The current result set's rows ([] for a statement that returns none)."""
    res = cur.pgresult  # (not cur.description: it builds column objects we never use)
    return cur.fetchall() if res is not None and res.nfields else []


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
