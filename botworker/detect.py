"""Tool detection: message text + the bot's active tools -> the tool calls to make, with parameters. Pure; no I/O.

Two paths:
- platform operations (``mcp_tool``): phrases such as "list my models", "show applications", "search for users"
  map to an operation, offered only by a tool whose ``config.operations`` allows it (no list: all of them);
- any other tool: the message names the tool: its ``name`` or ``displayName`` as words ("run the word count
  script"), or the distinctive words of its name next to a word for its type ("query the orders database" for
  ``orders_db``), or only its type ("run the script") when the bot has exactly one tool of that type and the
  message asks for an action. Parameters are extracted from the text as the platform's first worker did (URLs,
  absolute paths, quoted strings as ``param1``, ``param2``..., a search query), plus ``name=value`` /
  ``name: value`` for the tool's own parameter names; its parameters still unfilled take the quoted strings in
  order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .message import ToolCall
from .tools.params import names as param_names
from .tools.platform import allowed_operations

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


# Words that name a tool type (and, in a tool's name, say nothing about which tool it is).
TYPE_WORDS = {
    "http_request": ("api", "http", "endpoint", "webhook", "request", "url"),
    "database_query": ("database", "db", "sql", "table", "query"),
    "custom_script": ("script",),
    "shell_command": ("shell", "command", "cmd"),
    "file_operation": ("file",),
    "workflow_action": ("workflow", "action"),
}
_GENERIC = {"the", "a", "an", "my", "tool", "of", "for", "to", "and"}
_ACTION = re.compile(
    r"\b(?:call|run|use|execute|exec|query|fetch|check|read|write|save|list|invoke|trigger|hit|ask|start)\b",
    re.IGNORECASE,
)


def detect(text: str, tools: Sequence[dict[str, Any]]) -> list[ToolCall]:
    """The tool calls this message asks for, in a stable order (tools' order, then operations' order)."""
    calls = _platform_calls(text, [t for t in tools if t.get("type") == "mcp_tool"])
    words = _words(text)
    lowered = " ".join(words)
    others = [t for t in tools if t.get("type") != "mcp_tool"]
    for tool in others:
        asked = bool(_ACTION.search(text))
        if _names_tool(tool, lowered, words, asked) or (asked and _only_of_its_type(tool, others, words)):
            calls.append(ToolCall(str(tool["id"]), tool["name"], tool["type"], None, tool_params(text, tool)))
    return calls


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower().replace("_", " "))


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _names_tool(tool: dict[str, Any], lowered: str, words: list[str], asked: bool) -> bool:
    type_words = set(TYPE_WORDS.get(str(tool.get("type")), ()))
    said = {_stem(w) for w in words}
    for key in ("name", "displayName"):
        name_words = _words(str(tool.get(key) or ""))
        if not name_words:
            continue
        if re.search(rf"(?<![a-z0-9]){re.escape(' '.join(name_words))}(?![a-z0-9])", lowered):
            return True
        distinctive = [w for w in name_words if w not in type_words and w not in _GENERIC]
        if (
            asked
            and distinctive
            and all(_stem(w) in said for w in distinctive)
            and said & {_stem(w) for w in type_words}
        ):
            return True
    return False


def _only_of_its_type(tool: dict[str, Any], tools: Sequence[dict[str, Any]], words: list[str]) -> bool:
    kind = tool.get("type")
    if sum(1 for t in tools if t.get("type") == kind) != 1:
        return False
    return bool({_stem(w) for w in words} & {_stem(w) for w in TYPE_WORDS.get(str(kind), ())})


def tool_params(text: str, tool: dict[str, Any]) -> dict[str, Any]:
    """``extract_params`` plus the tool's own parameter names: ``name=value`` / ``name: value`` in the text, then
    the quoted strings, in order, for those still missing."""
    params = extract_params(text)
    wanted = [n for n in param_names(tool) if n not in params]
    rest = text
    for name in list(wanted):
        pattern = rf"(?<![\w-]){re.escape(name)}\s*(?:=|:)\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s,;]+))"
        urls = [m.span() for m in _URL.finditer(rest)]
        # `name=value` inside a URL's query string is the URL's business, not a parameter of the tool.
        match = next(
            (m for m in re.finditer(pattern, rest, re.IGNORECASE) if not any(a <= m.start() < b for a, b in urls)),
            None,
        )
        if match:
            params[name] = next(g for g in match.groups() if g is not None)
            wanted.remove(name)
            rest = rest[: match.start()] + " " + rest[match.end() :]  # its quoted value is used up
    quoted = [next(g for g in m.groups() if g is not None) for m in _QUOTED.finditer(_URL.sub(" ", rest))]
    for name, value in zip(wanted, quoted, strict=False):
        params[name] = value
    return params


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


def _clean_query(raw: str) -> str:
    quoted = _QUOTED.search(raw)
    if quoted:
        return next(g for g in quoted.groups() if g is not None).strip()[:200]
    query = raw.strip().rstrip("?.!").strip()
    query = _QUERY_NOISE.sub("", query)
    return query[:200]


def extract_params(text: str) -> dict[str, Any]:
    """URLs, absolute paths, quoted strings (param1, param2, ...) and a search query, as the platform's first worker
    extracted them."""
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
