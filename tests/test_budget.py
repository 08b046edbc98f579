"""Unit tests of ``botworker.tools.budget``: cutting a text to a byte budget without splitting a character (``clip``),
and fitting tool results into what the model is sent (``for_llm``, per tool and in total) and what the reply's metadata
keeps (``for_metadata``, ``summary``).
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from botworker.message import ToolCall, ToolResult
from botworker.tools.budget import clip, for_llm, for_metadata, summary

ALPHABET = ["a", "Z", " ", "é", "ß", "€", "中", "😀", "𝄞"]  # 1, 1, 1, 2, 2, 3, 3, 4, 4 bytes


def _marker(text: str, max_bytes: int) -> str:
    return f"…[truncated {len(text.encode())} bytes to {max_bytes}]"


def _strings() -> list[str]:
    rng = random.Random(1234)
    out = ["", "a", "é", "€", "😀", "😀" * 20, "é" * 30, "a" * 50 + "😀", "😀" + "a" * 50]
    out += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(60)]
    return out


def test_clip_never_cuts_inside_a_character() -> None:
    checked = 0
    for text in _strings():
        size = len(text.encode("utf-8"))
        for max_bytes in range(0, size + 6):
            got = clip(text, max_bytes)
            assert isinstance(got, str)
            got.encode("utf-8")  # no lone surrogates or other unencodable leftovers
            if size <= max_bytes:
                assert got == text
                continue
            marker = _marker(text, max_bytes)
            assert got.endswith(marker), (text, max_bytes, got)
            prefix = got[: -len(marker)]
            assert text.startswith(prefix), (text, max_bytes, got)
            budget = max_bytes - len(marker.encode())
            if budget >= 0:
                assert len(got.encode()) <= max_bytes
                # the longest whole-character prefix that fits
                assert len(prefix.encode()) <= budget
                nxt = text[: len(prefix) + 1]
                assert len(nxt.encode()) > budget
            else:
                assert prefix == ""  # the budget is smaller than the marker: the marker alone (over budget)
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize(
    ("text", "max_bytes", "expected"),
    [
        ("hello", 5, "hello"),
        ("hello", 100, "hello"),
        ("", 0, ""),
        ("x" * 100, 50, "x" * (50 - len(_marker("x" * 100, 50).encode())) + _marker("x" * 100, 50)),
        ("😀" * 30, 37, "😀" + _marker("😀" * 30, 37)),  # 37 - 30-byte marker = 7 bytes: one 4-byte char
        ("😀" * 30, 38, "😀😀" + _marker("😀" * 30, 38)),  # 8 bytes: two
    ],
    ids=["fits", "fits-loosely", "empty", "ascii", "emoji-partial-dropped", "emoji-exact"],
)
def test_clip_examples(text: str, max_bytes: int, expected: str) -> None:
    assert clip(text, max_bytes) == expected


def _result(
    name: str, data: Any = None, ok: bool = True, error: str | None = None, op: str | None = None
) -> ToolResult:
    return ToolResult(
        ToolCall("id-" + name, name, "fake", op, {"p": 1}), ok, data, error, 5, 1, None if ok else "tool_failed"
    )


def test_for_llm_entries_and_per_tool_budget() -> None:
    results = [
        _result("a", {"k": "v"}),
        _result("b", "plain text"),
        _result("c", ok=False, error="it broke"),
        _result("d", "x" * 1000),
        _result("p", ["m1"], op="list_models"),
    ]
    out = for_llm(results, per_tool=200, total=10_000)
    assert out[0] == {"tool": "a", "ok": True, "result": '{"k": "v"}'}
    assert out[1] == {"tool": "b", "ok": True, "result": "plain text"}
    assert out[2] == {"tool": "c", "ok": False, "error": "it broke"}
    assert out[3]["result"].endswith("…[truncated 1000 bytes to 200]")
    assert len(out[3]["result"].encode()) <= 200
    assert out[4] == {"tool": "p", "ok": True, "operation": "list_models", "result": '["m1"]'}


def test_for_llm_json_keeps_unicode_and_stringifies_unknown_types() -> None:
    out = for_llm([_result("a", {"t": "é", "when": datetime(2024, 1, 2, tzinfo=UTC)})], 1000, 1000)
    assert out[0]["result"] == '{"t": "é", "when": "2024-01-02 00:00:00+00:00"}'


def test_for_llm_total_budget_and_left_out_results() -> None:
    results = [_result(str(i), "é" * 300) for i in range(5)]  # 600 bytes each
    out = for_llm(results, per_tool=500, total=1000)
    sizes = [len(e["result"].encode()) for e in out]
    assert 450 <= sizes[0] <= 500 and 450 <= sizes[1] <= 500  # per-tool budget
    assert sum(sizes[:2]) <= 1000  # total budget
    # (the third gets the few bytes left over: see test_for_llm_never_exceeds_total)
    assert [e["result"] for e in out[3:]] == ["[left out: the tool results budget is used up]"] * 2
    assert all(e["ok"] for e in out)


def test_for_llm_zero_total_leaves_everything_out() -> None:
    out = for_llm([_result("a", "x"), _result("b", ok=False, error="e")], per_tool=100, total=0)
    assert out == [
        {"tool": "a", "ok": True, "result": "[left out: the tool results budget is used up]"},
        {"tool": "b", "ok": False, "error": "[left out: the tool results budget is used up]"},
    ]


def test_for_llm_never_exceeds_total() -> None:
    # 3 results of exactly 390 bytes fit (1170 of 1180); the 4th gets a 10-byte budget, and clip() returns its
    # ~37-byte marker: the clipped results together exceed `total`.
    results = [_result(str(i), "x" * 390) for i in range(3)] + [_result("3", "y" * 390)]
    out = for_llm(results, per_tool=400, total=1180)
    clipped = [e["result"] for e in out if not e["result"].startswith("[left out")]
    assert sum(len(t.encode()) for t in clipped) <= 1180


@pytest.mark.parametrize(
    ("data", "per_tool", "expected", "was_clipped"),
    [
        ({"a": 1}, 100, {"a": 1}, False),
        ("short", 5, "short", False),
        ([1, 2, 3], 9, [1, 2, 3], False),  # "[1, 2, 3]" is 9 bytes
        (None, 4, None, False),
        ("x" * 100, 60, clip("x" * 100, 60), True),
        ({"k": "é" * 100}, 80, clip(json.dumps({"k": "é" * 100}, ensure_ascii=False), 80), True),
    ],
)
def test_for_metadata(data: Any, per_tool: int, expected: Any, was_clipped: bool) -> None:
    got, clipped = for_metadata(data, per_tool)
    assert (got, clipped) == (expected, was_clipped)


def test_for_metadata_keeps_json_valid() -> None:
    got, clipped = for_metadata({"r": float("nan"), "m": [float("inf"), 1.5]}, 100)
    assert not clipped and got == {"r": "nan", "m": ["inf", 1.5]}
    json.dumps(got, allow_nan=False)  # what jsonb and a JavaScript reader accept


def test_summary() -> None:
    small = summary(_result("a", {"k": "v"}), 100)
    assert small["result"] == {"k": "v"} and "resultTruncated" not in small
    assert small["tool"] == "a" and small["ok"] is True and small["params"] == {"p": 1}
    big = summary(_result("b", "x" * 500), 100)
    assert big["resultTruncated"] is True
    assert isinstance(big["result"], str) and len(big["result"].encode()) <= 100
    failed = summary(_result("c", ok=False, error="e" * 500), 100)
    assert failed["error"] == "e" * 500 and failed["code"] == "tool_failed"  # errors are not clipped here
    assert "result" not in failed and "resultTruncated" not in failed
