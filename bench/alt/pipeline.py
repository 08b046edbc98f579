"""The bot pipeline as a user of RQ, Celery or Dramatiq would write it: one function, ``handle(payload)``, that the
job/task/actor modules beside this one call. It imports nothing from botworker, so that the alternatives' workers
load only what such a user's would (psycopg 3, redis-py and the standard library).

Per message, on this worker thread's own PostgreSQL connection (psycopg 3, autocommit off: the whole message is one
transaction, committed once after the save; psycopg prepares a statement on the server after its 5th use):

    the bot (owned by the user, active) with its owner row -> its prompts' active versions -> its active tools
    -> the instance: checked (instanceId given) or created (status 'running') -> the last HISTORY_LIMIT messages
    -> "list my models" and an mcp_tool allowing list_models: SELECT on models for the user
    -> the offline reply (the same text as botworker's offline responder) -> INSERT the user row and the bot row
       (one statement) -> touch the instance's "updatedAt" -> COMMIT
    -> LPUSH + PUBLISH the bot_responses event (one redis-py pipeline: MULTI/EXEC, its default)

``handle(payload, sql="fused")`` (the bare loop's "bare-fused" only) loads and saves with botworker's own statements
instead (``botworker/store/statements.py``: LOAD, then LOCK and SAVE, each one execute here), as a floor for
botworker's SQL without its threads and batches.

Any failure rolls back and pushes one bot_errors event; nothing is re-raised, so no library retries the message
(a retry after a partial failure would need the "already saved?" check, which this pipeline leaves out as most
users would: the libraries' at-most-once / at-least-once semantics are theirs).

Configured from the environment the bench gives each fleet: ``DATABASE_URL``, ``REDIS_URL``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import redis
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

HISTORY_LIMIT = 10
RESPONSES = "bot_responses"
ERRORS = "bot_errors"

BOT = """SELECT b.id, b.name, b."displayName", b.model, u.email, u."firstName", u."lastName", u.role
         FROM bots b JOIN users u ON u.id = b."userId"
         WHERE b.id = %s AND b."userId" = %s AND b."isActive" AND u."isActive\""""
PROMPTS = """SELECT DISTINCT ON (p.id) p.id, p.name, v.content, v.version
             FROM bot_prompts bp JOIN prompts p ON p.id = bp."promptId"
             JOIN prompt_versions v ON v."promptId" = p.id AND v."isActive"
             WHERE bp."botId" = %s ORDER BY p.id, v.version DESC"""
TOOLS = """SELECT id, name, "displayName", type, config FROM bot_tools
           WHERE "botId" = %s AND "isActive" ORDER BY "createdAt", name"""
INSTANCE = """SELECT id FROM bot_instances WHERE id = %s AND "botId" = %s AND "userId" = %s"""
NEW_INSTANCE = """INSERT INTO bot_instances (id, "botId", "userId", status, "lastStartedAt", "createdAt", "updatedAt")
                  VALUES (%s, %s, %s, 'running', now(), now(), now()) RETURNING id"""
HISTORY = """SELECT role, content, "createdAt" FROM chat_messages WHERE "botInstanceId" = %s
             ORDER BY "createdAt" DESC, id DESC LIMIT %s"""
LIST_MODELS = """SELECT id, name, "displayName", description, "isSystem" FROM models
                 WHERE "userId" = %s ORDER BY name LIMIT 50"""
SAVE = """INSERT INTO chat_messages (id, "botInstanceId", "userId", role, content, metadata, "responseTime",
                                     "tokensUsed", "createdAt", "updatedAt")
          VALUES (%(uid1)s, %(instance)s, %(user)s, 'user', %(text)s, %(umeta)s, NULL, NULL, %(received)s, %(received)s),
                 (%(uid2)s, %(instance)s, %(user)s, 'bot', %(reply)s, %(rmeta)s, %(ms)s, %(tokens)s, %(at)s, %(at)s)
          RETURNING *"""
TOUCH = """UPDATE bot_instances SET "updatedAt" = now() WHERE id = %s"""

# botworker's detector's phrase for list_models ("list my models", "show me my models", "my models"...).
ASKS_FOR_MODELS = re.compile(
    r"\b(?:list|show|get|display|see|view|give me|what are|which are|tell me)\b[\w\s']{0,30}?\bmodels?\b"
    r"|\bmy models?\b",
    re.IGNORECASE,
)


