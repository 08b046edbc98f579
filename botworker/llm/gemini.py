"""Gemini replies: native function calling, retries within a deadline, real token counts.

The only module that imports the Gemini SDK (``google-genai``). One ``genai.Client`` per worker process, created at
the first request (after the fork), talking to GEMINI_BASE_URL (``POST /v1beta/models/{model}:generateContent``,
the key in the ``x-goog-api-key`` header). The SDK's own retries and automatic function calling are off: this
module runs both loops itself, so it can honour ``Retry-After`` and one total deadline.

One reply::

    request = system instruction (the bot's active prompts) + history turns (user/model, trimmed to
              LLM_HISTORY_TOKENS, oldest out) + the message (detected tool results first, in the same turn)
              + the tools the user may run, as function declarations
    loop:     generateContent ─▶ function calls? run each through the ToolRunner (permissions, sandbox, retries),
              send the results back as functionResponse parts, up to LLM_MAX_ROUNDS rounds; then one last
              request with function calling off (mode NONE), which must answer in text
    limits:   at most LLM_MAX_TOOL_CALLS function calls per reply and none once LLM_DEADLINE has passed (the
              model is told why); every function call runs with the heartbeat kept
    retries:  every request: 429, 408, 500/502/503/504, timeouts, connection errors and unreadable/empty answers
              (once) are retried with exponential back-off and jitter (base LLM_RETRY_DELAY), or after the server's
              Retry-After / RetryInfo delay, up to LLM_MAX_ATTEMPTS attempts and never past LLM_DEADLINE

Failures raise ``LLMError`` with an ``llm_*`` code (the table is in ``failures``); the pipeline then saves its
apology reply and emits one ``bot_errors`` event. The key never reaches a log line or an error text.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from .. import errors, metrics
from ..config import Config
from ..errors import LLMError, one_line
from ..message import Message, Reply, ToolResult
from ..retry import backoff
from ..store import BotContext
from ..tools.dispatch import ToolRunner
from . import failures
from .conversation import (
    ResultBudget,
    gemini_schema,
    history_turns,
    model_name,
    results_block,
    system_instruction,
    valid_model_name,
)
from .failures import Failure
from .offline import describe
from .responder import estimate_tokens

log = logging.getLogger(__name__)

API_VERSION = "v1beta"
BACKOFF_CAP = 30.0  # seconds: the longest back-off between two attempts (a server's Retry-After may be longer)
MIN_REQUEST_TIME = 0.05  # seconds: with less left of LLM_DEADLINE, no request is started


def _http_libraries() -> list[Any]:
    """The HTTP libraries the SDK may use that are installed: its fork httpx2 (preferred), httpx."""
    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    return found


_HTTP = _http_libraries()
# (timeouts, other transport failures) of those libraries.
_TIMEOUTS: tuple[type[BaseException], ...] = (TimeoutError, *(m.TimeoutException for m in _HTTP))
_TRANSPORT: tuple[type[BaseException], ...] = (ConnectionError, *(m.RequestError for m in _HTTP))


def _pool_limits(threads: int) -> Any:
    """Connection-pool limits for the SDK's HTTP client, of the library it will use (it picks the one these come
    from): one kept-alive connection per worker thread, no cap on connections."""
    if not _HTTP:
        raise ImportError("google-genai needs httpx or httpx2")
    return _HTTP[0].Limits(max_connections=None, max_keepalive_connections=max(threads, 20))


def classify(exc: BaseException) -> Failure:
    """An exception from one ``generate_content`` call -> what it means (``failures`` has the table)."""
    if isinstance(exc, genai_errors.APIError):
        headers = getattr(exc.response, "headers", None)
        header = headers.get("retry-after") if hasattr(headers, "get") else None
        return failures.from_status(int(exc.code or 0), exc.status, str(exc.message or ""), exc.details, header)
    if isinstance(exc, _TIMEOUTS):
        return failures.timed_out(type(exc).__name__)
    if isinstance(exc, _TRANSPORT):
        return failures.unreachable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, ValueError):  # json.JSONDecodeError, pydantic.ValidationError: the body is not a response
        return failures.unreadable(type(exc).__name__)
    return Failure(errors.LLM_BAD_REQUEST, f"the Gemini client failed ({type(exc).__name__}: {one_line(exc)})")


def _name(value: Any) -> str | None:
    """An SDK enum (or a plain string) as its wire name."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _parts(response: types.GenerateContentResponse) -> list[types.Part]:
    candidate = response.candidates[0] if response.candidates else None
    return list(candidate.content.parts or []) if candidate is not None and candidate.content is not None else []


