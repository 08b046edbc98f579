"""Gemini replies against a local server that speaks Gemini's REST API (``gemini_server``); nothing leaves 127.0.0.1.

Unit-level tests call ``GeminiResponder.reply`` with a real BotContext and ToolRunner (the test database); end-to-end
tests push messages through an in-process Worker and read the events and rows it produced.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from botworker import errors
from botworker.config import Config
from botworker.demo import seed
from botworker.errors import LLMError
from botworker.llm import OfflineResponder, failures, make_responder
from botworker.llm.conversation import gemini_schema, history_turns
from botworker.llm.gemini import GeminiResponder
from botworker.message import Message, Reply
from botworker.pipeline import APOLOGY
from botworker.queue import ERRORS, RESPONSES
from botworker.store import BotContext, Store
from botworker.tools import ToolContext
from botworker.tools.dispatch import ToolRunner
from botworker.worker import Heartbeat, Worker

from conftest import Bot, Servers, events, push, query
from gemini_server import (
    MODEL_VERSION,
    GeminiServer,
    Step,
    answer,
    blocked_answer,
    blocked_prompt,
    call,
    error,
    raw,
    slow,
    text,
)
from toolkit import add_tool

pytest_plugins = ["gemini_server"]

KEY = "test-key-7Hq2ZpL9"  # must reach the server's header, and never a log line
PROMPT = "You are Helper Bot, a concise assistant for the platform."
OPERATIONS = [
    "list_models",
    "list_applications",
    "list_bots",
    "list_prompts",
    "list_tools",
    "get_user_info",
    "search_platform",
    "list_user_data",
]
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
OVERLOADED = error(503, "The model is overloaded. Please try again later.", "UNAVAILABLE")


def gemini_env(gemini: GeminiServer, **env: str) -> dict[str, str]:
    return {"GEMINI_KEY": KEY, "GEMINI_BASE_URL": gemini.url, "LLM_MAX_ATTEMPTS": "3", **env}


# ---- unit level: the responder with a real context -----------------------------------------------------------


@dataclasses.dataclass
class Unit:
    responder: GeminiResponder
    ctx: BotContext
    msg: Message
    runner: ToolRunner

    def reply(self) -> Reply:
        return self.responder.reply(self.ctx, self.msg, list(self.runner.results), self.runner)

    def fail(self) -> LLMError:
        with pytest.raises(LLMError) as info:
            self.reply()
        return info.value


@pytest.fixture
def unit(make_cfg: Callable[..., Config], gemini: GeminiServer, bot: Bot) -> Iterator[Callable[..., Unit]]:
    stores: list[Store] = []

    def make(message: str = "Hello there", history: list[dict[str, Any]] | None = None, **env: str) -> Unit:
        cfg = make_cfg(**gemini_env(gemini, **env))
        store = Store(cfg)
        stores.append(store)
        msg = Message(bot.bot_id, bot.user_id, message, str(uuid.uuid4()), None, datetime.now(UTC))
        ctx = store.load_context(msg)
        if history is not None:
            ctx = dataclasses.replace(ctx, history=history)
        runner = ToolRunner(ToolContext(msg.user_id, ctx.bot, ctx.tools, store, cfg, None, ctx.user))
        return Unit(GeminiResponder(cfg), ctx, msg, runner)

    yield make
    for store in stores:
        store.close()


# ---- end to end: an in-process worker --------------------------------------------------------------------------


@pytest.fixture
def run_worker(
    make_cfg: Callable[..., Config], r: redis.Redis, gemini: GeminiServer
) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(**env: str) -> Worker:
        worker = Worker(make_cfg(**gemini_env(gemini, **env)), 0, "test-node", Heartbeat())
        worker.init_process()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.sandbox.close()
        worker.store.close()
        worker.redis.close()


def ask(r: redis.Redis, worker: Worker, payload: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One message through the worker: (the saved reply row, the bot_errors events it caused)."""
    r.delete(RESPONSES, ERRORS)
    push(r, payload)
    assert worker.run_once()
    [event] = events(r, RESPONSES)
    return event["botResponse"], events(r, ERRORS)


