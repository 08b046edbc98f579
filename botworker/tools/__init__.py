"""Tool families and dispatch: ``dispatch(call, ctx)`` runs one tool call and always returns a ``ToolResult``.

Each family is one module exposing ``TYPES`` (the ``bot_tools.type`` values it runs) and ``run(call, tool, ctx)``,
which returns JSON-able data or raises ``ToolFailure`` with a reason a user can read. ``dispatch`` is the one place
that turns any exception into a failed result, so a broken tool never takes the message down with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox.client import SandboxClient

from ..config import Config
from ..message import ToolCall, ToolResult
from ..store import Store

log = logging.getLogger(__name__)


class ToolFailure(Exception):
    """A tool call failed for a reason worth showing to the user (not a bug)."""


@dataclass(frozen=True)
class ToolContext:
    """What a tool may use: the asking user (the only scope tools run in), the bot, the database, settings."""

    user_id: str
    bot: dict[str, Any]
    tools: list[dict[str, Any]]
    store: Store
    cfg: Config
    sandbox: SandboxClient | None = None  # this worker's sandbox process (shell, script, file tools)


Runner = Callable[[ToolCall, dict[str, Any], ToolContext], Any]


def _builtin_registry() -> dict[str, Runner]:
    from . import platform, sandboxed, workflow

    registry: dict[str, Runner] = {}
    for family in (platform, sandboxed, workflow):
        for tool_type in family.TYPES:
            registry[tool_type] = family.run
    return registry


REGISTRY: dict[str, Runner] = _builtin_registry()


def dispatch(call: ToolCall, ctx: ToolContext, registry: dict[str, Runner] | None = None) -> ToolResult:
    """Run one call; failures of any kind come back as ``ToolResult(ok=False, error=...)``."""
    started = time.monotonic()
    tool = next((t for t in ctx.tools if str(t["id"]) == call.tool_id), None)
    runner = (registry or REGISTRY).get(call.type)
    try:
        if tool is None:
            raise ToolFailure(f"tool {call.name} is not an active tool of this bot")
        if runner is None:
            raise ToolFailure(f"tool type {call.type!r} is not supported by this worker")
        data = runner(call, tool, ctx)
        ok, error = True, None
    except ToolFailure as exc:
        data, ok, error = None, False, str(exc)
    except Exception as exc:  # the tool boundary: a bug in one tool is that call's failure, not the message's
        log.exception("tool %s (%s) raised", call.name, call.type)
        data, ok, error = None, False, f"internal error in tool {call.name}: {type(exc).__name__}"
    return ToolResult(call, ok, data, error, int((time.monotonic() - started) * 1000))
