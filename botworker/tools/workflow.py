"""``workflow_action`` tools: not executed by this worker; the call is answered with a clear unsupported result."""

from __future__ import annotations

from typing import Any

from .. import errors
from ..message import ToolCall
from . import ToolContext, ToolFailure

TYPES = ("workflow_action",)


def run(call: ToolCall, tool: dict[str, Any], ctx: ToolContext) -> Any:
    action = (tool.get("config") or {}).get("workflowActionId")
    raise ToolFailure(
        f"workflow actions are not supported by this worker (tool {call.name}, action {action or 'unset'})",
        errors.TOOL_UNSUPPORTED,
    )