def test_text_reply_with_real_token_counts(gemini: GeminiServer, bot: Bot, r: redis.Redis, run_worker) -> None:
    gemini.script(text("Hello Ada!", prompt=21, output=4))
    reply, errs = ask(r, run_worker(), bot.message("Hello there"))
    assert errs == []
    assert reply["content"] == "Hello Ada!" and reply["tokensUsed"] == 25
    meta = reply["metadata"]
    assert meta["model"] == "gemini-2.5-flash" and meta["modelVersion"] == MODEL_VERSION
    assert (meta["promptTokens"], meta["outputTokens"], meta["finishReason"], meta["rounds"]) == (21, 4, "STOP", 0)
    assert "tokensEstimated" not in meta and meta["toolCalls"] == []
    [request] = gemini.requests
    assert request.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert request.headers["x-goog-api-key"] == KEY


def test_request_has_system_instruction_history_turns_and_declared_tools(
    gemini: GeminiServer, bot: Bot, r: redis.Redis, run_worker
) -> None:
    worker = run_worker()
    gemini.script(text("Hi! How can I help?"), text("Fine, thanks."), text("Goodbye!"))
    first, _ = ask(r, worker, bot.message("hi"))
    instance = first["botInstanceId"]
    ask(r, worker, bot.message("how are you?", instanceId=instance))
    ask(r, worker, bot.message("bye", instanceId=instance))
    body = gemini.requests[2].body
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "hi"}]},
        {"role": "model", "parts": [{"text": "Hi! How can I help?"}]},
        {"role": "user", "parts": [{"text": "how are you?"}]},
        {"role": "model", "parts": [{"text": "Fine, thanks."}]},
        {"role": "user", "parts": [{"text": "bye"}]},
    ]
    assert body["systemInstruction"]["parts"] == [{"text": PROMPT}]
    [tools] = body["tools"]
    declared = {d["name"]: d for d in tools["functionDeclarations"]}
    assert {"platform", "word_count", "greeter"} <= set(declared)  # and whatever else the seed adds
    assert declared["platform"] == {
        "name": "platform",
        "description": "Reads your models, applications, bots and more",
        "parameters": {
            "type": "OBJECT",
            "properties": {
                "operation": {"type": "STRING", "enum": OPERATIONS, "description": "the platform operation to run"},
                "query": {"type": "STRING", "description": "search text, for search_platform"},
            },
            "required": ["operation"],
        },
    }
    assert declared["greeter"]["parameters"]["properties"] == {"param1": {"type": "STRING"}}
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}


def test_history_is_trimmed_oldest_first_to_the_token_budget(gemini: GeminiServer, unit) -> None:
    rows = [("user", "a" * 400), ("bot", "b" * 400), ("user", "c" * 40), ("bot", "d" * 40), ("system", "x")]
    rows += [("bot", "e" * 40)]
    history = [{"id": str(i), "role": role, "content": c, "createdAt": ""} for i, (role, c) in enumerate(rows)]
    gemini.script(text("ok"))
    unit("And now?", history, LLM_HISTORY_TOKENS="50").reply()
    assert gemini.requests[0].body["contents"] == [
        {"role": "user", "parts": [{"text": "c" * 40}]},
        {"role": "model", "parts": [{"text": "d" * 40}, {"text": "e" * 40}]},  # consecutive rows: one turn
        {"role": "user", "parts": [{"text": "And now?"}]},
    ]


def test_detected_tool_results_come_before_the_message(
    gemini: GeminiServer, bot: Bot, r: redis.Redis, run_worker
) -> None:
    gemini.script(text("You have three models."))
    reply, errs = ask(r, run_worker(), bot.message("list my models"))
    assert errs == [] and reply["content"] == "You have three models."
    [request] = gemini.requests
    parts = request.body["contents"][-1]["parts"]
    assert parts[-1] == {"text": "list my models"}
    assert "[platform list_models] ok:" in parts[0]["text"] and "sentiment" in parts[0]["text"]
    assert [c["operation"] for c in reply["metadata"]["toolCalls"]] == ["list_models"]