class _Local(threading.local):
    """This thread's PostgreSQL connection (one per worker process where a process runs one job at a time) and
    the process's Redis client; made on first use, so each forked process makes its own."""

    conn: psycopg.Connection[Any] | None = None


_local = _Local()
_redis: tuple[int, redis.Redis] | None = None


def _connection() -> psycopg.Connection[Any]:
    conn = _local.conn
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(os.environ["DATABASE_URL"], row_factory=dict_row)
    return conn


def _redis_client() -> redis.Redis:
    global _redis
    if _redis is None or _redis[0] != os.getpid():
        _redis = (os.getpid(), redis.Redis.from_url(os.environ["REDIS_URL"]))
    return _redis[1]


def handle(payload: dict[str, Any], sql: str = "plain") -> None:
    """One message: load, run the tool, reply, save both rows, push the event (or the error event). ``sql``:
    "plain" (one statement per thing wanted, as a user writes it) or "fused" (botworker's own two statements)."""
    received = datetime.now(UTC)
    mid = str(payload.get("messageId") or uuid.uuid4())
    conn = _connection()
    try:
        event = _process(conn, payload, mid, received, sql)
        conn.commit()
        channel = RESPONSES
    except Exception as exc:  # one error event per failed message, as the contract asks
        conn.rollback()
        channel = ERRORS
        event = {
            "botId": payload.get("botId"),
            "userId": payload.get("userId"),
            "instanceId": payload.get("instanceId"),
            "messageId": mid,
            "error": str(exc),
            "code": getattr(exc, "code", "internal_error"),
        }
    data = json.dumps(event, default=str)
    pipe = _redis_client().pipeline()
    pipe.lpush(channel, data)
    pipe.publish(channel, data)
    pipe.execute()


class BotError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Loaded:
    """What a message needs before its reply: the bot (with its owner's columns), prompts, tools, history."""

    bot: dict[str, Any]
    prompts: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    instance_id: str
    history: list[dict[str, Any]]


