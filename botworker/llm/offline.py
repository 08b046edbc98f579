"""The offline responder: deterministic replies from the bot's prompt, the detected tool results and the message,
with no network, marked ``model: "offline"`` (the demo, the tests, a worker without GEMINI_KEY)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..message import Message, Reply, ToolResult
from ..store import BotContext
from ..tools.dispatch import ToolRunner
from .responder import estimate_tokens, system_prompt

OFFLINE_MODEL = "offline"
_NAMES_SHOWN = 20
_KIND_WORDS = {
    "list_models": "models",
    "list_applications": "applications",
    "list_bots": "bots",
    "list_prompts": "prompts",
    "list_tools": "tools",
}


class OfflineResponder:
    """Deterministic replies without a language model."""

    waits = False  # pure CPU

    def reply(
        self, ctx: BotContext, msg: Message, results: Sequence[ToolResult], tools: ToolRunner | None = None
    ) -> Reply:
        name = ctx.bot.get("displayName") or ctx.bot.get("name") or "this bot"
        if results:
            text = "\n".join(describe(r) for r in results)
        else:
            text = (
                f'I\'m {name}. You said: "{_clip(msg.text, 200)}". I am running without a language model (offline '
                "mode), so I can run my tools but cannot compose free answers."
            )
            hints = _hints(ctx)
            if hints:
                text += f" Try: {hints}."
        prompt = system_prompt(ctx)
        history = " ".join(h["content"] for h in ctx.history)
        return Reply(text, OFFLINE_MODEL, estimate_tokens(prompt, history, msg.text, text), {"tokensEstimated": True})


def describe(result: ToolResult) -> str:
    """One tool result in a sentence or two."""
    call = result.call
    if not result.ok:
        return f"I could not run {call.name}: {result.error}"
    data: Any = result.data
    op = call.operation
    if op in _KIND_WORDS:
        kind = _KIND_WORDS[op]
        items = data.get("items", [])
        if not items:
            return f"You have no {kind} yet."
        names = ", ".join(str(i.get("name")) for i in items[:_NAMES_SHOWN])
        more = f" and {data['total'] - _NAMES_SHOWN} more" if data["total"] > _NAMES_SHOWN else ""
        return f"Your {kind} ({data['total']}): {names}{more}."
    if op == "get_user_info":
        full = " ".join(x for x in (data.get("firstName"), data.get("lastName")) if x) or data.get("email")
        return f"You are {full} ({data.get('email')}), role {data.get('role')}."
    if op == "search_platform":
        items = data.get("items", [])
        if not items:
            return f'Nothing matches "{data["query"]}".'
        found = "; ".join(f"{i['kind'][:-1]} {i['name']}" for i in items[:_NAMES_SHOWN])
        return f'Found {data["count"]} match(es) for "{data["query"]}": {found}.'
    if op == "list_user_data":
        return "You have " + ", ".join(f"{n} {kind}" for kind, n in data.items()) + "."
    if call.type == "custom_script" and isinstance(data, dict):
        printed = str(data.get("stdout") or "").strip()
        text = f"{call.name} returned {_json(data.get('result'))}."
        return text + (f" It printed: {_clip(printed, 300)}" if printed else "")
    if call.type == "shell_command" and isinstance(data, dict):
        return f"{call.name} printed: {_clip(str(data.get('stdout') or '').strip(), 500) or '(nothing)'}"
    if call.type == "file_operation" and isinstance(data, dict):
        if "content" in data:
            return f"{call.name} read: {_clip(str(data['content']), 500)}"
        if "written" in data:
            return f"{call.name} saved {data['written']} bytes."
        if "entries" in data:
            names = ", ".join(e["name"] for e in data["entries"][:_NAMES_SHOWN]) or "nothing"
            return f"{call.name} lists: {names}."
        if "exists" in data:
            return f"{call.name}: {'it exists' if data['exists'] else 'it does not exist'}."
    return f"{call.name} returned: {_json(data)}"


def _json(value: Any) -> str:
    return _clip(json.dumps(value, ensure_ascii=False, default=str), 500)


def _hints(ctx: BotContext) -> str:
    if any(t.get("type") == "mcp_tool" for t in ctx.tools):
        return '"list my models", "show applications", "search for bots"'
    return ", ".join(f'"use {t["name"]}"' for t in ctx.tools[:3])


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