def test_function_call_runs_the_platform_tool_for_the_messages_user(
    gemini: GeminiServer, bot: Bot, db: Any, servers: Servers, r: redis.Redis, run_worker
) -> None:
    other_user, _ = seed(servers.database_url, str(uuid.uuid4()), str(uuid.uuid4()))
    query(
        db,
        """INSERT INTO models (id, name, "displayName", description, schema, "userId")
           VALUES (%s, 'not-yours', 'Not yours', 'another user''s model', '{}', %s)""",
        str(uuid.uuid4()),
        other_user,
    )
    args = {"operation": "list_models", "userId": other_user}
    gemini.script(call("platform", args), text("You have 3 models: sentiment, churn and vision.", prompt=80, output=12))
    reply, errs = ask(r, run_worker(), bot.message("what models do I have?"))
    assert errs == [] and reply["content"].startswith("You have 3 models")
    second = gemini.requests[1].body["contents"]
    assert second[-2] == {"role": "model", "parts": [{"functionCall": {"name": "platform", "args": args}}]}
    assert second[-1]["role"] == "user"
    [part] = second[-1]["parts"]
    assert part["functionResponse"]["name"] == "platform"
    items = part["functionResponse"]["response"]["result"]["items"]
    assert {m["name"] for m in items} == {"sentiment", "churn", "vision"}  # not the other user's
    assert reply["tokensUsed"] == 40 + 92 and reply["metadata"]["rounds"] == 1
    [used] = reply["metadata"]["toolCalls"]
    assert (used["tool"], used["operation"], used["ok"]) == ("platform", "list_models", True)


def test_several_calls_and_rounds_then_an_answer(gemini: GeminiServer, unit) -> None:
    gemini.script(
        call("platform", {"operation": "list_models"}, ("platform", {"operation": "list_applications"})),
        call("platform", {"operation": "search_platform", "query": "crm"}),
        text("Done.", prompt=100, output=3),
    )
    u = unit("Which of my things matter?")
    reply = u.reply()
    assert reply.text == "Done." and reply.tokens_used == 40 + 40 + 103
    assert reply.extra["rounds"] == 2 and reply.extra["llmRequests"] == 3
    responses = [p["functionResponse"] for p in gemini.requests[1].body["contents"][-1]["parts"]]
    assert [list(r["response"]["result"]) for r in responses] == [["total", "items"], ["total", "items"]]
    assert [r.call.operation for r in u.runner.results] == ["list_models", "list_applications", "search_platform"]
    assert "crm" in str(gemini.requests[2].body["contents"][-1]["parts"][0]["functionResponse"]["response"])


def test_rounds_are_bounded_then_it_answers_without_tools(
    gemini: GeminiServer, bot: Bot, r: redis.Redis, run_worker
) -> None:
    gemini.script(then=call("platform", {"operation": "get_user_info"}))
    reply, errs = ask(r, run_worker(LLM_MAX_ROUNDS="2"), bot.message("loop forever"))
    modes = [b["toolConfig"]["functionCallingConfig"]["mode"] for b in gemini.bodies()]
    assert modes == ["AUTO", "AUTO", "NONE"]
    assert errs == [] and reply["metadata"]["answeredFromTools"] is True
    assert "Ada Lovelace" in reply["content"] and len(reply["metadata"]["toolCalls"]) == 2


