#!/usr/bin/env python3
"""What fewer PostgreSQL round trips would buy: today's per-message SQL against the same work in 2 round trips.

    .venv/bin/python bench/fused_sql.py [--messages 2000] [--rounds 3]

An experiment for docs/benchmarks.md, not a proposal of finished code. One connection, messages without
instanceId (a new conversation each, as in bench/throughput.py), a seeded bot with a prompt and a platform tool.

- ``today``: the statements ``botworker.store.Store`` sends (commit 5a54606): the bot query, the instance INSERT,
  history + own rows on an autocommit connection but inside ``with conn:``, which psycopg2 >= 2.9 wraps in
  BEGIN/COMMIT anyway; then BEGIN, advisory lock + own rows, UPDATE instance + INSERT both chat rows, COMMIT:
  9 round trips (7 once the reads really run in autocommit).
- ``fused``: one statement that inserts the instance (only if the bot is the user's and active), and returns the
  bot, user, prompts, tools, history and own rows as JSON; then one multi-statement string in autocommit (which
  PostgreSQL runs as one implicit transaction): advisory lock; a CTE that inserts both rows and touches the
  instance unless the message's rows exist, returning either: 2 round trips.
- ``prepared``: either of the above with its statements PREPAREd once per connection (``EXECUTE`` per message:
  no parsing or planning of the big statements per message).

Reports wall time, client CPU and backend CPU per message (median round). Uses REDIS_URL/DATABASE_URL when set
(only DATABASE_URL is used; it writes chat_messages/bot_instances rows for its own freshly seeded bot).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import psutil  # noqa: E402
import psycopg2  # noqa: E402
import psycopg2.extras  # noqa: E402
from throughput import machine_line, new_bot, servers  # noqa: E402

from botworker.schema import migrate  # noqa: E402
from botworker.store import _LOAD_BOT, CHAT_COLUMNS, INSTANCE_NAMESPACE  # noqa: E402

HISTORY_LIMIT = 10

# ---- today's statements (as botworker/store.py sends them) ---------------------------------------------------

_INSERT_INSTANCE = """INSERT INTO bot_instances (id, "botId", "userId", status, "lastStartedAt", "createdAt", "updatedAt")
   VALUES (%s, %s, %s, 'running', now(), now(), now()) ON CONFLICT (id) DO NOTHING"""

_CONVERSATION = f"""(SELECT false AS own, {CHAT_COLUMNS} FROM chat_messages
     WHERE "botInstanceId" = %(instance)s AND coalesce(metadata->>'messageId', '') <> %(mid)s
     ORDER BY "createdAt" DESC, id DESC LIMIT %(limit)s)
    UNION ALL
    (SELECT true AS own, {CHAT_COLUMNS} FROM chat_messages
     WHERE "botInstanceId" = %(instance)s AND metadata->>'messageId' = %(mid)s)"""

_LOCK_FIND = f"""SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0));
    SELECT {CHAT_COLUMNS} FROM chat_messages
    WHERE "botInstanceId" = %(instance)s AND metadata->>'messageId' = %(mid)s"""

_UPDATE_INSERT = f"""UPDATE bot_instances SET "updatedAt" = now() WHERE id = %s;
    INSERT INTO chat_messages (id, "botInstanceId", "userId", role, content, metadata,
                               "responseTime", "tokensUsed", "createdAt", "updatedAt")
    VALUES (%s, %s, %s, 'user', %s, %s, NULL, NULL, %s, %s),
           (%s, %s, %s, 'bot', %s, %s, %s, %s, %s, %s)
    RETURNING {CHAT_COLUMNS}"""

# ---- fused ---------------------------------------------------------------------------------------------------

_FUSED_LOAD = f"""
WITH ins AS (
  INSERT INTO bot_instances (id, "botId", "userId", status, "lastStartedAt", "createdAt", "updatedAt")
  SELECT %(instance)s, b.id, b."userId", 'running', now(), now(), now()
  FROM bots b WHERE %(create)s AND b.id = %(bot)s AND b."userId" = %(user)s AND b."isActive"
  ON CONFLICT (id) DO NOTHING RETURNING id)
SELECT q.*,
  (SELECT coalesce(json_agg(h ORDER BY h."createdAt", h.id), '[]'::json) FROM (
     SELECT id, role, content, "createdAt" FROM chat_messages
     WHERE "botInstanceId" = %(instance)s AND coalesce(metadata->>'messageId', '') <> %(mid)s
     ORDER BY "createdAt" DESC, id DESC LIMIT %(limit)s) h) AS history,
  (SELECT json_agg(o) FROM (
     SELECT {CHAT_COLUMNS} FROM chat_messages
     WHERE "botInstanceId" = %(instance)s AND metadata->>'messageId' = %(mid)s) o) AS own,
  (SELECT count(*) FROM ins) AS created
FROM ({_LOAD_BOT.replace("%(instance)s", "%(instance)s::uuid")}) q
"""

_FUSED_SAVE = f"""SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0));
WITH existing AS (
  SELECT {CHAT_COLUMNS} FROM chat_messages WHERE "botInstanceId" = %(instance)s AND metadata->>'messageId' = %(mid)s),