def _process(
    conn: psycopg.Connection[Any], payload: dict[str, Any], mid: str, received: datetime, sql: str
) -> dict[str, Any]:
    bot_id, user_id, text = uuid.UUID(payload["botId"]), uuid.UUID(payload["userId"]), payload["message"]
    given = uuid.UUID(payload["instanceId"]) if payload.get("instanceId") else None
    with conn.cursor() as cur:
        ctx = (_load_fused if sql == "fused" else _load)(cur, bot_id, user_id, given, mid)
        calls = []
        platform = next((t for t in ctx.tools if t["type"] == "mcp_tool" and _allows(t, "list_models")), None)
        if platform is not None and ASKS_FOR_MODELS.search(text):
            started = time.monotonic()
            models = cur.execute(LIST_MODELS, (user_id,)).fetchall()
            items = [{k: str(v) if isinstance(v, uuid.UUID) else v for k, v in m.items()} for m in models]
            calls.append(
                {
                    "tool": platform["name"],
                    "type": "mcp_tool",
                    "operation": "list_models",
                    "ok": True,
                    "durationMs": int((time.monotonic() - started) * 1000),
                    "result": {"total": len(items), "items": items},
                }
            )

        reply = offline_reply(ctx.bot, ctx.tools, text, calls)
        prompt = "\n\n".join(p["content"].strip() for p in ctx.prompts if p["content"])
        history = " ".join(h["content"] for h in ctx.history)
        tokens = max(1, (len(prompt) + len(history) + len(text) + len(reply)) // 4)
        at = datetime.now(UTC)
        meta = {"messageId": mid, "model": "offline", "toolCalls": calls, "tokensEstimated": True}
        row = {
            "instance": uuid.UUID(ctx.instance_id),
            "mid": mid,
            "user": user_id,
            "uid1": uuid.uuid4(),
            "text": text,
            "umeta": Jsonb({"messageId": mid}),
            "received": received,
            "uid2": uuid.uuid4(),
            "reply": reply,
            "rmeta": Jsonb(meta),
            "ms": int((at - received).total_seconds() * 1000),
            "tokens": tokens,
            "at": at,
        }
        if sql == "fused":
            cur.execute(_statements().LOCK, {"key": "botworker:" + mid})
            rows = cur.execute(_statements().SAVE, row).fetchall()
        else:
            rows = cur.execute(SAVE, row).fetchall()
            cur.execute(TOUCH, (row["instance"],))
    by_role = {r["role"]: r for r in rows}
    return {
        "instanceId": ctx.instance_id,
        "botId": str(bot_id),
        "userId": str(user_id),
        "messageId": mid,
        "userMessage": by_role["user"],
        "botResponse": by_role["bot"],
    }


def _load(cur: psycopg.Cursor[Any], bot_id: uuid.UUID, user_id: uuid.UUID, given: uuid.UUID | None, mid: str) -> Loaded:
    """The user's way: one statement per thing wanted."""
    bot = cur.execute(BOT, (bot_id, user_id)).fetchone()
    if bot is None:
        raise BotError("bot_not_found", f"bot {bot_id} not found for this user")
    prompts = cur.execute(PROMPTS, (bot_id,)).fetchall()
    tools = cur.execute(TOOLS, (bot_id,)).fetchall()
    if given is not None:
        if cur.execute(INSTANCE, (given, bot_id, user_id)).fetchone() is None:
            raise BotError("instance_not_found", f"instance {given} is not an instance of this bot and user")
        instance = given
    else:
        instance = cur.execute(NEW_INSTANCE, (uuid.uuid4(), bot_id, user_id)).fetchone()["id"]
    history = cur.execute(HISTORY, (instance, HISTORY_LIMIT)).fetchall()
    return Loaded(bot, prompts, tools, str(instance), history)


def _load_fused(
    cur: psycopg.Cursor[Any], bot_id: uuid.UUID, user_id: uuid.UUID, given: uuid.UUID | None, mid: str
) -> Loaded:
    """botworker's own load statement (bot, user, prompts, tools, instance created or checked, history, this
    message's rows if saved before), one round trip."""
    instance = given or uuid.uuid4()
    params = {"bot": bot_id, "user": user_id, "instance": instance, "create": given is None, "mid": mid}
    row = cur.execute(_statements().LOAD, {**params, "limit": HISTORY_LIMIT}).fetchone()
    if row is None or row["userId"] != user_id or row["user"] is None or not row["isActive"]:
        raise BotError("bot_not_found", f"bot {bot_id} not found for this user")
    found = row["instance"]
    if given is not None and (found is None or found["botId"] != str(bot_id) or found["userId"] != str(user_id)):
        raise BotError("instance_not_found", f"instance {given} is not an instance of this bot and user")
    return Loaded(row, row["prompts"], row["tools"], str(instance), row["history"])


@functools.cache
def _statements() -> ModuleType:
    """botworker/store/statements.py, read as a file: its SQL text only, without importing the botworker package
    (whose modules this process would otherwise load)."""
    path = Path(__file__).resolve().parents[2] / "botworker" / "store" / "statements.py"
    spec = importlib.util.spec_from_file_location("botworker_statements", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _allows(tool: dict[str, Any], operation: str) -> bool:
    ops = (tool.get("config") or {}).get("operations")
    return ops is None or operation in ops


def offline_reply(bot: dict[str, Any], tools: list[dict[str, Any]], text: str, calls: list[dict[str, Any]]) -> str:
    """The text botworker's offline responder gives for these cases (no tool, list_models)."""
    if calls:
        lines = []
        for call in calls:
            result = call["result"]
            names = ", ".join(str(i["name"]) for i in result["items"][:20])
            more = f" and {result['total'] - 20} more" if result["total"] > 20 else ""
            lines.append(
                f"Your models ({result['total']}): {names}{more}." if result["items"] else "You have no models yet."
            )
        return "\n".join(lines)
    name = bot["displayName"] or bot["name"] or "this bot"
    said = text if len(text) <= 200 else text[:199] + "…"
    reply = (
        f'I\'m {name}. You said: "{said}". I am running without a language model (offline mode), so I can run my '
        "tools but cannot compose free answers."
    )
    if any(t["type"] == "mcp_tool" for t in tools):
        reply += ' Try: "list my models", "show applications", "search for bots".'
    return reply
