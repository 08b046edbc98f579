"""A compromised or prompt-injected model as the attacker: the local Gemini stub answers with whatever functionCall
names and arguments a test likes, and the worker treats them like text from an untrusted user: no other bot's tool or
mangled name, no operation a platform tool was not given, no injection through argument types (objects, lists, numbers
where text is expected), no other bot's files, and neither many calls nor megabytes of arguments getting past the LLM
deadline and the stored reply's size.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from botworker import errors

from attack_kit import DENIED, FAILED, INVALID, LOCAL, NEUTRAL, call_of, failed, gemini_saw, rows_of
from conftest import query
from gemini_server import GeminiServer, call, text
from toolkit import add_tool, ask, calls_of

pytest_plugins = ["attack_kit", "gemini_server"]


def function_responses(gemini: GeminiServer, request: int) -> list[dict[str, Any]]:
    """The functionResponse parts of one recorded request (its last turn)."""
    parts = gemini.requests[request].body["contents"][-1]["parts"]
    return [p["functionResponse"] for p in parts if "functionResponse" in p]


def test_cant_call_another_bots_tool_or_a_mangled_name(make_worker, r, db, bot, other, web, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL)
    theirs = add_tool(db, other, "their_hook", "http_request", {"url": web.url + "/json?who=theirs"})
    add_tool(db, bot, "dup tool", "http_request", {"url": web.url + "/json?which=spaced"})
    add_tool(db, bot, "dup_tool", "http_request", {"url": web.url + "/json?which=underscored"})
    add_tool(db, bot, "dup_tool_2", "http_request", {"url": web.url + "/json?which=suffixed"})
    names = [
        "their_hook",
        "../their_hook",
        "PLATFORM",
        "platform\n",
        " platform",
        "platform\u200b",
        "plat form",
        theirs,
        "x" * 5000,
    ]
    calls = [(n, {"operation": "list_models", "botId": other.bot_id, "toolId": theirs}) for n in names]
    gemini.script(call(*calls[0], *calls[1:]), text("done"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    assert len(calls_of(reply)) == len(names)
    for made in calls_of(reply):
        failed(made, DENIED)
        assert "no tool named" in made["error"]
    assert [e["code"] for e in errs] == [DENIED]
    assert web.seen == []  # the other bot's tool never ran
    # Names that collide after sanitising get distinct function names, each running its own tool, once.
    declared = [d["name"] for d in gemini.requests[0].body["tools"][0]["functionDeclarations"]]
    assert len(declared) == len(set(declared))
    dups = [n for n in declared if n.startswith("dup_tool")]
    assert len(dups) == 3
    gemini.script(call(dups[0], {}, *[(n, {}) for n in dups[1:]]), text("done"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    assert errs == [] and sorted(s.query["which"][0] for s in web.seen) == ["spaced", "suffixed", "underscored"]


def test_cant_widen_a_platform_tool_through_function_arguments(make_worker, r, db, bot, other, gemini) -> None:
    worker = make_worker(gemini)
    private = "other-model-" + uuid.uuid4().hex[:8]
    query(
        db,
        """INSERT INTO models (id, name, "displayName", description, schema, "userId")
           VALUES (%s, %s, %s, 'not yours', '{}', %s)""",
        str(uuid.uuid4()),
        private,
        private,
        other.user_id,
    )
    add_tool(db, bot, "models_tool", "mcp_tool", {"operations": ["list_models"]})
    steal = {"userId": other.user_id, "user_id": other.user_id, "botId": other.bot_id, "owner": other.user_id}
    gemini.script(
        call(
            "models_tool",
            {"operation": "get_user_info", **steal},
            ("models_tool", {"operation": ["list_models", "get_user_info"]}),
            ("models_tool", {"operation": {"name": "list_models"}}),
            ("models_tool", {"operation": "list_models; get_user_info"}),
            ("models_tool", {"operation": "list_models", **steal}),
            ("platform", {"operation": "search_platform", "query": private, **steal}),
            ("platform", {"operation": "search_platform", "query": "%"}),
            ("platform", {"operation": "list_models", "query": {"userId": other.user_id}}),
        ),
        text("done"),
    )
    reply, errs = ask(r, worker, bot, NEUTRAL)
    assert [e["code"] for e in errs] == [FAILED]
    made = calls_of(reply)
    for refused_call in made[:4]:
        failed(refused_call, FAILED, INVALID, DENIED)
        assert "not allowed" in refused_call["error"]
    listed, searched, wildcard, own = made[4:]
    assert {m["name"] for m in listed["result"]["items"]} == {"sentiment", "churn", "vision"}
    assert searched["result"]["count"] == 0 and wildcard["result"]["count"] == 0
    assert {m["name"] for m in own["result"]["items"]} == {"sentiment", "churn", "vision"}
    # The other user's model is in no result, nor in what Gemini was sent back (a search echoes its query only).
    responses = [f["response"].get("result") or {} for f in function_responses(gemini, 1)]
    found = [c["result"].get("items") for c in made if c["ok"]] + [x.get("items") for x in responses]
    assert private not in json.dumps(found)


def test_cant_inject_through_function_argument_types(make_worker, r, db, bot, web, table, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL, LLM_MAX_TOOL_CALLS="20")
    before = rows_of(db, table)
    add_tool(db, bot, "tracer", "http_request", {"url": web.url + "/echo", "headers": {"X-Trace": "{{t}}"}})
    add_tool(db, bot, "fetcher", "http_request", {"url": "{{url}}", "timeout": 2})
    add_tool(db, bot, "finder", "database_query", {"query": f"select id, name from {table} where name = {{{{who}}}}"})
    evil_header = "a\r\nX-Evil: 1"
    port = web.server.server_address[1]
    args: list[tuple[str, dict[str, Any]]] = [
        ("tracer", {"t": evil_header}),  # refused: a line break in a header
        ("tracer", {"t": {"x": evil_header}}),  # an object is sent as its JSON text: the \r\n stays escaped
        ("tracer", {"t": [evil_header]}),
        ("fetcher", {"url": {"href": f"{web.url}/json"}}),
        ("fetcher", {"url": [f"{web.url}/json"]}),
        ("fetcher", {"url": "http://169.254.169.254/latest/meta-data/"}),
        ("fetcher", {"url": "http://[fe80::1%25eth0]/"}),
        ("fetcher", {"url": f"http://[::ffff:10.0.0.1]:{port}/json"}),
        ("fetcher", {"url": f"http://127.0.0.1:{port}@10.0.0.1/json"}),
        ("finder", {"who": {"$ne": None}}),
        ("finder", {"who": ["alice", "bob"]}),
        ("finder", {"who": "' or 1=1 --"}),
        ("finder", {"who": f"x'; delete from {table}; --"}),
        ("finder", {"who": 1}),
        ("finder", {"who": True}),
        ("finder", {"who": None}),
    ]
    gemini.script(call(*args[0], *args[1:]), text("done"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    made = calls_of(reply)
    assert [c["tool"] for c in made] == [name for name, _ in args]
    failed(made[0], INVALID)
    for sent_as_text in made[1:3]:
        assert sent_as_text["ok"], sent_as_text
    for ssrf in made[3:9]:
        if "fe80" in ssrf["params"]["url"]:  # a scoped address: not even resolvable as a host name
            assert failed(ssrf, FAILED, DENIED, INVALID)["attempts"] >= 1 and "resolve" in ssrf["error"]
        else:
            failed(ssrf, INVALID, DENIED)
    for lookup in made[9:]:
        assert not lookup["ok"] or lookup["result"]["rows"] == [], lookup
    assert all("X-Evil" not in s.headers for s in web.seen), [s.headers for s in web.seen]
    assert [s.path for s in web.seen] == ["/echo", "/echo"]  # only the two tracer calls reached it
    assert rows_of(db, table) == before
    assert errs and errs[0]["code"] == INVALID


def test_cant_reach_another_bots_files_through_function_arguments(make_worker, r, db, bot, other, gemini) -> None:
    worker = make_worker(gemini)
    private = "other-private-" + uuid.uuid4().hex[:8]
    add_tool(db, other, "saver", "file_operation", {"operation": "write", "path": "/notes.txt", "content": private})
    gemini.script(call("saver", {}), text("saved"))
    reply, errs = ask(r, worker, other, NEUTRAL)
    assert errs == [] and call_of(reply, "saver")["ok"]  # the other bot's file exists
    add_tool(db, bot, "reader", "file_operation", {"operation": "read", "path": "{{path}}"})
    paths = [
        f"../{other.bot_id}/notes.txt",
        f"/../{other.bot_id}/notes.txt",
        f"/{other.bot_id}/notes.txt",
        f"/files/../{other.bot_id}/notes.txt",
        "/proc/self/environ",
        "/etc/passwd",
        {"path": "../x"},
        ["..", other.bot_id, "notes.txt"],
    ]
    gemini.script(call("reader", {"path": paths[0]}, *[("reader", {"path": p}) for p in paths[1:]]), text("done"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    made = calls_of(reply)
    assert len(made) == len(paths) and not any(c["ok"] for c in made), made
    assert private not in json.dumps(reply) and private not in gemini_saw(gemini)
    assert errs and errs[0]["code"] in (FAILED, INVALID)


def test_cant_outlast_llm_deadline_with_many_function_calls(make_worker, r, db, bot, web, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL, LLM_DEADLINE="1.5")
    add_tool(db, bot, "slowpoke", "http_request", {"url": web.url + "/slow?s=0.5", "timeout": 2})
    gemini.script(call("slowpoke", {}, *[("slowpoke", {})] * 7), text("done"))  # 8 calls in one response
    started = time.monotonic()
    _, errs = ask(r, worker, bot, NEUTRAL)
    elapsed = time.monotonic() - started
    assert [e["code"] for e in errs] == [errors.LLM_TIMEOUT]
    assert elapsed < 3, f"LLM_DEADLINE=1.5s, but the reply took {elapsed:.1f}s ({len(web.seen)} tool requests)"
    assert len(web.seen) <= 4


def test_cant_store_megabytes_of_function_arguments(make_worker, r, db, bot, gemini) -> None:
    worker = make_worker(gemini, TOOL_RESULT_BUDGET="4000")
    config = {"query": "select {{q}}::text as q", "parameters": {"q": {"type": "string", "maxLength": 100}}}
    add_tool(db, bot, "echo_db", "database_query", config)
    huge = "A" * (2 << 20)  # 2 MB: a declared parameter refuses it, an undeclared one takes it
    gemini.script(
        call("echo_db", {"q": huge}, ("platform", {"operation": "list_models", "junk": huge})),
        text("done"),
    )
    reply, errs = ask(r, worker, bot, NEUTRAL)
    failed(call_of(reply, "echo_db"), INVALID)
    assert [e["code"] for e in errs] == [INVALID]
    stored = query(db, "SELECT octet_length(metadata::text) AS n FROM chat_messages WHERE id = %s", reply["id"])
    assert stored[0]["n"] < 64 << 10, f"the reply row's metadata is {stored[0]['n']} bytes"