def test_unknown_and_denied_functions_get_error_responses(
    gemini: GeminiServer, bot: Bot, db: Any, r: redis.Redis, run_worker
) -> None:
    add_tool(
        db, bot, "admin_report", "custom_script", {"script": "result = 1", "roles": ["admin"]}, display="admin_report"
    )
    gemini.script(call("no_such_tool", {}, ("admin_report", {})), text("Sorry, I cannot do that."))
    reply, errs = ask(r, run_worker(), bot.message("do the thing"))
    declared = [d["name"] for d in gemini.requests[0].body["tools"][0]["functionDeclarations"]]
    assert "admin_report" not in declared  # not offered to this user...
    answers = [p["functionResponse"] for p in gemini.requests[1].body["contents"][-1]["parts"]]
    assert "no tool named 'no_such_tool'" in answers[0]["response"]["error"]
    assert "limited to the role(s) admin" in answers[1]["response"]["error"]  # ...nor run when asked for
    assert reply["content"] == "Sorry, I cannot do that."
    assert [e["code"] for e in errs] == [errors.TOOL_DENIED]


# ---- retries and failures --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("refusal", "wait"),
    [
        (error(429, "Resource has been exhausted (e.g. check quota).", "RESOURCE_EXHAUSTED", Retry_After="1"), 1.0),
        (error(429, "Rate limited.", "RESOURCE_EXHAUSTED", [{"@type": RETRY_INFO, "retryDelay": "0.6s"}]), 0.6),
        (error(503, "Overloaded.", "UNAVAILABLE", Retry_After="1"), 1.0),
    ],
)
def test_a_refusal_is_retried_after_the_delay_the_server_asks_for(
    gemini: GeminiServer, unit, refusal: Step, wait: float
) -> None:
    gemini.script(refusal, text("Sorry for the wait.", prompt=10, output=4))
    reply = unit().reply()
    assert reply.text == "Sorry for the wait." and reply.tokens_used == 14 and reply.extra["llmRequests"] == 2
    gap = gemini.requests[1].at - gemini.requests[0].at
    assert wait - 0.05 <= gap < wait + 5


@pytest.mark.parametrize(
    ("steps", "code", "requests"),
    [
        ([error(429, "Rate limited.", "RESOURCE_EXHAUSTED")], errors.LLM_RATE_LIMITED, 3),
        ([OVERLOADED], errors.LLM_UNAVAILABLE, 3),
        (
            [error(500, "Internal error.", "INTERNAL"), error(502, "Bad gateway.", "UNAVAILABLE")],
            errors.LLM_UNAVAILABLE,
            3,
        ),
        ([error(400, "Invalid JSON payload received.", "INVALID_ARGUMENT")], errors.LLM_BAD_REQUEST, 1),
        ([error(404, "models/gemini-x is not found.", "NOT_FOUND")], errors.LLM_BAD_REQUEST, 1),
        ([error(403, "Permission denied.", "PERMISSION_DENIED")], errors.LLM_INVALID_KEY, 1),
        ([blocked_prompt()], errors.LLM_SAFETY_BLOCKED, 1),
        ([blocked_answer("PROHIBITED_CONTENT")], errors.LLM_SAFETY_BLOCKED, 1),
        ([raw(b"{this is not json")], errors.LLM_BAD_REQUEST, 2),  # unreadable: retried once
        ([Step(body=answer([], 5, 0))], errors.LLM_BAD_REQUEST, 2),  # an empty candidate: retried once
    ],
)
def test_failures_are_classified_and_retried_only_when_it_may_help(
    gemini: GeminiServer, unit, steps: list[Step], code: str, requests: int
) -> None:
    gemini.script(*steps, then=steps[-1])
    failure = unit().fail()
    assert failure.code == code and len(gemini.requests) == requests
    assert failure.extra["model"] == "gemini-2.5-flash" and failure.extra["llmRequests"] == requests


def test_a_daily_quota_is_not_retried(gemini: GeminiServer, unit) -> None:
    details = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}],
        },
        {"@type": RETRY_INFO, "retryDelay": "20s"},
    ]
    message = "You exceeded your current quota, please check your plan and billing details."
    gemini.script(then=error(429, message, "RESOURCE_EXHAUSTED", details))
    failure = unit().fail()
    assert failure.code == errors.LLM_QUOTA_EXCEEDED and len(gemini.requests) == 1


