"""``Pipeline.handle(message) -> Outcome``: the whole flow of one message, with its dependencies injected.

    load bot, prompts, tools, instance, history ─▶ already saved? (a retry) ─▶ replay the saved rows
                                                 └▶ detect tool calls ─▶ run them ─▶ reply ─▶ save both rows

Expected failures are ``MessageError``s raised by the steps (unknown bot, bad instance...) or failed
``ToolResult``s (a failing tool still gets a reply, plus a ``tool_failed`` error event). Nothing here catches
``Exception``: the one catch-all is at the message boundary in ``worker.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sandbox.client import SandboxClient

from . import errors
from .config import Config
from .detect import detect
from .llm import Responder
from .message import Message, ToolResult
from .store import Store
from .tools import ToolContext, dispatch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one handled message produced: the two saved rows, and an error to report beside the reply."""

    instance_id: str
    user_row: dict[str, Any]
    bot_row: dict[str, Any]
    error_code: str | None = None
    error: str | None = None
    replayed: bool = False


def utcnow() -> datetime:
    return datetime.now(UTC)


class Pipeline:
    """Processes validated messages; one per worker process."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        responder: Responder,
        tick: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = utcnow,
        sandbox: SandboxClient | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.responder = responder
        self.sandbox = sandbox
        self.tick = tick  # called between steps: the worker's heartbeat
        self.clock = clock

    def handle(self, msg: Message) -> Outcome:
        ctx = self.store.load_context(msg)
        if ctx.saved is not None:
            log.info("message %s was already saved by an earlier attempt: replaying its reply", msg.message_id)
            return _outcome(ctx.instance_id, *ctx.saved, replayed=True)

        calls = detect(msg.text, ctx.tools)
        tool_ctx = ToolContext(msg.user_id, ctx.bot, ctx.tools, self.store, self.cfg, self.sandbox)
        results: list[ToolResult] = []
        for call in calls:
            log.info(
                "🔧 Tool detected: %s (%s)", call.name, call.type + (f"/{call.operation}" if call.operation else "")
            )
            log.info("📝 Extracted params: %s", _short(call.params))
            self.tick()
            result = dispatch(call, tool_ctx)
            if not result.ok:
                log.warning("tool %s failed: %s", call.name, result.error)
            results.append(result)

        self.tick()
        reply = self.responder.reply(ctx, msg, results)
        reply_at = self.clock()
        metadata = {
            "messageId": msg.message_id,
            "model": reply.model,
            "toolCalls": [r.summary() for r in results],
            **reply.extra,
        }
        response_ms = max(0, int((reply_at - msg.received_at).total_seconds() * 1000))
        user_row, bot_row, _ = self.store.save_exchange(
            msg,
            ctx.instance_id,
            reply.text,
            reply_at,
            reply.tokens_used,
            response_ms,
            {"messageId": msg.message_id},
            metadata,
        )
        return _outcome(ctx.instance_id, user_row, bot_row)


def _outcome(instance_id: str, user_row: dict[str, Any], bot_row: dict[str, Any], replayed: bool = False) -> Outcome:
    """Derive the tool_failed error from the saved metadata, so a replay reports exactly what the first run did."""
    calls = (bot_row.get("metadata") or {}).get("toolCalls") or []
    failed = [c for c in calls if not c.get("ok")]
    if not failed:
        return Outcome(instance_id, user_row, bot_row, replayed=replayed)
    error = "; ".join(f"tool {c.get('tool')} failed: {c.get('error')}" for c in failed)
    return Outcome(instance_id, user_row, bot_row, errors.TOOL_FAILED, error, replayed)


def _short(params: dict[str, Any], limit: int = 200) -> str:
    text = repr(params)
    return text if len(text) <= limit else text[:limit] + "…"
