"""Unit tests of ``botworker.tools.dispatch`` (``dispatch``, ``max_attempts``, ``ToolRunner``) driven by an in-memory
tool family: the access and parameter checks before a run, retries, back-off and Retry-After, redaction of results,
errors and logs, and the model's function calls mapped to declared tools.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from botworker import errors
from botworker.config import load_config
from botworker.errors import TransientError
from botworker.message import ToolCall, ToolResult
from botworker.tools import ToolContext, ToolFailure
from botworker.tools.dispatch import ToolRunner, dispatch, max_attempts
from botworker.tools.secrets import REDACTED, SecretError, Secrets

from toolkit import ACTIVE_USER, BOT, OWNER, remembering


class FakeFamily:
    """An in-memory tool family: each run pops the next outcome (an exception is raised, anything else returned)."""

    TYPES = ("fake", "mcp_tool")

    def __init__(self, *outcomes: Any, retryable: bool = False) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[ToolCall] = []
        self._retryable = retryable

    def retryable(self, tool: dict[str, Any]) -> bool:
        return self._retryable

    def run(self, call: ToolCall, tool: dict[str, Any], ctx: ToolContext) -> Any:
        self.calls.append(call)
        outcome = self.outcomes.pop(0) if self.outcomes else {"ok": True}
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class PlainFamily:
    """A family without ``retryable``."""

    TYPES = ("fake",)

    def __init__(self, *outcomes: Any) -> None:
        self.inner = FakeFamily(*outcomes)

    def run(self, call: ToolCall, tool: dict[str, Any], ctx: ToolContext) -> Any:
        return self.inner.run(call, tool, ctx)


def fake_tool(tid: str = "t1", name: str = "fake_tool", kind: str = "fake", **config: Any) -> dict[str, Any]:
    return {"id": tid, "name": name, "type": kind, "isActive": True, "config": config}


def make_ctx(
    tools: list[dict[str, Any]],
    user: dict[str, Any] | None = None,
    secrets: Secrets | None = None,
    bot: dict[str, Any] | None = None,
    **env: str,
) -> ToolContext:
    cfg = load_config(environ={"TOOL_RETRY_DELAY": "0", **env}, env_file=None)
    return ToolContext(
        user_id=OWNER,
        bot=bot if bot is not None else BOT,
        tools=tools,
        store=None,  # type: ignore[arg-type]
        cfg=cfg,
        user=user if user is not None else dict(ACTIVE_USER),
        secrets=secrets,
    )


def call_of(tool: dict[str, Any], **params: Any) -> ToolCall:
    return ToolCall(str(tool["id"]), tool["name"], tool["type"], None, params)


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def run(
    tool: dict[str, Any], family: Any, ctx: ToolContext | None = None, call: ToolCall | None = None, **params: Any
) -> tuple[ToolResult, Sleeps]:
    sleeps = Sleeps()
    ctx = ctx or make_ctx([tool])
    result = dispatch(call or call_of(tool, **params), ctx, {"fake": family, "mcp_tool": family}, sleep=sleeps)
    return result, sleeps


def test_dispatch_ok() -> None:
    tool = fake_tool()
    family = FakeFamily({"answer": 42})
    result, sleeps = run(tool, family, x="1")
    assert (result.ok, result.data, result.error, result.code, result.attempts) == (True, {"answer": 42}, None, None, 1)
    assert result.call.params == {"x": "1"}
    assert sleeps == [] and len(family.calls) == 1


def test_dispatch_unknown_tool_id_is_denied() -> None:
    tool = fake_tool()
    family = FakeFamily()
    result, _ = run(tool, family, call=ToolCall("nope", "ghost", "fake", None, {}))
    assert (result.ok, result.code) == (False, errors.TOOL_DENIED)
    assert result.error == "tool ghost is not an active tool of this bot"
    assert family.calls == [] and result.attempts == 1


def test_dispatch_unknown_type_is_unsupported() -> None:
    tool = fake_tool(kind="teleport")
    result = dispatch(call_of(tool), make_ctx([tool]), {"fake": FakeFamily()}, sleep=Sleeps())
    assert (result.ok, result.code) == (False, errors.TOOL_UNSUPPORTED)
    assert "'teleport' is not supported" in (result.error or "")


@pytest.mark.parametrize(
    ("tool", "ctx_args", "fragment"),
    [
        (fake_tool(), {"bot": {"userId": "someone-else"}}, "runs only for the owner"),
        ({**fake_tool(), "isActive": False}, {}, "is not active"),
        ({**fake_tool(), "requiresAuth": True}, {"user": {"id": OWNER, "isActive": False}}, "requires an authent"),
        (fake_tool(requiresAuth=True), {"user": {"id": OWNER}}, "requires an authenticated"),
        (fake_tool(roles=["admin"]), {}, "limited to the role(s) admin"),
    ],
)
def test_dispatch_access_denial(tool: dict[str, Any], ctx_args: dict[str, Any], fragment: str) -> None:
    family = FakeFamily()
    result, _ = run(tool, family, make_ctx([tool], **ctx_args))
    assert (result.ok, result.code) == (False, errors.TOOL_DENIED)
    assert fragment in (result.error or "")
    assert family.calls == []


def test_dispatch_without_user_row_uses_user_id() -> None:
    tool = fake_tool(requiresAuth=True)
    ctx = ToolContext(OWNER, BOT, [tool], None, make_ctx([]).cfg)  # type: ignore[arg-type]
    result = dispatch(call_of(tool), ctx, {"fake": FakeFamily()}, sleep=Sleeps())
    assert result.code == errors.TOOL_DENIED  # no users row: not an active user


@pytest.mark.parametrize(
    ("given", "fragment"),
    [({}, "parameter 'days' is required"), ({"days": "many"}, "parameter 'days' must be an integer")],
)
def test_dispatch_invalid_params(given: dict[str, Any], fragment: str) -> None:
    tool = fake_tool(parameters={"days": {"type": "integer", "required": True}})
    family = FakeFamily()
    result, _ = run(tool, family, **given)
    assert (result.ok, result.code) == (False, errors.TOOL_INVALID_PARAMS)
    assert fragment in (result.error or "")
    assert family.calls == []


def test_dispatch_family_sees_coerced_params() -> None:
    tool = fake_tool(parameters={"days": "integer", "unit": {"type": "string", "default": "c"}})
    family = FakeFamily()
    result, _ = run(tool, family, days="3", param1="x")
    assert family.calls[0].params == {"days": 3, "unit": "c", "param1": "x"}
    assert result.call.params == {"days": 3, "unit": "c", "param1": "x"}


def transient(msg: str = "timeout", retry_after: float | None = None) -> ToolFailure:
    return ToolFailure(msg, errors.TOOL_FAILED, transient=True, retry_after=retry_after)


@pytest.mark.parametrize(
    ("config", "retryable", "expected"),
    [
        ({}, False, 1),
        ({}, True, 4),  # TOOL_MAX_ATTEMPTS
        ({"retry": True}, False, 4),
        ({"retry": False}, True, 1),
        ({"retry": False, "maxAttempts": 5}, True, 1),
        ({"maxAttempts": 2}, False, 2),
        ({"maxAttempts": 7}, True, 7),  # maxAttempts is not bounded by TOOL_MAX_ATTEMPTS...
        ({"maxAttempts": 50}, False, 10),  # ...but by 10
        ({"maxAttempts": 0}, True, 4),  # invalid: ignored
        ({"maxAttempts": 0}, False, 1),
        ({"maxAttempts": True}, False, 1),  # a bool is not a count
        ({"maxAttempts": "3"}, False, 1),
        ({"retry": "yes"}, False, 1),  # only true opts in
    ],
)
def test_dispatch_retries_transient_failures(config: dict[str, Any], retryable: bool, expected: int) -> None:
    tool = fake_tool(**config)
    family = FakeFamily(*[transient(f"fail {i}") for i in range(20)], retryable=retryable)
    ticks: list[int] = []
    sleeps = Sleeps()
    ctx = make_ctx([tool], TOOL_MAX_ATTEMPTS="4")
    assert max_attempts(family, tool, ctx) == expected  # type: ignore[arg-type]
    result = dispatch(call_of(tool), ctx, {"fake": family}, tick=lambda: ticks.append(1), sleep=sleeps)
    assert (result.ok, result.attempts, len(family.calls)) == (False, expected, expected)
    assert result.error == f"fail {expected - 1}"
    assert result.code == errors.TOOL_FAILED
    assert sleeps == [0.0] * (expected - 1)  # TOOL_RETRY_DELAY=0
    assert len(ticks) == expected - 1


def test_dispatch_family_without_retryable_is_not_retried() -> None:
    tool = fake_tool()
    family = PlainFamily(transient(), transient())
    result, _ = run(tool, family)
    assert (result.ok, result.attempts) == (False, 1)
    tool = fake_tool(retry=True)
    family = PlainFamily(transient(), {"fine": 1})
    result, _ = run(tool, family)
    assert (result.ok, result.attempts, result.data) == (True, 2, {"fine": 1})


def test_dispatch_success_after_retries() -> None:
    tool = fake_tool()
    family = FakeFamily(transient(), transient(), "third time", retryable=True)
    result, sleeps = run(tool, family)
    assert (result.ok, result.data, result.attempts) == (True, "third time", 3)
    assert sleeps == [0.0, 0.0]


def test_dispatch_non_transient_failure_not_retried() -> None:
    tool = fake_tool(retry=True)
    family = FakeFamily(ToolFailure("404 not found", errors.TOOL_FAILED), "never")
    result, sleeps = run(tool, family)
    assert (result.ok, result.error, result.attempts, sleeps) == (False, "404 not found", 1, [])


def test_dispatch_backoff_uses_tool_retry_delay() -> None:
    tool = fake_tool(retry=True)
    family = FakeFamily(transient(), transient(), transient())
    sleeps = Sleeps()
    ctx = make_ctx([tool], TOOL_RETRY_DELAY="1", TOOL_MAX_ATTEMPTS="3")
    dispatch(call_of(tool), ctx, {"fake": family}, sleep=sleeps)
    assert len(sleeps) == 2
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0


def test_dispatch_honours_retry_after() -> None:
    tool = fake_tool(retry=True)
    family = FakeFamily(transient("429", retry_after=2.5), transient("429", retry_after=0), "ok")
    result, sleeps = run(tool, family, make_ctx([tool], TOOL_RETRY_AFTER_MAX="3"))
    assert (result.ok, result.attempts) == (True, 3)
    assert sleeps == [2.5, 0]


def test_dispatch_retry_after_longer_than_max_ends_the_call() -> None:
    tool = fake_tool(retry=True)
    family = FakeFamily(transient("503 busy", retry_after=120), "never")
    result, sleeps = run(tool, family, make_ctx([tool], TOOL_RETRY_AFTER_MAX="30"))
    assert (result.ok, result.attempts, sleeps, len(family.calls)) == (False, 1, [], 1)
    assert result.error == "503 busy (the server asks to retry after 120s; TOOL_RETRY_AFTER_MAX is 30s)"
    assert result.code == errors.TOOL_FAILED


def test_dispatch_retry_after_on_last_attempt_is_just_the_failure() -> None:
    tool = fake_tool()  # not retryable: one attempt, the Retry-After is not mentioned
    result, sleeps = run(tool, FakeFamily(transient("503 busy", retry_after=120)))
    assert (result.error, sleeps) == ("503 busy", [])


def test_dispatch_unexpected_exception_is_internal_error_with_redacted_log(caplog: pytest.LogCaptureFixture) -> None:
    secrets = remembering("TOPSECRET")
    tool = fake_tool()
    family = FakeFamily(ValueError("TOPSECRET leaked"))
    caplog.set_level(logging.DEBUG, logger="botworker")
    result, _ = run(tool, family, make_ctx([tool], secrets=secrets))
    assert (result.ok, result.code) == (False, errors.TOOL_FAILED)
    assert result.error == "internal error in tool fake_tool: ValueError"
    assert "Traceback" in caplog.text and "ValueError" in caplog.text
    assert f"{REDACTED} leaked" in caplog.text
    assert "TOPSECRET" not in caplog.text


def test_dispatch_unexpected_exception_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    tool = fake_tool()
    result, _ = run(tool, FakeFamily(KeyError("k")))
    assert result.error == "internal error in tool fake_tool: KeyError"
    assert "KeyError" in caplog.text


def test_dispatch_retry_log_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="botworker")
    tool = fake_tool(retry=True)
    family = FakeFamily(transient("timeout calling https://u:TOPSECRET@h/"), "ok")
    result, _ = run(tool, family, make_ctx([tool], secrets=remembering("TOPSECRET")))
    assert result.ok
    assert "retrying" in caplog.text and "TOPSECRET" not in caplog.text


def test_dispatch_result_and_error_are_redacted() -> None:
    secrets = remembering("TOPSECRET")
    tool = fake_tool()
    data = {"token": "TOPSECRET", "TOPSECRET": ["xTOPSECRETx", 1], "n": None}
    result, _ = run(tool, FakeFamily(data), make_ctx([tool], secrets=secrets))
    assert result.data == {"token": REDACTED, REDACTED: [f"x{REDACTED}x", 1], "n": None}
    assert data["token"] == "TOPSECRET"  # the family's own object is not changed
    result, _ = run(tool, FakeFamily(ToolFailure("bad key TOPSECRET")), make_ctx([tool], secrets=secrets))
    assert result.error == f"bad key {REDACTED}"


def test_dispatch_secret_error_is_a_failed_result() -> None:
    tool = fake_tool()
    result, _ = run(tool, FakeFamily(SecretError("secret 1 not found")))
    assert (result.ok, result.error, result.code) == (False, "secret 1 not found", errors.TOOL_FAILED)


def test_dispatch_transient_error_propagates() -> None:
    tool = fake_tool(retry=True)
    family = FakeFamily(TransientError(errors.DATABASE_UNAVAILABLE, "db down"), "never")
    with pytest.raises(TransientError):
        run(tool, family)
    assert len(family.calls) == 1  # not retried as a tool failure


def test_dispatch_other_message_errors_are_internal_errors() -> None:
    tool = fake_tool()
    result, _ = run(tool, FakeFamily(errors.MessageError(errors.INVALID_MESSAGE, "x")))
    assert result.error == "internal error in tool fake_tool: MessageError"


def runner(tools: list[dict[str, Any]], family: Any = None, **ctx_args: Any) -> tuple[ToolRunner, Any]:
    family = family or FakeFamily()
    return ToolRunner(make_ctx(tools, **ctx_args), {"fake": family, "mcp_tool": family}), family


def test_runner_call_function_unknown_name() -> None:
    tools, family = runner([fake_tool()])
    result = tools.call_function("nope", {"a": 1})
    assert (result.ok, result.code, result.attempts) == (False, errors.TOOL_DENIED, 1)
    assert result.error == "there is no tool named 'nope'"
    assert (result.call.tool_id, result.call.type, result.call.params) == ("", "unknown", {"a": 1})
    assert tools.results == [result]
    assert family.calls == []


def test_runner_call_function_runs_and_records() -> None:
    tools, family = runner([fake_tool(name="weather api", parameters={"days": "integer"})])
    result = tools.call_function("weather_api", {"days": 3.0})
    assert result.ok and family.calls[0].params == {"days": 3}
    assert family.calls[0].name == "weather api"
    assert tools.call_function("weather_api", None).ok
    assert [r.ok for r in tools.results] == [True, True]


def test_runner_call_function_mcp_tool_pops_operation() -> None:
    platform = fake_tool("p", "platform", "mcp_tool")
    tools, family = runner([platform])
    args = {"operation": "search_platform", "query": "cats"}
    result = tools.call_function("platform", args)
    assert result.ok
    [call] = family.calls
    assert (call.type, call.operation, call.params) == ("mcp_tool", "search_platform", {"query": "cats"})
    assert args == {"operation": "search_platform", "query": "cats"}  # the caller's dict is not changed
    tools.call_function("platform", {"operation": ""})
    assert family.calls[1].operation is None


def test_runner_operation_stays_a_param_for_other_tools() -> None:
    tools, family = runner([fake_tool()])
    tools.call_function("fake_tool", {"operation": "x"})
    assert family.calls[0].operation is None and family.calls[0].params == {"operation": "x"}


def test_runner_declarations_skip_denied_and_unknown_types() -> None:
    ok = fake_tool("1", "weather", parameters={"city": {"type": "string", "required": True}})
    inactive = {**fake_tool("2", "inactive"), "isActive": False}
    admin_only = fake_tool("3", "admin_only", roles=["admin"])
    unknown = fake_tool("4", "teleport", kind="teleport")
    needs_auth = {**fake_tool("5", "needs_auth"), "requiresAuth": True}
    platform = fake_tool("6", "platform", "mcp_tool", operations=["list_models"])
    tools, _ = runner([ok, inactive, admin_only, unknown, needs_auth, platform])
    decls = tools.declarations()
    assert [d["name"] for d in decls] == ["weather", "needs_auth", "platform"]
    assert decls[0]["parameters"]["required"] == ["city"]
    assert decls[2]["parameters"]["properties"]["operation"]["enum"] == ["list_models"]
    # an inactive user loses the requiresAuth tool
    tools, _ = runner([ok, needs_auth], user={"id": OWNER, "isActive": False})
    assert [d["name"] for d in tools.declarations()] == ["weather"]


def test_runner_duplicate_names_get_distinct_function_names() -> None:
    a = fake_tool("1", "weather")
    b = fake_tool("2", "weather")
    c = fake_tool("3", "Weather!")  # the same function name after cleaning
    d = fake_tool("4", "x" * 80)
    e = fake_tool("5", "x" * 70)  # the same 64-character function name
    tools, family = runner([a, b, c, d, e])
    names = [decl["name"] for decl in tools.declarations()]
    assert len(set(names)) == 5
    assert names[0] == "weather" and names[3] == "x" * 64
    for name in names:
        assert len(name) <= 64 and name[0].isalpha()
    for name, tool in zip(names, [a, b, c, d, e], strict=True):
        tools.call_function(name, {})
        assert family.calls[-1].tool_id == tool["id"]


def test_runner_run_records_failures() -> None:
    tools, _ = runner([fake_tool()], family=FakeFamily(ToolFailure("nope")))
    result = tools.run(call_of(fake_tool()))
    assert not result.ok and tools.results == [result]
