"""Running tool calls: ``dispatch(call, ctx)`` always returns a ``ToolResult``; ``ToolRunner`` runs a message's calls.

One call, in order: the tool must be one of the bot's active tools and its type known -> the user must be allowed
(``access.py``) -> its parameters must fit the declaration (``params.py``) -> the family runs it; a transient
failure is retried with back-off (``Retry-After`` honoured up to TOOL_RETRY_AFTER_MAX) when the call is
idempotent or the tool opts in -> every secret revealed on the way is redacted from the result and the error.

``dispatch`` is the tool boundary: any exception becomes a failed result, so a broken tool never takes the message
down. The one exception let through is ``TransientError`` (the platform database is down): the message is then
retried as a whole, which beats answering "internal error".
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

from .. import errors, metrics
from ..errors import TransientError
from ..message import ToolCall, ToolResult
from ..retry import backoff
from . import Family, ToolContext, ToolFailure, access, config_of, params, registry
from .platform import allowed_operations
from .secrets import SecretError

log = logging.getLogger(__name__)


def max_attempts(family: Family, tool: dict[str, Any], ctx: ToolContext) -> int:
    """1 unless the call may be retried: ``retry: false`` never; ``maxAttempts: n`` or ``retry: true`` opt in;
    otherwise the family says whether the tool's calls are idempotent (GET/HEAD, select)."""
    config = config_of(tool)
    if config.get("retry") is False:
        return 1
    wanted = config.get("maxAttempts")
    if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted >= 1:
        return min(wanted, 10)
    retryable: Callable[[dict[str, Any]], bool] | None = getattr(family, "retryable", None)
    if config.get("retry") is True or (retryable is not None and retryable(tool)):
        return ctx.cfg.tool_max_attempts
    return 1


def dispatch(
    call: ToolCall,
    ctx: ToolContext,
    families: dict[str, Family] | None = None,
    tick: Callable[[], None] = lambda: None,
    sleep: Callable[[float], None] = time.sleep,
) -> ToolResult:
    """Run one call; failures of any kind come back as ``ToolResult(ok=False, error=..., code=...)``."""
    started = time.monotonic()
    families = registry.default() if families is None else families
    tries = [0]  # attempts made, counted by _attempts as they happen
    data: Any = None
    error: str | None = None
    code: str | None = None
    try:
        call, tool, family = _admitted(call, ctx, families)
        data = _attempts(call, tool, family, ctx, tries, tick, sleep)
    except (ToolFailure, SecretError) as exc:
        data, error, code = None, str(exc), exc.code
    except TransientError:
        raise
    except Exception as exc:  # the tool boundary: a bug in one tool is that call's failure, not the message's
        # The traceback is formatted and redacted here: it may quote a secret (a header, a DSN) in a message.
        log.error("tool %s (%s) raised:\n%s", call.name, call.type, _safe(ctx, traceback.format_exc()))
        data, error, code = None, f"internal error in tool {call.name}: {type(exc).__name__}", errors.TOOL_FAILED
    if ctx.secrets is not None and ctx.secrets.used:
        try:
            data, error = ctx.secrets.redact(data), ctx.secrets.redact(error)
            call = dataclasses.replace(call, params=ctx.secrets.redact(call.params))
        except RecursionError:  # a result nested too deeply to be checked is not let through
            data, error, code = None, f"the result of tool {call.name} is nested too deeply", errors.TOOL_FAILED
            call = dataclasses.replace(call, params={})
    ok = error is None
    took = time.monotonic() - started
    metrics.tool(call.type, ok, code, took)
    return ToolResult(call, ok, data, error, int(took * 1000), max(tries[0], 1), code)


def _admitted(call: ToolCall, ctx: ToolContext, families: dict[str, Family]) -> tuple[ToolCall, dict[str, Any], Family]:
    """The call with its parameters validated, its tool row and family; ToolFailure when it may not run here."""
    tool = next((t for t in ctx.tools if str(t["id"]) == call.tool_id), None)
    if tool is None:
        raise ToolFailure(f"tool {call.name} is not an active tool of this bot", errors.TOOL_DENIED)
    # The family is chosen by the tool row's type, whatever the call claims.
    family = families.get(str(tool.get("type")))
    if family is None or call.type != tool.get("type"):
        raise ToolFailure(f"tool type {tool.get('type')!r} is not supported by this worker", errors.TOOL_UNSUPPORTED)
    reason = access.denial(tool, ctx.bot, ctx.user or {"id": ctx.user_id}, ctx.user_id)
    if reason:
        raise ToolFailure(reason, errors.TOOL_DENIED)
    try:
        return dataclasses.replace(call, params=params.validate(tool, call.params)), tool, family
    except params.InvalidParams as exc:
        raise ToolFailure(str(exc), errors.TOOL_INVALID_PARAMS) from None


