"""The SQL that every message runs against the platform database, in one place: loading a message's context and
saving its exchange exactly once, with the names and parameter types under which they are prepared."""

from __future__ import annotations

CHAT_COLUMNS = (
    'id, "botInstanceId", "userId", role, content, metadata, "responseTime", "tokensUsed", "createdAt", "updatedAt"'
)

LOAD_BOT = """
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
LOAD = f"""
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
FROM ({LOAD_BOT}) q
"""

INSERT_ROW = """INSERT INTO chat_messages (id, "botInstanceId", "userId", role, content, metadata, "responseTime",
                                           "tokensUsed", "createdAt", "updatedAt")"""
# Serialises two attempts of the same message: held until the save's transaction ends.
LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0))"
SAVE = f"""WITH existing AS (
  SELECT {CHAT_COLUMNS} FROM chat_messages WHERE "botInstanceId" = %(instance)s AND metadata->>'messageId' = %(mid)s),
user_row AS ({INSERT_ROW}
  SELECT %(uid1)s, %(instance)s, %(user)s, 'user', %(text)s, %(umeta)s, NULL, NULL, %(received)s, %(received)s
  WHERE NOT EXISTS (SELECT 1 FROM existing) RETURNING {CHAT_COLUMNS}),
bot_row AS ({INSERT_ROW}
  SELECT %(uid2)s, %(instance)s, %(user)s, 'bot', %(reply)s, %(rmeta)s, %(ms)s, %(tokens)s, %(at)s, %(at)s
  WHERE NOT EXISTS (SELECT 1 FROM existing) RETURNING {CHAT_COLUMNS}),
touched AS (UPDATE bot_instances SET "updatedAt" = now() WHERE id = %(instance)s AND NOT EXISTS (SELECT 1 FROM existing))
SELECT * FROM user_row UNION ALL SELECT * FROM bot_row UNION ALL SELECT * FROM existing"""


# The statements every message runs, by name, with their parameters' PostgreSQL types. With DB_PREPARE they are
# prepared once per connection (when the pool opens it) and run as EXECUTE name(...): PostgreSQL then neither parses
# nor plans them again, which is most of its work per message.
NAMED: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "botworker_load": (
        LOAD,
        (("instance", "uuid"), ("create", "boolean"), ("bot", "uuid"), ("user", "uuid"), ("mid", "text"),
         ("limit", "integer")),
    ),
    "botworker_lock": (LOCK, (("key", "text"),)),
    "botworker_save": (
        SAVE,
        (("instance", "uuid"), ("mid", "text"), ("user", "uuid"), ("uid1", "uuid"), ("text", "text"),
         ("umeta", "jsonb"), ("received", "timestamptz"), ("uid2", "uuid"), ("reply", "text"), ("rmeta", "jsonb"),
         ("ms", "integer"), ("tokens", "integer"), ("at", "timestamptz")),
    ),
}  # fmt: skip


def _prepare_all() -> str:
    """The PREPAREs of a new connection: each statement with its %(name)s parameters numbered $1, $2..."""
    out = []
    for name, (sql, params) in NAMED.items():
        for i, (param, _) in enumerate(params, 1):
            sql = sql.replace(f"%({param})s", f"${i}")
        out.append(f"PREPARE {name} ({', '.join(kind for _, kind in params)}) AS {sql}")
    return ";\n".join(out)


PREPARE_ALL = _prepare_all()
EXECUTE = {
    name: f"EXECUTE {name} (" + ", ".join(f"%({p})s" for p, _ in params) + ")" for name, (_, params) in NAMED.items()
}
