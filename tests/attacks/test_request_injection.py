"""What a parameter value can add to the HTTP request a tool builds from it: no header (line breaks in a header value
are refused, other control characters stay inside the value), no JSON field (a value is a JSON string, whether the body
is an object or text) and no form field (a value is one encoded field value).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from botworker import errors

from attack_kit import INVALID, LOCAL, call_of, refused, send
from toolkit import add_tool, ask, calls_of

pytest_plugins = ["attack_kit"]


def test_cant_inject_headers_through_a_parameter(make_worker, r, db, bot, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "tracer", "http_request", {"url": web.url + "/echo", "headers": {"X-Trace": "{{t}}"}})
    for value in ("abc\r\nX-Evil: 1", "abc\nX-Evil: 1", "abc\rX-Evil: 1", "abc\r\n\r\nGET /json HTTP/1.1"):
        reply, errs = ask(r, worker, bot, f'use tracer t="{value}"')
        call = refused(reply, errs, "tracer", INVALID)
        assert "header" in call["error"] and call["params"]["t"] == value
    assert web.seen == []
    # NUL never gets that far: the message itself is refused.
    responses, errs = send(r, worker, bot.message('use tracer t="abc\x00X-Evil: 1"'))
    assert responses == [] and [e["code"] for e in errs] == [errors.INVALID_MESSAGE]
    # Other control characters are not line breaks to HTTP: whatever happens, no second header appears.
    for value in ("abc\x85X-Evil: 1", "abc\x0bX-Evil: 1", "abc\x0cX-Evil: 1", "abc\u2028X-Evil: 1"):
        reply, errs = ask(r, worker, bot, f'use tracer t="{value}"')
        call = call_of(reply, "tracer")
        if call["ok"]:
            assert call["result"]["json"]["headers"]["X-Trace"] == value
    assert all("X-Evil" not in seen.headers for seen in web.seen), [s.headers for s in web.seen]


def test_cant_inject_json_into_a_request_body(make_worker, r, db, bot, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "poster", "http_request", {"url": web.url + "/echo", "method": "POST", "body": {"q": "{{q}}"}})
    add_tool(db, bot, "texter", "http_request", {"url": web.url + "/echo", "method": "POST", "body": '{"q": "{{q}}"}'})
    add_tool(
        db, bot, "mixer", "http_request", {"url": web.url + "/echo", "method": "POST", "body": {"q": "say: {{q}}"}}
    )
    value = '", "admin": true, "x": "'
    reply, errs = ask(r, worker, bot, f"use poster, texter and mixer q='{value}'")
    assert errs == [] and all(c["ok"] for c in calls_of(reply))
    bodies = [json.loads(seen.body) for seen in web.seen]
    assert bodies == [{"q": value}, {"q": value}, {"q": "say: " + value}]
    assert all(seen.headers["Content-Type"] == "application/json" for seen in web.seen)


def test_cant_inject_fields_into_a_form_body(make_worker, r, db, bot, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    config = {
        "url": web.url + "/echo",
        "method": "POST",
        "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        "body": "q={{q}}&role=viewer",
    }
    add_tool(db, bot, "former", "http_request", config)
    reply, errs = ask(r, worker, bot, "use former q='x&role=admin'")
    assert errs == [] and call_of(reply, "former")["ok"]
    [seen] = web.seen
    assert parse_qs(seen.body.decode()) == {"q": ["x&role=admin"], "role": ["viewer"]}