ins AS (
  INSERT INTO chat_messages (id, "botInstanceId", "userId", role, content, metadata,
                             "responseTime", "tokensUsed", "createdAt", "updatedAt")
  SELECT v.* FROM (VALUES
     (%(uid1)s::uuid, %(instance)s::uuid, %(user)s::uuid, 'user'::chat_messages_role_enum, %(text)s, %(umeta)s::jsonb,
      NULL::int, NULL::int, %(received)s::timestamp, %(received)s::timestamp),
     (%(uid2)s::uuid, %(instance)s::uuid, %(user)s::uuid, 'bot'::chat_messages_role_enum, %(reply)s, %(rmeta)s::jsonb,
      %(ms)s::int, %(tokens)s::int, %(at)s::timestamp, %(at)s::timestamp)) v
  WHERE NOT EXISTS (SELECT 1 FROM existing)
  RETURNING {CHAT_COLUMNS}),
upd AS (
  UPDATE bot_instances SET "updatedAt" = now() WHERE id = %(instance)s AND NOT EXISTS (SELECT 1 FROM existing))
SELECT true AS created, ins.* FROM ins UNION ALL SELECT false AS created, existing.* FROM existing"""


def _dollars(sql: str, names: list[str]) -> str:
    """A statement with %(name)s placeholders as a PREPARE body with $1..$n."""
    for i, name in enumerate(names, 1):
        sql = sql.replace(f"%({name})s", f"${i}")
    return sql


_FIND = f"""SELECT {CHAT_COLUMNS} FROM chat_messages
    WHERE "botInstanceId" = %(instance)s AND metadata->>'messageId' = %(mid)s"""
_INSERT_ROWS = f"""INSERT INTO chat_messages (id, "botInstanceId", "userId", role, content, metadata,
                               "responseTime", "tokensUsed", "createdAt", "updatedAt")
    VALUES (%(uid1)s, %(instance)s, %(user)s, 'user', %(text)s, %(umeta)s, NULL, NULL, %(received)s, %(received)s),
           (%(uid2)s, %(instance)s, %(user)s, 'bot', %(reply)s, %(rmeta)s, %(ms)s, %(tokens)s, %(at)s, %(at)s)
    RETURNING {CHAT_COLUMNS}"""
_SAVE_CTE = _FUSED_SAVE.split(";", 1)[1]

LOAD_ARGS = ["instance", "create", "bot", "user", "mid", "limit"]
SAVE_ARGS = [
    "instance",
    "mid",
    "uid1",
    "uid2",
    "user",
    "text",
    "umeta",
    "received",
    "reply",
    "rmeta",
    "ms",
    "tokens",
    "at",
]
INSERT_ARGS = ["uid1", "instance", "user", "text", "umeta", "received", "uid2", "reply", "rmeta", "ms", "tokens", "at"]
PREPARES = [
    ("bw_bot (uuid, uuid, uuid)", _dollars(_LOAD_BOT, ["bot", "user", "instance"])),
    ("bw_conv (uuid, text, int)", _dollars(_CONVERSATION, ["instance", "mid", "limit"])),
    ("bw_find (uuid, text)", _dollars(_FIND, ["instance", "mid"])),
    (
        "bw_ins (uuid, uuid, uuid, text, jsonb, timestamp, uuid, text, jsonb, int, int, timestamp)",
        _dollars(_INSERT_ROWS, INSERT_ARGS),
    ),
    ("bw_load (uuid, boolean, uuid, uuid, text, int)", _dollars(_FUSED_LOAD, LOAD_ARGS)),
    (
        "bw_save (uuid, text, uuid, uuid, uuid, text, jsonb, timestamp, text, jsonb, int, int, timestamp)",
        _dollars(_SAVE_CTE, SAVE_ARGS),
    ),
]


def _execute(name: str, args: list[str]) -> str:
    return f"EXECUTE {name} (" + ", ".join(f"%({a})s" for a in args) + ")"


# ---- the loops -----------------------------------------------------------------------------------------------


class Case:
    def __init__(self, bot_id: str, user_id: str) -> None:
        self.bot_id, self.user_id = bot_id, user_id

    def ids(self) -> tuple[str, str]:
        mid = f"fused-{uuid.uuid4().hex}"
        return mid, str(uuid.uuid5(INSTANCE_NAMESPACE, f"{self.bot_id}:{self.user_id}:{mid}"))


def today(conn: psycopg2.extensions.connection, case: Case, prepared: bool = False, fixed: bool = False) -> None:
    """``fixed=False``: exactly as Store sends it, the reads inside ``with conn:``, which psycopg2 >= 2.9 wraps in
    BEGIN/COMMIT even on an autocommit connection (9 round trips). ``fixed=True``: reads really in autocommit."""
    mid, instance = case.ids()
    ts = psycopg2.TimestampFromTicks(time.time())
    p = {
        "bot": case.bot_id,
        "user": case.user_id,
        "instance": None,
        "mid": mid,
        "limit": HISTORY_LIMIT,
        "key": "botworker:" + mid,
    }
    conn.autocommit = True
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur, nullcontext() if fixed else conn:
        cur.execute(_execute("bw_bot", ["bot", "user", "instance"]) if prepared else _LOAD_BOT, p)
        cur.fetchone()
        cur.execute(_INSERT_INSTANCE, (instance, case.bot_id, case.user_id))
        p["instance"] = instance
        cur.execute(_execute("bw_conv", ["instance", "mid", "limit"]) if prepared else _CONVERSATION, p)
        cur.fetchall()
    conn.autocommit = False
    p.update(save_params(case, mid, instance, ts))
    with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        if prepared:
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0));"
                + _execute("bw_find", ["instance", "mid"]),
                p,
            )
        else:
            cur.execute(_LOCK_FIND, p)
        cur.fetchall()
        if prepared:
            cur.execute(
                'UPDATE bot_instances SET "updatedAt" = now() WHERE id = %(instance)s;'
                + _execute("bw_ins", INSERT_ARGS),
                p,
            )
        else:
            cur.execute('UPDATE bot_instances SET "updatedAt" = now() WHERE id = %(instance)s;' + _INSERT_ROWS, p)
        cur.fetchall()


def save_params(case: Case, mid: str, instance: str, ts: object) -> dict[str, object]:
    return {
        "key": "botworker:" + mid,
        "instance": instance,
        "mid": mid,
        "uid1": str(uuid.uuid4()),
        "uid2": str(uuid.uuid4()),
        "user": case.user_id,
        "text": "hello",
        "umeta": psycopg2.extras.Json({"messageId": mid}),
        "received": ts,
        "reply": "reply text",
        "rmeta": psycopg2.extras.Json({"messageId": mid}),
        "ms": 3,
        "tokens": 60,
        "at": ts,
    }


def fused(conn: psycopg2.extensions.connection, case: Case, prepared: bool = False) -> None:
    mid, instance = case.ids()
    conn.autocommit = True
    p: dict[str, object] = {
        "instance": instance,
        "create": True,
        "bot": case.bot_id,
        "user": case.user_id,
        "mid": mid,
        "limit": HISTORY_LIMIT,
    }
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(_execute("bw_load", LOAD_ARGS) if prepared else _FUSED_LOAD, p)
        row = cur.fetchone()
        assert row is not None and row["created"] == 1, row
        p.update(save_params(case, mid, instance, psycopg2.TimestampFromTicks(time.time())))
        if prepared:
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0));" + _execute("bw_save", SAVE_ARGS), p
            )
        else:
            cur.execute(_FUSED_SAVE, p)
        rows = cur.fetchall()
        assert len(rows) == 2 and all(r["created"] for r in rows), rows


def measure(conn: psycopg2.extensions.connection, backend: psutil.Process, n: int, step: Callable[[], None]) -> tuple:
    def cpu() -> float:
        t = backend.cpu_times()
        return t.user + t.system

    w, c, s = time.perf_counter(), time.process_time(), cpu()
    for _ in range(n):
        step()
    return (
        (time.perf_counter() - w) / n * 1e6,
        (time.process_time() - c) / n * 1e6,
        (cpu() - s) / n * 1e6,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine_line()}")
    with servers() as srv:
        migrate(srv.database_url)
        bot = new_bot(srv.database_url)
        case = Case(bot.bot_id, bot.user_id)
        conn = psycopg2.connect(srv.database_url, options="-c timezone=UTC")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                backend = psutil.Process(cur.fetchone()[0])
                for head, body in PREPARES:
                    cur.execute(f"PREPARE {head} AS {body}")
            cases = {
                "today, as Store sends it (9 round trips)": lambda: today(conn, case),
                "today, reads really in autocommit (7 round trips)": lambda: today(conn, case, fixed=True),
                "today, autocommit + heavy statements prepared (7)": lambda: today(conn, case, True, True),
                "fused (2 round trips)": lambda: fused(conn, case),
                "fused and prepared (2 round trips)": lambda: fused(conn, case, prepared=True),
            }
            for step in cases.values():  # warm-up and a correctness check of each path
                for _ in range(50):
                    step()
            results: dict[str, list[tuple]] = {name: [] for name in cases}
            for _ in range(args.rounds):  # interleaved rounds, so drift on a shared machine hits all alike
                for name, step in cases.items():
                    results[name].append(measure(conn, backend, args.messages, step))
        finally:
            conn.close()

    print(f"\n## PostgreSQL work of one message, {args.messages} messages x {args.rounds} rounds, one connection\n")
    print("| variant | wall µs/msg | client CPU µs/msg | backend CPU µs/msg | CPU µs/msg total |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in results.items():
        med = [sorted(r[i] for r in rows)[len(rows) // 2] for i in range(3)]
        print(f"| {name} | {med[0]:.0f} | {med[1]:.0f} | {med[2]:.0f} | {med[1] + med[2]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