def test_a_retry_after_beyond_the_deadline_ends_at_once(gemini: GeminiServer, unit) -> None:
    gemini.script(then=error(429, "Slow down.", "RESOURCE_EXHAUSTED", Retry_After="30"))
    started = time.monotonic()
    failure = unit(LLM_DEADLINE="5").fail()
    assert failure.code == errors.LLM_RATE_LIMITED and len(gemini.requests) == 1
    assert time.monotonic() - started < 4


def test_unreadable_then_good_answer_succeeds(gemini: GeminiServer, unit) -> None:
    gemini.script(raw(b"<html>proxy error</html>"), text("Here you go."))
    assert unit().reply().text == "Here you go." and len(gemini.requests) == 2


def test_a_slow_answer_times_out_and_is_retried(gemini: GeminiServer, unit) -> None:
    gemini.script(slow(text("too late"), 2.5), text("in time"))
    reply = unit(GEMINI_TIMEOUT="1").reply()
    assert reply.text == "in time" and reply.tokens_used == 25 and len(gemini.requests) == 2


def test_the_deadline_ends_the_retries_with_llm_timeout(gemini: GeminiServer, unit) -> None:
    gemini.script(then=slow(text("too late"), 3))
    started = time.monotonic()
    failure = unit(GEMINI_TIMEOUT="1", LLM_DEADLINE="1.5", LLM_MAX_ATTEMPTS="10").fail()
    assert failure.code == errors.LLM_TIMEOUT and 1 <= len(gemini.requests) <= 3
    assert time.monotonic() - started < 10


def test_an_unreachable_server_is_llm_unavailable(make_cfg: Callable[..., Config], unit) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    failure = unit(GEMINI_BASE_URL=closed).fail()
    assert failure.code == errors.LLM_UNAVAILABLE and failure.extra["llmRequests"] == 3


def test_missing_usage_metadata_is_estimated_and_marked(gemini: GeminiServer, unit) -> None:
    gemini.script(Step(body={"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi."}]}}]}))
    reply = unit().reply()
    assert reply.tokens_used > 0 and reply.extra["tokensEstimated"] is True


def test_an_invalid_key_is_not_retried_and_never_logged(
    gemini: GeminiServer, bot: Bot, r: redis.Redis, run_worker, caplog: pytest.LogCaptureFixture
) -> None:
    details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]
    gemini.script(then=error(400, "API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT", details))
    caplog.set_level(logging.DEBUG)
    reply, errs = ask(r, run_worker(), bot.message("Hello there"))
    assert [e["code"] for e in errs] == [errors.LLM_INVALID_KEY] and len(gemini.requests) == 1
    assert reply["content"] == APOLOGY
    assert KEY not in caplog.text and KEY not in str(reply) and KEY not in str(errs)


def test_outage_after_a_tool_round_gives_the_apology_one_event_and_the_tokens_spent(
    gemini: GeminiServer, bot: Bot, r: redis.Redis, run_worker
) -> None:
    gemini.script(call("platform", {"operation": "list_models"}), then=OVERLOADED)
    reply, errs = ask(r, run_worker(), bot.message("what models do I have?"))
    assert reply["content"] == APOLOGY
    assert [e["code"] for e in errs] == [errors.LLM_UNAVAILABLE] and "503" in errs[0]["error"]
    assert reply["tokensUsed"] == 40  # the first round's, as counted by Gemini
    meta = reply["metadata"]
    assert meta["error"]["code"] == errors.LLM_UNAVAILABLE and meta["model"] == "gemini-2.5-flash"
    assert [c["operation"] for c in meta["toolCalls"]] == ["list_models"]
    assert len(gemini.requests) == 1 + 3


def test_gemini_model_setting_overrides_the_bots_model(gemini: GeminiServer, unit) -> None:
    gemini.script(text("ok"))
    assert unit(GEMINI_MODEL="gemini-2.5-pro").reply().model == "gemini-2.5-pro"
    assert gemini.requests[0].path == "/v1beta/models/gemini-2.5-pro:generateContent"


