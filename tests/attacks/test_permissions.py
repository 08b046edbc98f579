"""Who may run a tool: only the bot's owner, only an active bot's active tools, a requiresAuth tool only for an active
user, a roles-limited tool only for those roles, whichever way the restriction is written (column or config, true or a
truthy spelling, a role list, a string or something else), asked for in the message or by the model's function calls; a
tool the user may not run is not offered to the model either.
"""

from __future__ import annotations

import psycopg

from botworker import errors

from attack_kit import DENIED, LOCAL, NEUTRAL, call_of, failed, send
from conftest import query
from gemini_server import call, text
from toolkit import add_tool, ask, calls_of

pytest_plugins = ["attack_kit", "gemini_server"]


def test_cant_run_a_tool_without_being_allowed(make_worker, r, db, bot, other, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "authed", "http_request", {"url": web.url + "/json"}, requires_auth=True)
    add_tool(db, bot, "cfg_authed", "http_request", {"url": web.url + "/json", "requiresAuth": True})
    add_tool(db, bot, "admins", "http_request", {"url": web.url + "/json", "roles": ["admin"]})
    add_tool(db, bot, "admin_str", "http_request", {"url": web.url + "/json", "roles": "admin"})
    add_tool(db, bot, "sleeping", "http_request", {"url": web.url + "/json"}, active=False)
    reply, errs = ask(r, worker, bot, "run admins and admin str")
    for name in ("admins", "admin_str"):
        call = call_of(reply, name)
        assert not call["ok"] and call["code"] == DENIED and "admin" in call["error"]
    assert [e["code"] for e in errs] == [DENIED]
    reply, errs = ask(r, worker, bot, "run sleeping")
    assert [c["tool"] for c in calls_of(reply)] == [] and errs == []  # an inactive tool is not even detected

    query(db, """UPDATE users SET "isActive" = false WHERE id = %s""", bot.user_id)
    reply, errs = ask(r, worker, bot, "run authed and cfg authed")
    for name in ("authed", "cfg_authed"):
        call = call_of(reply, name)
        assert not call["ok"] and call["code"] == DENIED and "active user" in call["error"]
    assert [e["code"] for e in errs] == [DENIED]

    # Someone else naming this bot: the bot is "not found" for them and no tool runs.
    responses, errs = send(r, worker, other.message("run admins, authed and sleeping", botId=bot.bot_id))
    assert responses == [] and [e["code"] for e in errs] == [errors.BOT_NOT_FOUND]
    assert web.seen == []


def test_cant_widen_a_tool_through_a_restriction_written_another_way(make_worker, r, db, bot, web, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL)
    query(db, """UPDATE users SET "isActive" = false WHERE id = %s""", bot.user_id)  # a deactivated account
    add_tool(db, bot, "auth_text", "http_request", {"url": web.url + "/json", "requiresAuth": "true"})
    add_tool(db, bot, "auth_one", "http_request", {"url": web.url + "/json", "requiresAuth": 1})
    add_tool(db, bot, "models_only", "mcp_tool", {"operations": "list_models"})
    add_tool(db, bot, "no_ops", "mcp_tool", {"operations": []})
    gemini.script(
        call(
            "auth_text",
            {},
            ("auth_one", {}),
            ("models_only", {"operation": "get_user_info"}),
            ("no_ops", {"operation": "get_user_info"}),
        ),
        text("done"),
    )
    reply, _ = ask(r, worker, bot, NEUTRAL)
    outcomes = {name: call_of(reply, name)["ok"] for name in ("auth_text", "auth_one", "models_only", "no_ops")}
    assert outcomes == dict.fromkeys(outcomes, False), f"restrictions ignored: {outcomes}"
    assert web.seen == []


def test_cant_run_a_tool_past_its_owners_restrictions(make_worker, r, db, bot, other, web, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "authed", "http_request", {"url": web.url + "/json"}, requires_auth=True)
    add_tool(db, bot, "admins", "http_request", {"url": web.url + "/json", "roles": ["admin"]})
    add_tool(db, bot, "odd_roles", "http_request", {"url": web.url + "/json", "roles": {"user": True}})
    add_tool(db, bot, "no_roles", "http_request", {"url": web.url + "/json", "roles": []})
    # An account whose isActive is NULL (where the platform's column allows it) or false is not an active one.
    try:
        query(db, """UPDATE users SET "isActive" = NULL WHERE id = %s""", bot.user_id)
    except psycopg.errors.NotNullViolation:
        query(db, """UPDATE users SET "isActive" = false WHERE id = %s""", bot.user_id)
    gemini.script(call("authed", {}, ("admins", {}), ("odd_roles", {}), ("no_roles", {})), text("done"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    declared = {d["name"] for d in gemini.requests[0].body["tools"][0]["functionDeclarations"]}
    assert declared.isdisjoint({"authed", "admins", "odd_roles", "no_roles"})  # not offered...
    for name in ("authed", "admins", "odd_roles", "no_roles"):
        failed(call_of(reply, name), DENIED)  # ...nor run when asked for
    assert [e["code"] for e in errs] == [DENIED] and web.seen == []
    # An inactive bot answers nothing: no model request, no tool.
    query(db, """UPDATE bots SET "isActive" = false WHERE id = %s""", bot.bot_id)
    before = len(gemini.requests)
    responses, errs = send(r, worker, bot.message("run authed"))
    assert responses == [] and [e["code"] for e in errs] == [errors.BOT_INACTIVE]
    assert len(gemini.requests) == before and web.seen == []
    # Someone else's message naming this bot, with a model that would call its tools: bot_not_found.
    gemini.script(call("authed", {}), text("done"))
    responses, errs = send(r, worker, other.message("run authed", botId=bot.bot_id))
    assert responses == [] and [e["code"] for e in errs] == [errors.BOT_NOT_FOUND] and web.seen == []
