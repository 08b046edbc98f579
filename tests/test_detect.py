"""Tool detection is a pure function: table-driven cases for the platform phrases and named tools."""

from __future__ import annotations

import pytest

from botworker.detect import detect, extract_params
from botworker.tools.platform import OPERATIONS as PLATFORM_OPERATIONS
from botworker.tools.platform import allowed_operations

MCP = {"id": "t1", "name": "platform", "displayName": "Platform data", "type": "mcp_tool", "config": {}}
WEATHER = {"id": "t2", "name": "weather_api", "displayName": "Weather API", "type": "http_request", "config": {}}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("list my models", [("list_models", {})]),
        ("Show applications please", [("list_applications", {})]),
        ("what are my apps?", [("list_applications", {})]),
        ("show me all my bots", [("list_bots", {})]),
        ("list prompts", [("list_prompts", {})]),
        ("which tools do I have? list tools", [("list_tools", {})]),
        ("search for users", [("search_platform", {"query": "users"})]),
        ("search for bots", [("search_platform", {"query": "bots"})]),
        ("Search for prompts", [("search_platform", {"query": "prompts"})]),
        ("search for tools", [("search_platform", {"query": "tools"})]),
        ('find "churn model"', [("search_platform", {"query": "churn model"})]),
        ("look up my sentiment thing?", [("search_platform", {"query": "sentiment thing"})]),
        ("who am i", [("get_user_info", {})]),
        ("how many bots do I have", [("list_user_data", {})]),
        ("list my models and my applications", [("list_models", {}), ("list_applications", {})]),
        ("hello there", []),
        ("the weather is nice", []),
    ],
)
def test_platform_phrases(text: str, expected: list[tuple[str, dict]]) -> None:
    calls = detect(text, [MCP])
    assert [(c.operation, c.params) for c in calls] == expected
    assert all(c.tool_id == "t1" and c.type == "mcp_tool" for c in calls)


def test_operations_are_limited_by_config() -> None:
    limited = {**MCP, "config": {"operations": ["list_models"]}}
    assert [c.operation for c in detect("list my models and show applications", [limited])] == ["list_models"]
    assert allowed_operations(limited) == ("list_models",)
    assert allowed_operations(MCP) == PLATFORM_OPERATIONS
    assert detect("list my models", []) == []


def test_named_tool_with_params() -> None:
    calls = detect('call the weather api for https://example.com/x?q=1 and "Paris"', [MCP, WEATHER])
    assert [(c.name, c.type) for c in calls] == [("weather_api", "http_request")]
    assert calls[0].params == {"url": "https://example.com/x?q=1", "param1": "Paris"}


def test_tool_name_must_be_a_whole_word() -> None:
    assert detect("weather_apis are great", [WEATHER]) == []
    assert [c.name for c in detect("use weather_api now", [WEATHER])] == ["weather_api"]


@pytest.mark.parametrize(
    ("text", "params"),
    [
        ("read /var/data/file.txt now", {"path": "/var/data/file.txt"}),
        ("fetch https://a.b/c, then stop", {"url": "https://a.b/c"}),
        ("say 'one' and \"two\"", {"param1": "one", "param2": "two"}),
        ("search for cats", {"query": "cats"}),
        ("nothing here", {}),
    ],
)
def test_extract_params(text: str, params: dict) -> None:
    assert extract_params(text) == params
