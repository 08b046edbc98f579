"""Tool detection: message text + the bot's active tools -> the tool calls to make, with parameters. Pure; no I/O.

Two paths:
- platform operations (``mcp_tool``): phrases such as "list my models", "show applications", "search for users"
  map to an operation, offered only by a tool whose ``config.operations`` allows it (no list: all of them);
- any other tool: the message names the tool (its ``name`` or ``displayName``); parameters are extracted from the
  text (URLs, absolute paths, quoted strings as ``param1``, ``param2``..., and a search query).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .message import ToolCall

PLATFORM_OPERATIONS = (
    "list_models",
    "list_applications",
    "list_bots",
    "list_prompts",
    "list_tools",
    "get_user_info",
    "search_platform",
    "list_user_data",
)

_KINDS = {
    "list_models": r"models?",
    "list_applications": r"(?:applications?|apps?)",
    "list_bots": r"bots?",
    "list_prompts": r"prompts?",
    "list_tools": r"tools?",
}
_VERB = r"(?:list|show|get|display|see|view|give me|what are|which are|tell me)"
_LIST_PATTERNS = {
    op: re.compile(rf"\b{_VERB}\b[\w\s']{{0,30}}?\b{kind}\b|\bmy {kind}\b", re.IGNORECASE)
    for op, kind in _KINDS.items()
}
_USER_INFO = re.compile(
    r"\b(?:who am i|my (?:profile|account|user info|info|details)|user info(?:rmation)?)\b", re.IGNORECASE
)
_USER_DATA = re.compile(r"\b(?:my data|user data|data summary|summary of my|overview of my|how many)\b", re.IGNORECASE)
_SEARCH = re.compile(r"\b(?:search|find|look\s*up|lookup)\b(?:\s+(?:for|about|on))?\s+(?P<query>.+)", re.IGNORECASE)

_URL = re.compile(r"https?://[^\s\"'<>]+")
_PATH = re.compile(r"(?<![\w:/.])(/(?:[\w.\-]+/?)+)")
_QUOTED = re.compile(r"\"([^\"]*)\"|'([^']*)'|“([^”]*)”")
_QUERY_NOISE = re.compile(r"^(?:my|the|all|any|some)\s+", re.IGNORECASE)


def detect(text: str, tools: Sequence[dict[str, Any]]) -> list[ToolCall]:
    """The tool calls this message asks for, in a stable order (tools' order, then operations' order)."""
    calls = _platform_calls(text, [t for t in tools if t.get("type") == "mcp_tool"])
    lowered = _normalise(text)
    for tool in tools:
        if tool.get("type") == "mcp_tool":
            continue
        names = {_normalise(str(tool.get(key) or "")) for key in ("name", "displayName")} - {""}
        if any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", lowered) for name in names):
            calls.append(ToolCall(str(tool["id"]), tool["name"], tool["type"], None, extract_params(text)))
    return calls


def _platform_calls(text: str, tools: Sequence[dict[str, Any]]) -> list[ToolCall]:
    if not tools:
        return []
    wanted: list[tuple[str, dict[str, Any]]] = []
    search = _SEARCH.search(text)
    if search and (query := _clean_query(search.group("query"))):
        wanted.append(("search_platform", {"query": query}))
    else:
        wanted += [(op, {}) for op, pattern in _LIST_PATTERNS.items() if pattern.search(text)]
        if _USER_INFO.search(text):
            wanted.append(("get_user_info", {}))
        if _USER_DATA.search(text):
            wanted.append(("list_user_data", {}))
    calls = []
    for op, params in wanted:
        tool = next((t for t in tools if op in allowed_operations(t)), None)
        if tool is not None:
            calls.append(ToolCall(str(tool["id"]), tool["name"], "mcp_tool", op, params))
    return calls


def allowed_operations(tool: dict[str, Any]) -> tuple[str, ...]:
    """The operations an mcp_tool's config allows; a config without a list allows all of them."""
    config = tool.get("config") or {}
    ops = config.get("operations") if isinstance(config, dict) else None
    if not isinstance(ops, list) or not ops:
        return PLATFORM_OPERATIONS
    return tuple(op for op in PLATFORM_OPERATIONS if op in ops)


def _clean_query(raw: str) -> str:
    quoted = _QUOTED.search(raw)
    if quoted:
        return next(g for g in quoted.groups() if g is not None).strip()[:200]
    query = raw.strip().rstrip("?.!").strip()
    query = _QUERY_NOISE.sub("", query)
    return query[:200]


def _normalise(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.lower()).strip()


def extract_params(text: str) -> dict[str, Any]:
    """URLs, absolute paths, quoted strings (param1, param2, ...) and a search query, as the seed extracted them."""
    params: dict[str, Any] = {}
    urls = _URL.findall(text)
    if urls:
        params["url"] = urls[0].rstrip(".,;)")
    without_urls = _URL.sub(" ", text)
    paths = _PATH.findall(without_urls)
    if paths:
        params["path"] = paths[0].rstrip(".,;)")
    for i, match in enumerate(_QUOTED.finditer(without_urls), start=1):
        params[f"param{i}"] = next(g for g in match.groups() if g is not None)
    search = _SEARCH.search(text)
    if search and (query := _clean_query(search.group("query"))):
        params["query"] = query
    return params