def _text(response: types.GenerateContentResponse) -> str:
    """The answer's text parts (thoughts left out), concatenated."""
    return "".join(p.text for p in _parts(response) if p.text and not p.thought).strip()


def _unusable(response: types.GenerateContentResponse) -> Failure | None:
    """Why a 200 response carries no answer (a blocked prompt or answer, an empty candidate), or None."""
    feedback = response.prompt_feedback
    blocked = _name(feedback.block_reason) if feedback is not None else None
    if not blocked and (_text(response) or response.function_calls):
        return None
    candidate = response.candidates[0] if response.candidates else None
    reason = _name(candidate.finish_reason) if candidate is not None else None
    return failures.no_answer(blocked, feedback.block_reason_message if feedback is not None else None, reason)


def _sent_text(contents: Sequence[types.Content], config: types.GenerateContentConfig) -> str:
    """Roughly what a request showed the model, for estimating tokens when a response has no usageMetadata."""
    texts = [str(config.system_instruction or "")]
    for content in contents:
        for part in content.parts or []:
            texts.append(part.text or "")
            if part.function_response is not None:
                texts.append(json.dumps(part.function_response.response, default=str))
    return "\n".join(texts)


def request_config(
    system: str, declarations: list[types.FunctionDeclaration], calling: bool
) -> types.GenerateContentConfig:
    """The request's settings: the system instruction, the tools (callable, or not any more: ``calling=False``)."""
    config = types.GenerateContentConfig(
        system_instruction=system,
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
    if declarations:
        mode = types.FunctionCallingConfigMode.AUTO if calling else types.FunctionCallingConfigMode.NONE
        config.tools = [types.Tool(function_declarations=declarations)]
        config.tool_config = types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode=mode))
    return config


def declaration(decl: dict[str, Any]) -> types.FunctionDeclaration:
    """One ``ToolRunner.declarations()`` entry as a function declaration (``parameters`` only if it takes any)."""
    params = decl.get("parameters") if isinstance(decl.get("parameters"), dict) else {}
    return types.FunctionDeclaration(
        name=decl["name"],
        description=str(decl.get("description") or ""),
        parameters=types.Schema.model_validate(gemini_schema(params)) if params.get("properties") else None,
    )


# ---- the responder -----------------------------------------------------------------------------------------


@dataclass
class _Exchange:
    """One reply in progress: its deadline, the heartbeat to keep, and what it has cost so far."""

    message_id: str
    model: str
    deadline: float
    tick: Callable[[], None]
    requests: int = 0
    rounds: int = 0
    calls: int = 0  # function calls run (or refused) so far
    prompt_tokens: int = 0
    output_tokens: int = 0
    thoughts_tokens: int = 0
    total_tokens: int = 0
    estimated: bool = False

    def count(self, response: types.GenerateContentResponse, sent: Callable[[], str]) -> None:
        usage = response.usage_metadata
        if usage is not None and usage.total_token_count is not None:
            self.prompt_tokens += usage.prompt_token_count or 0
            self.output_tokens += usage.candidates_token_count or 0
            self.thoughts_tokens += usage.thoughts_token_count or 0
            self.total_tokens += usage.total_token_count
            metrics.llm_tokens(prompt=usage.prompt_token_count or 0, output=usage.candidates_token_count or 0,
                               thoughts=usage.thoughts_token_count or 0)  # fmt: skip
        else:
            self.estimated = True
            estimate = estimate_tokens(sent(), _text(response))
            self.total_tokens += estimate
            metrics.llm_tokens(estimated=estimate)

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "promptTokens": self.prompt_tokens,
            "outputTokens": self.output_tokens,
            "rounds": self.rounds,
            "llmRequests": self.requests,
        }
        if self.thoughts_tokens:
            out["thoughtsTokens"] = self.thoughts_tokens  # part of the total (and billed), but not of the answer
        if self.estimated:
            out["tokensEstimated"] = True
        return out

    def fail(self, failure: Failure, note: str = "") -> LLMError:
        return LLMError(failure.code, failure.error + note, self.total_tokens, {"model": self.model, **self.extra()})


