"""Reply generation: the ``Responder`` interface, the offline responder, and ``make_responder`` that picks one.

Two implementations:
- ``gemini.GeminiResponder`` when GEMINI_KEY is set: native function calling, retries, real token counts. It is
  the only module that imports the Gemini SDK (imported here only when a key is configured). A Gemini failure
  raises ``LLMError``: the pipeline answers with its apology and one ``bot_errors`` event. The offline responder
  is never a silent fallback for a configured key.
- ``OfflineResponder`` otherwise (the demo, the tests): deterministic replies from the bot's prompt, the detected
  tool results and the message, with no network, marked ``model: "offline"``. Pattern detection (``detect.py``)
  is how its tools run; with Gemini it stays as a hint (its results are part of the request).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from .config import Config
from .message import Message, Reply, ToolResult
from .store import BotContext
from .tools.dispatch import ToolRunner

log = logging.getLogger(__name__)

OFFLINE_MODEL = "offline"
_NAMES_SHOWN = 20
_KIND_WORDS = {
    "list_models": "models",
    "list_applications": "applications",
    "list_bots": "bots",
    "list_prompts": "prompts",
    "list_tools": "tools",
}


class Responder(Protocol):
    """Produces the bot's reply for one message."""

    def reply(self, ctx: BotContext, msg: Message, results: Sequence[ToolResult], tools: ToolRunner) -> Reply:
        """``results``: the calls detection made; ``tools`` runs more (function calling) and records them."""
        ...


def system_prompt(ctx: BotContext) -> str:
    """The bot's active prompt versions, in a stable order, as one system instruction."""
    return "\n\n".join(p["content"].strip() for p in ctx.prompts if p.get("content"))


def estimate_tokens(*texts: str) -> int:
    """The seed's estimate (characters / 4), used when no model counted tokens."""
    return max(1, sum(len(t) for t in texts) // 4)


class OfflineResponder:
    """Deterministic replies without a language model."""

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


def make_responder(cfg: Config) -> Responder:
    """Gemini when a key is configured, else the offline responder. Called in each worker after the fork; the
    Gemini client itself is created at the first request."""
    if cfg.gemini_key:
        from .gemini import GeminiResponder  # the SDK is imported only by processes that use it

        return GeminiResponder(cfg)
    log.info("GEMINI_KEY is not set: replies come from the offline responder")
    return OfflineResponder()
