"""The offline responder: deterministic sentences from tool results, the message and the prompt."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from botworker.llm.offline import OfflineResponder, describe
from botworker.message import Message, ToolCall, ToolResult
from botworker.store import BotContext


def result(kind: str, data: Any, op: str | None = None, ok: bool = True, error: str | None = None) -> ToolResult:
    return ToolResult(ToolCall("t", "tool", kind, op), ok, data, error)


@pytest.mark.parametrize(
    ("res", "text"),
    [
        (
            result("mcp_tool", {"total": 2, "items": [{"name": "a"}, {"name": "b"}]}, "list_models"),
            "Your models (2): a, b.",
        ),
        (result("mcp_tool", {"total": 0, "items": []}, "list_bots"), "You have no bots yet."),
        (result("mcp_tool", {"query": "x", "count": 0, "items": []}, "search_platform"), 'Nothing matches "x".'),
        (result("mcp_tool", {"models": 1, "bots": 2}, "list_user_data"), "You have 1 models, 2 bots."),
        (result("custom_script", {"result": {"n": 1}, "stdout": "hi\n"}), 'tool returned {"n": 1}. It printed: hi'),
        (result("shell_command", {"stdout": "Hello\n", "stderr": "", "exitCode": 0}), "tool printed: Hello"),
        (result("file_operation", {"content": "milk", "size": 4}), "tool read: milk"),
        (result("file_operation", {"written": 4}), "tool saved 4 bytes."),
        (result("file_operation", {"exists": False}), "tool: it does not exist."),
        (result("http_request", None, ok=False, error="boom"), "I could not run tool: boom"),
    ],
)
def test_describe(res: ToolResult, text: str) -> None:
    assert describe(res) == text


def test_many_items_are_summarised() -> None:
    items = [{"name": f"m{i}"} for i in range(25)]
    assert describe(result("mcp_tool", {"total": 25, "items": items}, "list_models")).endswith("m19 and 5 more.")


def test_reply_without_tools_is_deterministic_and_marked_offline() -> None:
    ctx = BotContext({"displayName": "Helper"}, {}, [{"content": "Be brief."}], [], "i", [], None)
    msg = Message("b", "u", "hello", "m", None, datetime.now(UTC))
    first, second = OfflineResponder().reply(ctx, msg, []), OfflineResponder().reply(ctx, msg, [])
    assert first == second and first.model == "offline" and "Helper" in first.text and '"hello"' in first.text
    assert first.tokens_used > 0 and first.extra == {"tokensEstimated": True}