class GeminiResponder:
    """Replies through the Gemini API (see the module docstring). One per worker process, shared by its threads."""

    waits = True

    def __init__(
        self,
        cfg: Config,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.cfg = cfg
        self.sleep = sleep
        self.clock = clock
        self.rng = rng
        self._client: genai.Client | None = None
        self._lock = threading.Lock()

    def client(self) -> genai.Client:
        """The process's client, made at first use (never at import, never before the fork), shared by the
        worker's threads (its HTTP connection pool included)."""
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> genai.Client:
        options = types.HttpOptions(
            api_version=API_VERSION,
            timeout=_ms(self.cfg.gemini_timeout),
            retry_options=types.HttpRetryOptions(attempts=1),  # retried here, within LLM_DEADLINE
            # Every thread of the worker may wait on Gemini at once: keep a connection per thread alive (httpx
            # keeps 20 by default; the others would reconnect, TLS included, for every request).
            client_args={"limits": _pool_limits(self.cfg.worker_threads)},
        )
        if self.cfg.gemini_base_url:
            options.base_url = self.cfg.gemini_base_url
        return genai.Client(vertexai=False, api_key=self.cfg.gemini_key, http_options=options)

    def reply(
        self, ctx: BotContext, msg: Message, results: Sequence[ToolResult], tools: ToolRunner | None = None
    ) -> Reply:
        tick = tools.tick if tools is not None else (lambda: None)
        ex = _Exchange(
            msg.message_id, model_name(self.cfg.gemini_model, ctx), self.clock() + self.cfg.llm_deadline, tick
        )
        if not valid_model_name(ex.model):
            raise ex.fail(Failure(errors.LLM_BAD_REQUEST, f"{ex.model[:80]!r} is not a Gemini model name"))
        spent = ResultBudget(self.cfg.tool_result_budget, self.cfg.tool_results_budget)
        contents = self._contents(ctx, msg, results, spent)
        declarations = [declaration(d) for d in tools.declarations()] if tools is not None else []
        system = system_instruction(ctx)
        while True:
            last = ex.rounds >= self.cfg.llm_max_rounds
            response = self._generate(ex, contents, request_config(system, declarations, calling=not last))
            calls = response.function_calls or []
            if not calls or last:
                break
            ex.rounds += 1
            asked = response.candidates[0].content  # as sent, thought signatures included
            contents.append(asked.model_copy(update={"role": "model"}))
            contents.append(types.Content(role="user", parts=[self._run(ex, call, tools, spent) for call in calls]))
        return self._answer(ex, response, tools)

    def _contents(
        self, ctx: BotContext, msg: Message, results: Sequence[ToolResult], spent: ResultBudget
    ) -> list[types.Content]:
        """History turns, then one user turn: the detected tool results (if any), then the message."""
        contents = [
            types.Content(role=role, parts=[types.Part(text=t) for t in texts])
            for role, texts in history_turns(ctx.history, self.cfg.llm_history_tokens)
        ]
        parts = [types.Part(text=results_block(spent.entries(results)))] if results else []
        parts.append(types.Part(text=msg.text))
        if contents and contents[-1].role == "user":  # the last message got no reply saved: one user turn
            contents[-1].parts = [*(contents[-1].parts or []), *parts]
        else:
            contents.append(types.Content(role="user", parts=parts))
        return contents

    def _generate(
        self, ex: _Exchange, contents: list[types.Content], config: types.GenerateContentConfig
    ) -> types.GenerateContentResponse:
        """One request, retried on transient failures within LLM_MAX_ATTEMPTS and LLM_DEADLINE."""
        attempt = unusable = 0
        while True:
            attempt += 1
            left = ex.deadline - self.clock()
            if left < MIN_REQUEST_TIME:
                raise ex.fail(
                    Failure(errors.LLM_TIMEOUT, f"no answer within LLM_DEADLINE ({self.cfg.llm_deadline:g}s)")
                )
            ex.requests += 1
            ex.tick()
            timed = config.model_copy(
                update={"http_options": types.HttpOptions(timeout=_ms(min(self.cfg.gemini_timeout, left)))}
            )
            sent_at = time.monotonic()
            try:
                response = self.client().models.generate_content(model=ex.model, contents=contents, config=timed)
            except Exception as exc:  # the provider boundary: every failure of the call is classified
                failure = self._scrub(classify(exc))
                if failure.code == errors.LLM_BAD_REQUEST and not isinstance(exc, (genai_errors.APIError, ValueError)):
                    log.error("message %s: the Gemini client raised", ex.message_id, exc_info=True)
            else:
                ex.count(response, lambda: _sent_text(contents, config))
                found = _unusable(response)
                if found is None:
                    metrics.llm_request("ok", time.monotonic() - sent_at)
                    return response
                failure = self._scrub(found)
            metrics.llm_request(failure.code, time.monotonic() - sent_at)
            unusable += failure.once
            if not failure.retryable or (failure.once and unusable > 1):
                raise ex.fail(failure)
            if attempt >= self.cfg.llm_max_attempts:
                raise ex.fail(failure, f" (gave up after {attempt} attempts)")
            wait = (
                failure.delay
                if failure.delay is not None
                else backoff(attempt, self.cfg.llm_retry_delay, BACKOFF_CAP, self.rng)
            )
            if self.clock() + wait + MIN_REQUEST_TIME > ex.deadline:
                raise ex.fail(failure, f" (no time left in LLM_DEADLINE to retry in {wait:.1f}s)")
            metrics.llm_retry(failure.code)
            log.warning(
                "message %s: Gemini attempt %d failed (%s: %s); retrying in %.2fs",
                ex.message_id,
                attempt,
                failure.code,
                failure.error,
                wait,
            )
            self._wait(ex, wait)

    def _wait(self, ex: _Exchange, seconds: float) -> None:
        """Sleep, beating the heartbeat at least once a second."""
        end = self.clock() + seconds
        while (left := end - self.clock()) > 0:
            ex.tick()
            self.sleep(min(left, 1.0))

    def _scrub(self, failure: Failure) -> Failure:
        """The key out of an error text (a proxy may echo a request back)."""
        key = self.cfg.gemini_key
        if key and key in failure.error:
            return dataclasses.replace(failure, error=failure.error.replace(key, "***"))
        return failure

    def _run(
        self, ex: _Exchange, call: types.FunctionCall, tools: ToolRunner | None, spent: ResultBudget
    ) -> types.Part:
        """Run one function call through the ToolRunner; its result (or why it failed) as a functionResponse."""
        name = call.name or ""
        ex.calls += 1
        if tools is None:
            response: dict[str, Any] = {"error": "no tools are available here"}
        elif ex.calls > self.cfg.llm_max_tool_calls:
            # A model (or a prompt injected into it) asking for hundreds of calls must not turn one message into
            # hundreds of requests to third parties.
            response = {"error": f"not run: at most {self.cfg.llm_max_tool_calls} tool calls per reply"}
        elif self.clock() + MIN_REQUEST_TIME >= ex.deadline:
            response = {"error": f"not run: the reply's time is up (LLM_DEADLINE {self.cfg.llm_deadline:g}s)"}
        else:
            result = tools.call_function(name, dict(call.args or {}))
            response = spent.response(result)
            log.info("message %s: Gemini called %s: %s", ex.message_id, name, "ok" if result.ok else result.code)
        return types.Part(function_response=types.FunctionResponse(id=call.id, name=name, response=response))

    def _answer(self, ex: _Exchange, response: types.GenerateContentResponse, tools: ToolRunner | None) -> Reply:
        text = _text(response)
        candidate = response.candidates[0] if response.candidates else None
        extra = ex.extra()
        extra["finishReason"] = _name(candidate.finish_reason) if candidate is not None else None
        extra["modelVersion"] = response.model_version or ex.model
        if not text and tools is not None and tools.results:
            # The last request (function calling off) still asked for tools: answer from the results at hand.
            text = "\n".join(describe(r) for r in tools.results)
            extra["answeredFromTools"] = True
        if not text:
            raise ex.fail(Failure(errors.LLM_BAD_REQUEST, "Gemini kept calling tools and gave no answer"))
        log.info(
            "message %s: Gemini %s answered after %d round(s), %d request(s), %d tokens",
            ex.message_id,
            extra["modelVersion"],
            ex.rounds,
            ex.requests,
            ex.total_tokens,
        )
        return Reply(text, ex.model, ex.total_tokens, extra)