def test_make_responder_picks_gemini_only_with_a_key(make_cfg: Callable[..., Config]) -> None:
    assert isinstance(make_responder(make_cfg()), OfflineResponder)
    responder = make_responder(make_cfg(GEMINI_KEY=KEY))
    assert isinstance(responder, GeminiResponder) and responder._client is None  # the client comes at first use


# ---- pure parts: the failure table, the schema, the history ----------------------------------------------------

QUOTA_PER_DAY = {
    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
    "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}],
}


@pytest.mark.parametrize(
    ("status", "message", "details", "header", "code", "retryable", "delay"),
    [
        (429, "Resource has been exhausted (e.g. check quota).", [], None, errors.LLM_RATE_LIMITED, True, None),
        (429, "You exceeded your current quota. Please retry in 37.5s.", [], None, errors.LLM_RATE_LIMITED, True, 37.5),
        (429, "Too many requests.", [{"@type": RETRY_INFO, "retryDelay": "2s"}], "5", errors.LLM_RATE_LIMITED, True, 5),
        (429, "You exceeded your current quota, check your plan.", [], None, errors.LLM_QUOTA_EXCEEDED, False, None),
        (
            429,
            "Quota exceeded.",
            [QUOTA_PER_DAY, {"@type": RETRY_INFO, "retryDelay": "9s"}],
            None,
            errors.LLM_QUOTA_EXCEEDED,
            False,
            None,
        ),
        (
            429,
            "Quota exceeded for metric: x, limit: 0, model: gemini-2.5-pro",
            [],
            "3",
            errors.LLM_QUOTA_EXCEEDED,
            False,
            None,
        ),
        (400, "API key not valid.", [{"reason": "API_KEY_INVALID"}], None, errors.LLM_INVALID_KEY, False, None),
        (401, "Unauthenticated.", [], None, errors.LLM_INVALID_KEY, False, None),
        (400, "Invalid value at 'contents'.", [], None, errors.LLM_BAD_REQUEST, False, None),
        (404, "Model not found.", [], None, errors.LLM_BAD_REQUEST, False, None),
        (408, "Request timeout.", [], None, errors.LLM_TIMEOUT, True, None),
        (503, "Overloaded.", [], "2", errors.LLM_UNAVAILABLE, True, 2),
        (501, "Not implemented.", [], None, errors.LLM_UNAVAILABLE, False, None),
    ],
)
def test_failure_table(
    status: int, message: str, details: list[Any], header: str | None, code: str, retryable: bool, delay: float | None
) -> None:
    body = {"error": {"code": status, "message": message, "status": "X", "details": details}}
    found = failures.from_status(status, "X", message, body, header)
    assert (found.code, found.retryable) == (code, retryable)
    if retryable:
        assert found.delay == delay


def test_json_schema_becomes_gemini_schema() -> None:
    spec = {
        "type": "object",
        "properties": {
            "days": {"type": "integer", "enum": [1, 7], "minimum": 1, "description": "How many days."},
            "tags": {"type": "array"},
            "city": {"type": "string", "minLength": 2, "maxLength": 40, "pattern": "[A-Za-z ]+"},
        },
        "required": ["days", "not-a-property"],
    }
    assert gemini_schema(spec) == {
        "type": "OBJECT",
        "properties": {
            "days": {"type": "INTEGER", "description": "How many days. One of: 1, 7.", "minimum": 1},
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}},
            "city": {"type": "STRING", "min_length": 2, "max_length": 40, "pattern": "[A-Za-z ]+"},
        },
        "required": ["days"],
    }


def test_history_turns_start_with_the_user_and_fit_the_budget() -> None:
    rows = [{"role": role, "content": text} for role, text in [("bot", "welcome"), ("user", "hi"), ("bot", "hello")]]
    assert history_turns(rows, 1000) == [("user", ["hi"]), ("model", ["hello"])]
    assert history_turns(rows, 5) == []  # "hello" alone would open with the model
    assert history_turns(rows, 0) == []