def _attempts(
    call: ToolCall,
    tool: dict[str, Any],
    family: Family,
    ctx: ToolContext,
    tries: list[int],
    tick: Callable[[], None],
    sleep: Callable[[float], None],
) -> Any:
    """Run the call, retrying transient failures with back-off, within the attempts and the wait it may take."""
    limit = max_attempts(family, tool, ctx)
    waited = 0.0
    while True:
        tries[0] += 1
        try:
            return family.run(call, tool, ctx)
        except ToolFailure as exc:
            if not exc.transient or tries[0] >= limit:
                raise
            wait = _wait(exc, tries[0], ctx)
            if waited + wait > ctx.cfg.tool_retry_after_max:
                # One call never sleeps more than TOOL_RETRY_AFTER_MAX in all: a server answering 503 with
                # Retry-After: 29 every time would otherwise hold the worker for minutes.
                raise ToolFailure(
                    f"{exc} (no more retries: they would wait over TOOL_RETRY_AFTER_MAX="
                    f"{ctx.cfg.tool_retry_after_max:g}s in all)",
                    exc.code,
                ) from None
            waited += wait
            log.info("tool %s: attempt %d failed (%s); retrying in %.2fs", call.name, tries[0], _safe(ctx, exc), wait)
            tick()
            sleep(wait)


def _wait(exc: ToolFailure, attempts: int, ctx: ToolContext) -> float:
    if exc.retry_after is None:
        return backoff(attempts, ctx.cfg.tool_retry_delay, ctx.cfg.tool_retry_after_max)
    if exc.retry_after > ctx.cfg.tool_retry_after_max:
        # Retrying sooner than asked would only be refused again; waiting longer would hold the message.
        raise ToolFailure(
            f"{exc} (the server asks to retry after {exc.retry_after:g}s; TOOL_RETRY_AFTER_MAX is "
            f"{ctx.cfg.tool_retry_after_max:g}s)",
            exc.code,
        ) from None
    return exc.retry_after


def _safe(ctx: ToolContext, value: Any) -> str:
    text = str(value)
    return ctx.secrets.redact(text) if ctx.secrets is not None else text


class ToolRunner:
    """Runs the tool calls of one message, detected ones and those a language model asks for by name, through
    ``dispatch``; keeps every result in order (they all go into the reply's metadata)."""

    def __init__(
        self,
        ctx: ToolContext,
        families: dict[str, Family] | None = None,
        tick: Callable[[], None] = lambda: None,
    ) -> None:
        self.ctx = ctx
        self.families = registry.default() if families is None else families
        self.tick = tick
        self.results: list[ToolResult] = []
        self._by_name: dict[str, dict[str, Any]] = {}
        for tool in ctx.tools:
            name = params.function_name(tool)
            while name in self._by_name:  # two tools with one name: the later one gets a suffix
                name = f"{name[:56]}_{len(self._by_name)}"
            self._by_name[name] = tool

    def run(self, call: ToolCall) -> ToolResult:
        log.info("🔧 Tool: %s (%s)", call.name, call.type + (f"/{call.operation}" if call.operation else ""))
        self.tick()
        result = dispatch(call, self.ctx, self.families, self.tick)
        if not result.ok:
            log.warning("tool %s failed (%s): %s", call.name, result.code, result.error)
        self.results.append(result)
        return result

    def declarations(self) -> list[dict[str, Any]]:
        """Function declarations of the tools this user may run here (denied or unknown types are not offered)."""
        out = []
        user = self.ctx.user or {"id": self.ctx.user_id}
        for name, tool in self._by_name.items():
            if tool.get("type") not in self.families or access.denial(tool, self.ctx.bot, user, self.ctx.user_id):
                continue
            if tool.get("type") == "mcp_tool" and not allowed_operations(tool):
                continue  # a platform tool allowing no operation has nothing to offer
            out.append({**params.declaration(tool), "name": name})
        return out

    def call_function(self, name: str, args: dict[str, Any] | None) -> ToolResult:
        """Run the tool a model called ``name`` with ``args``; an unknown name is a failed result, not an error."""
        args = dict(args or {})
        tool = self._by_name.get(name)
        if tool is None:
            call = ToolCall("", name, "unknown", None, args)
            result = ToolResult(call, False, None, f"there is no tool named {name!r}", 0, 1, errors.TOOL_DENIED)
            self.results.append(result)
            return result
        operation = None
        if tool.get("type") == "mcp_tool":
            operation = str(args.pop("operation", "") or "") or None
        return self.run(ToolCall(str(tool["id"]), tool["name"], tool["type"], operation, args))
