"""What of a tool result reaches the LLM (and the reply's metadata): JSON text within a byte budget.

Each result gets at most ``per_tool`` bytes and all of a message's results together at most ``total``; text over
budget is cut at a UTF-8 character boundary and ends with a marker saying how much was left out. Results are
redacted before they get here (``dispatch``), so nothing in this module sees a secret.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from ..message import ToolResult

LEFT_OUT = "[left out: the tool results budget is used up]"
_MIN_USEFUL = 80  # bytes: below this a clipped result would be mostly its marker


def clip(text: str, max_bytes: int) -> str:
    """``text`` in at most ``max_bytes`` UTF-8 bytes (marker included), never cut inside a character."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    marker = f"…[truncated {len(raw)} bytes to {max_bytes}]"
    keep = max(0, max_bytes - len(marker.encode("utf-8")))
    # errors="ignore" drops only the partial character at the cut: bytes [0, keep) may end inside one.
    return raw[:keep].decode("utf-8", errors="ignore") + marker


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(finite(value), ensure_ascii=False, default=str)


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as text: they are not JSON, jsonb refuses them, and a JavaScript reader
    of the events would fail on them. (Any family's result passes here, plugins' included.)"""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def for_llm(results: Sequence[ToolResult], per_tool: int, total: int) -> list[dict[str, Any]]:
    """One entry per result: ``{"tool", "ok", "result" | "error"}`` with texts clipped to the budgets."""
    left = total
    out: list[dict[str, Any]] = []
    for result in results:
        entry: dict[str, Any] = {"tool": result.call.name, "ok": result.ok}
        if result.call.operation:
            entry["operation"] = result.call.operation
        key, text = ("result", as_text(result.data)) if result.ok else ("error", str(result.error))
        budget = min(per_tool, left)
        if budget >= _MIN_USEFUL or len(text.encode("utf-8")) <= budget:
            entry[key] = clip(text, budget)
            left -= len(entry[key].encode("utf-8"))
        else:  # too little left to show anything but a marker: say so, and spend nothing more
            entry[key] = LEFT_OUT
            left = 0
        out.append(entry)
    return out


def for_metadata(data: Any, per_tool: int) -> tuple[Any, bool]:
    """(the data itself if its JSON fits ``per_tool`` bytes, else the clipped JSON text; whether it was clipped)."""
    text = as_text(data)
    if len(text.encode("utf-8")) <= per_tool:
        return finite(data), False
    return clip(text, per_tool), True


def summaries(results: Sequence[ToolResult], per_tool: int, total: int) -> list[dict[str, Any]]:
    """The reply's ``metadata.toolCalls``: each result within ``per_tool`` bytes, all of them within ``total``
    (once it is spent, later results keep their outcome but not their data)."""
    out, left = [], total
    for result in results:
        entry = summary(result, min(per_tool, max(left, _MIN_USEFUL)))
        size = len(as_text(entry.get("result", entry.get("error"))).encode("utf-8"))
        if left <= 0 and "result" in entry:
            entry["result"], entry["resultTruncated"] = LEFT_OUT, True
        left -= size
        out.append(entry)
    return out


def summary(result: ToolResult, per_tool: int) -> dict[str, Any]:
    """``result.summary()`` for the reply's metadata, its data clipped to ``per_tool`` bytes."""
    out = result.summary()
    if out.get("params"):  # what a model passed can be as large as it likes: keep each value within the budget
        out["params"] = {k: _clip_value(v, per_tool) for k, v in out["params"].items()}
    if result.ok:
        out["result"], clipped = for_metadata(result.data, per_tool)
        if clipped:
            out["resultTruncated"] = True
    return out


def _clip_value(value: Any, max_bytes: int) -> Any:
    text = as_text(value)
    if len(text.encode("utf-8")) <= max_bytes:
        return finite(value)
    return clip(text, max_bytes)
