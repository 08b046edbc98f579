"""What every responder shares: the ``Responder`` interface, the bot's system prompt, the token estimate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..message import Message, Reply, ToolResult
from ..store import BotContext
from ..tools.dispatch import ToolRunner


class Responder(Protocol):
    """Produces the bot's reply for one message."""

    waits: bool  # whether reply() waits on the network (then the worker's thread gives up its CPU slot meanwhile)

    def reply(self, ctx: BotContext, msg: Message, results: Sequence[ToolResult], tools: ToolRunner) -> Reply:
        """``results``: the calls detection made; ``tools`` runs more (function calling) and records them."""
        ...


def system_prompt(ctx: BotContext) -> str:
    """The bot's active prompt versions, in a stable order, as one system instruction."""
    return "\n\n".join(p["content"].strip() for p in ctx.prompts if p.get("content"))


def estimate_tokens(*texts: str) -> int:
    """The platform's first worker's estimate (characters / 4), used when no model counted tokens."""
    return max(1, sum(len(t) for t in texts) // 4)
