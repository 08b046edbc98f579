"""``mcp_tool`` tools: the read-only platform operations, which of them a tool allows, and running them, always
scoped to the message's user.

The user id comes from ``ToolContext.user_id`` (the validated message), never from parameters or text: every
query below filters on it. Each operation returns at most ``LIMIT`` rows plus the total count, and never a
password or a secret value.
"""

from __future__ import annotations

from typing import Any

from ..message import ToolCall, jsonable
from . import ToolContext, ToolFailure

TYPES = ("mcp_tool",)
LIMIT = 50

_LISTS = {
    "list_models": (
        'SELECT id, name, "displayName", description, "isSystem" FROM models WHERE "userId" = %(user)s',
        "name",
    ),
    "list_applications": (
        'SELECT id, name, "displayName", description, status FROM applications WHERE "userId" = %(user)s',
        "name",
    ),
    "list_bots": (
        'SELECT id, name, "displayName", description, "isActive", model FROM bots WHERE "userId" = %(user)s',
        "name",
    ),
    "list_prompts": ('SELECT id, name, description FROM prompts WHERE "userId" = %(user)s', "name"),
    "list_tools": (
        """SELECT t.id, t.name, t."displayName", t.type, t."isActive", b.name AS bot
           FROM bot_tools t JOIN bots b ON b.id = t."botId" WHERE b."userId" = %(user)s""",
        "bot, name",
    ),
}

# kind -> (table expression, columns searched); every one filtered by the owner.
_SEARCHABLE = {
    "models": ('models x WHERE x."userId" = %(user)s', ("x.name", 'x."displayName"', "x.description")),
    "applications": ('applications x WHERE x."userId" = %(user)s', ("x.name", 'x."displayName"', "x.description")),
    "bots": ('bots x WHERE x."userId" = %(user)s', ("x.name", 'x."displayName"', "x.description")),
    "prompts": ('prompts x WHERE x."userId" = %(user)s', ("x.name", "x.description")),
    "tools": (
        'bot_tools x JOIN bots b ON b.id = x."botId" WHERE b."userId" = %(user)s',
        ("x.name", 'x."displayName"', "x.description"),
    ),
}


# Every operation, in the order they are offered; which of them a tool allows is its config's say.
OPERATIONS = (*_LISTS, "get_user_info", "search_platform", "list_user_data")


def allowed_operations(tool: dict[str, Any]) -> tuple[str, ...]:
    """The operations an mcp_tool's config allows: all of them when the config has no ``operations`` key; when it
    has one, only the known operations it lists (a malformed or empty value allows nothing: fail closed)."""
    config = tool.get("config") or {}
    if not isinstance(config, dict) or "operations" not in config:
        return OPERATIONS
    ops = config["operations"]
    if not isinstance(ops, list):
        return ()
    return tuple(op for op in OPERATIONS if op in ops)


def run(call: ToolCall, tool: dict[str, Any], ctx: ToolContext) -> Any:
    op = call.operation
    if op not in allowed_operations(tool):
        raise ToolFailure(f"operation {op!r} is not allowed for tool {call.name}")
    if op in _LISTS:
        return _list(ctx, *_LISTS[op])
    if op == "get_user_info":
        return _user_info(ctx)
    if op == "search_platform":
        return _search(ctx, str(call.params.get("query") or "").strip())
    if op == "list_user_data":
        return _counts(ctx)
    raise ToolFailure(f"unknown platform operation {op!r}")


def _list(ctx: ToolContext, select: str, order: str) -> dict[str, Any]:
    rows = ctx.store.fetch(
        f"SELECT count(*) OVER () AS total, q.* FROM ({select}) q ORDER BY {order} LIMIT {LIMIT}", {"user": ctx.user_id}
    )
    total = rows[0]["total"] if rows else 0
    return {
        "total": total,
        "items": [jsonable({k: v for k, v in r.items() if k != "total"}, api_stamps=True) for r in rows],
    }


def _user_info(ctx: ToolContext) -> dict[str, Any]:
    rows = ctx.store.fetch(
        'SELECT id, email, "firstName", "lastName", role, "isActive", "createdAt" FROM users WHERE id = %s',
        (ctx.user_id,),
    )
    if not rows:
        raise ToolFailure("user not found")
    return jsonable(rows[0], api_stamps=True)


def _search(ctx: ToolContext, query: str) -> dict[str, Any]:
    if not query:
        raise ToolFailure("search_platform needs a query")
    # Escape LIKE's wildcards: the user's text is matched literally.
    pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    parts = []
    for kind, (source, columns) in _SEARCHABLE.items():
        where = " OR ".join(f"{c} ILIKE %(pattern)s" for c in columns)
        parts.append(
            f"(SELECT '{kind}' AS kind, x.id, x.name, x.description FROM {source} AND ({where}) LIMIT {LIMIT})"
        )
    rows = ctx.store.fetch(" UNION ALL ".join(parts), {"user": ctx.user_id, "pattern": pattern})
    items = [jsonable(r, api_stamps=True) for r in rows[:LIMIT]]
    return {"query": query, "count": len(rows), "items": items}


def _counts(ctx: ToolContext) -> dict[str, int]:
    [row] = ctx.store.fetch(
        """SELECT
                 (SELECT count(*) FROM models WHERE "userId" = %(user)s) AS models,
                 (SELECT count(*) FROM applications WHERE "userId" = %(user)s) AS applications,
                 (SELECT count(*) FROM bots WHERE "userId" = %(user)s) AS bots,
                 (SELECT count(*) FROM prompts WHERE "userId" = %(user)s) AS prompts,
                 (SELECT count(*) FROM bot_tools t JOIN bots b ON b.id = t."botId" WHERE b."userId" = %(user)s) AS tools,
                 (SELECT count(*) FROM bot_instances WHERE "userId" = %(user)s) AS conversations,
                 (SELECT count(*) FROM chat_messages WHERE "userId" = %(user)s) AS messages""",
        {"user": ctx.user_id},
    )
    return {k: int(v) for k, v in row.items()}
