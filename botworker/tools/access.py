"""Who may run a tool: pure checks on the tool row, the bot and the asking user. A denial is a reason, not an error.

- the bot's tools run only for the bot's owner (the platform has no sharing yet; loading the bot checks this
  too, and this check keeps holding for calls an LLM asks for);
- only active tools (the loader reads active ones only; a row passed in some other way is still checked);
- ``requiresAuth: true`` (column, or the config's key) needs an active user;
- ``config.roles`` (a list) limits the tool to users whose ``users.role`` is in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def denial(tool: Mapping[str, Any], bot: Mapping[str, Any], user: Mapping[str, Any], user_id: str) -> str | None:
    """None if ``user`` may run ``tool``; otherwise why not, in words the user can read."""
    name = tool.get("displayName") or tool.get("name") or "this tool"
    config = tool.get("config") if isinstance(tool.get("config"), dict) else {}
    if str(bot.get("userId")) != user_id or str(user.get("id", user_id)) != user_id:
        return f"{name} runs only for the owner of this bot"
    if tool.get("isActive") is False:
        return f"{name} is not active"
    # Any truthy spelling counts ("true", 1): a restriction written another way must not fail open.
    if (tool.get("requiresAuth") or _truthy(config.get("requiresAuth"))) and user.get("isActive") is not True:
        return f"{name} requires an authenticated, active user account"
    roles = config.get("roles")
    if roles is not None:
        allowed = [str(r) for r in roles] if isinstance(roles, list) else [str(roles)]
        if str(user.get("role") or "") not in allowed:
            return (
                f"{name} is limited to the role(s) {', '.join(allowed) or '(none)'}; your role is {user.get('role')!r}"
            )
    return None


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0", "no", "off")
    return bool(value)
