"""How long a tool can hold the worker and how much memory it can make it use: slow, dripping and trickling servers are
cut at the tool's timeout; huge bodies, gzip bombs (nested too) and huge headers are bounded; a database tool's rows,
time and RETURNING rows are capped without the worker holding more than the cap; redacting a long token from a large
answer stays quick.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from attack_kit import FAILED, LOCAL, call_of, failed, refused
from conftest import query
from toolkit import add_secret, add_tool, ask

pytest_plugins = ["attack_kit"]


def _peak_rss_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident size
    except OSError:
        pytest.skip("cannot reset the peak RSS here")


def test_cant_flood_the_worker_with_a_huge_response(make_worker, r, db, bot, web, evil) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL, HTTP_MAX_RESPONSE_BYTES="4096", TOOL_RESULT_BUDGET="1024")
    add_tool(db, bot, "big", "http_request", {"url": web.url + "/big?bytes=20000000"})
    add_tool(db, bot, "bomb", "http_request", {"url": evil.url + "/bomb"})
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "run big and bomb")
    assert time.monotonic() - started < 5 and errs == []
    for name in ("big", "bomb"):
        call = call_of(reply, name)
        assert call["ok"] and call.get("resultTruncated") is True, call
        assert isinstance(call["result"], str) and len(call["result"].encode()) <= 1024
    assert len(json.dumps(reply["metadata"]).encode()) < 10_000


def test_cant_hold_the_worker_with_a_slow_server(make_worker, r, db, bot, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "slowpoke", "http_request", {"url": web.url + "/slow?s=5", "timeout": 0.5})
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "run slowpoke")
    elapsed = time.monotonic() - started
    call = refused(reply, errs, "slowpoke", FAILED)
    assert "timed out" in call["error"] and elapsed < 3.5, (elapsed, call)


def test_cant_hold_the_worker_with_a_dripping_server(make_worker, r, db, bot, evil) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(
        db, bot, "dripper", "http_request", {"url": evil.url + "/drip?n=30&every=0.1", "timeout": 0.5, "retry": False}
    )
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "run dripper")
    elapsed = time.monotonic() - started
    assert elapsed < 2, f"a 0.5 s tool held the worker {elapsed:.1f}s"
    refused(reply, errs, "dripper", FAILED)


def test_cant_hold_the_worker_with_a_response_that_trickles_in(make_worker, r, db, bot, hostile) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    for route in ("hdrdrip", "chunkdrip"):
        config = {"url": f"{hostile.url}/{route}?n=40&every=0.1", "timeout": 0.5, "retry": False}
        add_tool(db, bot, route, "http_request", config)
    for route in ("chunkdrip", "hdrdrip"):
        started = time.monotonic()
        reply, errs = ask(r, worker, bot, f"use {route}")
        elapsed = time.monotonic() - started
        assert elapsed < 2, f"a 0.5 s tool held the worker {elapsed:.1f}s while {route} trickled in"
        refused(reply, errs, route, FAILED)


def test_cant_flood_the_worker_with_headers_or_nested_compression(make_worker, r, db, bot, hostile) -> None:
    _reset_peak_rss()
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL, HTTP_MAX_RESPONSE_BYTES="4096", TOOL_RESULT_BUDGET="1024")
    add_tool(db, bot, "big_header", "http_request", {"url": hostile.url + "/bigheader?kb=200", "retry": False})
    add_tool(db, bot, "bomb2", "http_request", {"url": hostile.url + "/bomb2"})
    hostile.bomb()  # compressed before measuring
    Path("/proc/self/clear_refs").write_text("5")
    base = _peak_rss_mb()
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "use big header and bomb2")
    assert time.monotonic() - started < 5 and [e["code"] for e in errs] == [FAILED]
    assert _peak_rss_mb() - base < 60
    failed(call_of(reply, "big_header"), FAILED)
    bomb = call_of(reply, "bomb2")
    assert bomb["ok"] and bomb.get("resultTruncated") is True and len(bomb["result"].encode()) <= 1024


def test_cant_freeze_the_worker_by_redacting_a_long_token(make_worker, r, db, bot, hostile) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    token = base64.urlsafe_b64encode(os.urandom(1100)).decode()  # 1.5 KB: an ordinary JWT bearer token
    secret_id = add_secret(db, bot.user_id, token)
    add_tool(db, bot, "lister", "http_request", {"url": hostile.url + "/list?n=200", "secretId": secret_id})
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "use lister")
    elapsed = time.monotonic() - started
    assert errs == [] and call_of(reply, "lister")["ok"]
    assert elapsed < 1.5, f"a 200-item answer (30 KB) took {elapsed:.1f}s with a 1.5 KB token to redact"


def test_cant_pull_unbounded_rows_or_time_from_the_database(make_worker, r, db, bot) -> None:
    worker = make_worker(DB_TOOL_MAX_ROWS="7", DB_TOOL_TIMEOUT="0.5")
    add_tool(db, bot, "series", "database_query", {"query": "select generate_series(1, 1000000) as n"})
    add_tool(db, bot, "sleeper", "database_query", {"query": "select pg_sleep(10)"})
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "run series")
    call = call_of(reply, "series")
    assert errs == [] and call["result"]["truncated"] is True and time.monotonic() - started < 5
    assert [row["n"] for row in call["result"]["rows"]] == [1, 2, 3, 4, 5, 6, 7]
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "run sleeper")
    elapsed = time.monotonic() - started
    call = refused(reply, errs, "sleeper", FAILED)
    assert "cancelled" in call["error"] and elapsed < 3, (elapsed, call)
    active = query(db, "SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE 'select pg_sleep(10)%%'")
    assert active == [{"n": 0}]


def test_cant_exhaust_worker_memory_through_a_row_count_parameter(make_worker, r, db, bot) -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident size
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    worker = make_worker(DB_TOOL_MAX_ROWS="7", TOOL_RESULT_BUDGET="65536")
    config = {
        "query": "select repeat('x', 1000) as pad from generate_series(1, {{n}})",
        "parameters": {"n": {"type": "integer", "minimum": 1}},
    }
    add_tool(db, bot, "padder", "database_query", config)
    reply, errs, grown = _asked_with_peak(r, worker, bot, "run padder n=200000")
    assert errs == [] and len(call_of(reply, "padder")["result"]["rows"]) == 7
    assert grown < 60, f"the worker's peak memory grew by {grown} MB for 7 rows"


def _asked_with_peak(r, worker, bot, text: str) -> tuple[dict, list, int]:
    """``ask``, and how many MB the process's peak memory grew meanwhile."""
    Path("/proc/self/clear_refs").write_text("5")
    base = _peak_rss_mb()
    reply, errs = ask(r, worker, bot, text)
    return reply, errs, _peak_rss_mb() - base


def test_cant_exhaust_memory_through_a_write_tools_returning(make_worker, r, db, bot, table) -> None:
    _reset_peak_rss()
    worker = make_worker(DB_TOOL_MAX_ROWS="7", TOOL_RESULT_BUDGET="65536")
    config = {
        "query": f"insert into {table} (name) select 'n' || g from generate_series(1, {{{{n}}}}) g "
        "returning repeat('x', 1500) as pad",
        "type": "insert",
        "parameters": {"n": {"type": "integer", "minimum": 1}},
    }
    add_tool(db, bot, "bulk_add", "database_query", config)
    reply, errs, grown = _asked_with_peak(r, worker, bot, "run bulk add n=100000")
    assert errs == [] and len(call_of(reply, "bulk_add")["result"]["rows"]) == 7
    assert grown < 60, f"the worker's peak memory grew by {grown} MB for 7 rows"
