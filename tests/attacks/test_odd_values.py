"""Values JSON cannot carry, coming back from tools: NaN, Infinity and numbers past float range from an HTTP API or a
numeric column must not lose the whole reply, and the odd but valid database values (bytea, arrays, jsonb, intervals,
time zones, geometric and network types) come back in some JSON form. The reply event is read as a JavaScript consumer
would (no NaN or Infinity tokens).
"""

from __future__ import annotations

import json
from typing import Any

import redis

from botworker.queue import ERRORS, RESPONSES
from botworker.worker import Worker

from attack_kit import LOCAL, call_of, http_answer
from conftest import events, push
from toolkit import add_tool

pytest_plugins = ["attack_kit"]


def strict_json(raw: str) -> Any:
    """Parse as a JavaScript consumer would: NaN / Infinity are not JSON."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"not JSON: {token}")

    return json.loads(raw, parse_constant=refuse)


def send(r: redis.Redis, worker: Worker, payload: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """One message through the worker: (raw response events, error events)."""
    r.delete(RESPONSES, ERRORS)
    push(r, payload)
    assert worker.run_once()
    raw = [x.decode() if isinstance(x, bytes) else x for x in reversed(r.lrange(RESPONSES, 0, -1))]
    return raw, events(r, ERRORS)


def test_cant_lose_the_reply_with_a_nan_from_an_http_api(make_worker, r, db, bot, raw_server) -> None:
    server = raw_server({"/stats": http_answer(b'{"ratio": NaN, "max": Infinity, "big": 1e999}')})
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "stats_api", "http_request", {"url": server.url + "/stats", "timeout": 2})
    raw, errs = send(r, worker, bot.message("use stats_api"))
    assert errs == [] and len(raw) == 1, errs  # a reply, not internal_error
    event = strict_json(raw[0])
    assert call_of(event["botResponse"], "stats_api")["ok"] is True


def test_cant_lose_the_reply_with_a_numeric_past_float_range(make_worker, r, db, bot) -> None:
    worker = make_worker()
    add_tool(db, bot, "big_db", "database_query", {"query": "SELECT ({{n}})::numeric * 1 AS n"})
    raw, errs = send(r, worker, bot.message('use big_db n="1e400"'))
    assert errs == [] and len(raw) == 1, errs
    event = strict_json(raw[0])
    call = call_of(event["botResponse"], "big_db")
    assert call["ok"] is True and str(call["result"]["rows"][0]["n"]).startswith("1"), call


def test_cant_lose_the_reply_with_odd_but_valid_database_values(make_worker, r, db, bot) -> None:
    """Control for the hole above: values JSON can carry in some form all come back (as text where needed)."""
    worker = make_worker()
    add_tool(
        db,
        bot,
        "odd_db",
        "database_query",
        {
            "query": "SELECT 'NaN'::numeric AS nan_num, 'Infinity'::float8 AS inf_f, '-Infinity'::numeric AS ninf,"
            " 1e300::numeric AS big, '\\x00ff'::bytea AS raw, ARRAY[1,NULL,3] AS arr, '{\"a\":[1,{\"b\":null}]}'::jsonb"
            " AS doc, interval '1 month 2 days 3 seconds' AS span, '2024-02-29 12:00+05:45'::timestamptz AS at,"
            " '12:00+14'::timetz AS tz, 'e\u00e9\\u'::text AS t, point(1,2) AS pt, '10.0.0.1/8'::inet AS net"
        },
    )
    raw, errs = send(r, worker, bot.message("use odd_db"))
    assert errs == [] and len(raw) == 1, errs
    row = call_of(strict_json(raw[0])["botResponse"], "odd_db")["result"]["rows"][0]
    assert row["nan_num"] == "NaN" and row["inf_f"] == "inf" and row["ninf"] == "-Infinity", row
    assert row["arr"] == [1, None, 3] and row["doc"] == {"a": [1, {"b": None}]} and row["raw"] == "AP8=", row
