"""``Pipeline.handle(message) -> Outcome``: the whole flow of one message, with its dependencies injected.

    load bot, prompts, tools, instance, history ─▶ already saved? (a retry) ─▶ replay the saved rows
                                                 └▶ detect tool calls ─▶ run them ─▶ reply ─▶ save both rows
                                                                          (the responder may run more: function calling)

``handle_many(messages)`` is the same flow for a batch (a backlog taken at once): one load for all, ``respond`` for
each, one save for all.

Expected failures are ``MessageError``s raised by the steps (unknown bot, bad instance...) or failed
``ToolResult``s (a failing tool still gets a reply, plus a ``tool_failed`` error event). ``handle`` catches nothing:
the one catch-all is at the message boundary in ``consumer.py``; ``handle_many`` returns each message's exception
instead of raising it, so that one message's failure is not its batch's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sandbox.client import SandboxClient

from . import errors, metrics
from .config import Config
from .detect import detect
from .errors import LLMError, MessageError, TransientError
from .llm import Responder
from .logs import about
from .message import Message, Reply
from .slots import CpuSlots
from .store import BotContext, Exchange, Store
from .tools import Family, ToolContext, budget, outbound, pinned, registry
from .tools.dispatch import ToolRunner
from .tools.secrets import Secrets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one handled message produced: the two saved rows, and an error to report beside the reply."""

    instance_id: str
    user_row: dict[str, Any]
    bot_row: dict[str, Any]
    error_code: str | None = None
    error: str | None = None
    replayed: bool = False


# The reply saved and sent when the language model fails (the platform's first worker's apology, kept word for
# word); the error event says why.
APOLOGY = "I'm sorry, but I encountered an error while generating a response. Please try again."


def utcnow() -> datetime:
    return datetime.now(UTC)


class Pipeline:
    """Processes validated messages; one per worker process, shared by its consumer threads (``handle`` keeps its
    state in locals; what it holds across calls is thread-safe: the store's pool, the HTTP session, the sandbox
    client, the responder)."""

    def __init__(
        self,
        cfg: Config,
        store: Store,
        responder: Responder,
        tick: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = utcnow,
        sandbox: SandboxClient | None = None,
        families: dict[str, Family] | None = None,
        slots: CpuSlots | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.responder = responder
        self.sandbox = sandbox
        self.families = registry.default() if families is None else families
        # One HTTP session per worker process, shared by its threads: connections are reused across messages,
        # each pinned to an address the outbound policy checked; up to one per thread is kept per host.
        self.http = pinned.session(outbound.OutboundPolicy(cfg.http_allowed_hosts), max(4, cfg.worker_threads))
        self.tick = tick  # called between steps: the worker's heartbeat
        self.clock = clock
        # The worker's CPU slots: its thread lets another run while a tool or the language model is waited on.
        self.slots = slots or CpuSlots(1, tick)

    def handle(self, msg: Message) -> Outcome:
        """One message: load, respond, save."""
        started = time.monotonic()
        ctx = self.store.load_context(msg)
        metrics.stage("load", time.monotonic() - started)
        done = self.respond(msg, ctx)
        if isinstance(done, Outcome):
            return done
        started = time.monotonic()
        pair = self.store.save_exchanges([done])[0]
        metrics.stage("save", time.monotonic() - started)
        return self._saved(done, pair)

    def handle_many(self, msgs: list[Message]) -> list[Outcome | Exception]:
        """Several messages with one load and one save round trip: each one's Outcome, or the exception that ends
        it (a MessageError, or a bug). A TransientError of the batch's load is raised (the caller handles each
        message on its own); when the batch's save fails, each exchange is saved on its own."""
        out: list[Outcome | Exception | None] = [None] * len(msgs)
        pending: list[tuple[int, Exchange]] = []
        started = time.monotonic()
        contexts = self.store.load_contexts(msgs)
        metrics.stage("load", time.monotonic() - started, len(msgs))
        for i, (msg, ctx) in enumerate(zip(msgs, contexts, strict=True)):
            if isinstance(ctx, MessageError):
                out[i] = ctx
                continue
            try:
                with about(msg.message_id, msg.bot_id):
                    done = self.respond(msg, ctx)
            except Exception as exc:  # (the message boundary decides what it means; the batch goes on)
                out[i] = exc
                continue
            if isinstance(done, Outcome):
                out[i] = done
            else:
                pending.append((i, done))
        started = time.monotonic()
        try:
            pairs = self.store.save_exchanges([ex for _, ex in pending])
        except TransientError as exc:
            log.info("saving %d exchanges at once failed (%s): saving each on its own", len(pending), exc.error)
            pairs = [self._save_one(ex) for _, ex in pending]
        metrics.stage("save", time.monotonic() - started, len(pending))
        for (i, ex), pair in zip(pending, pairs, strict=True):
            out[i] = pair if isinstance(pair, Exception) else self._saved(ex, pair)
        return [o if o is not None else RuntimeError("no outcome") for o in out]

    def _save_one(self, ex: Exchange) -> tuple[dict[str, Any], dict[str, Any]] | Exception:
        try:
            return self.store.save_exchanges([ex])[0]
        except Exception as exc:  # (a TransientError retries that message alone)
            return exc

    def respond(self, msg: Message, ctx: BotContext) -> Outcome | Exchange:
        """Everything between loading and saving: the replayed Outcome of an earlier attempt, or the Exchange to
        save (tools run, reply made)."""
        if ctx.saved is not None:
            log.info("message %s was already saved by an earlier attempt: replaying its reply", msg.message_id)
            return _outcome(ctx.instance_id, *ctx.saved, replayed=True)

        secrets = Secrets(self.store, self.cfg.encryption_key, msg.user_id)
        tool_ctx = ToolContext(
            msg.user_id, ctx.bot, ctx.tools, self.store, self.cfg, self.sandbox, ctx.user, self.http, secrets
        )
        runner = ToolRunner(tool_ctx, self.families, self.tick)
        started = time.monotonic()
        for call in detect(msg.text, ctx.tools):
            log.info("📝 Extracted params for %s: %s", call.name, _short(call.params))
            with self.slots.waiting():
                runner.run(call)
        metrics.stage("tools", time.monotonic() - started)

        self.tick()
        llm_error: dict[str, str] | None = None
        started = time.monotonic()
        try:
            with self.slots.waiting() if self.responder.waits else nullcontext():
                reply = self.responder.reply(ctx, msg, list(runner.results), runner)
        except LLMError as exc:
            log.warning("message %s: the language model failed (%s): %s", msg.message_id, exc.code, exc.error)
            reply = Reply(APOLOGY, str(exc.extra.get("model") or "unknown"), exc.tokens_used, dict(exc.extra))
            llm_error = {"code": exc.code, "message": exc.error}
        metrics.stage("llm", time.monotonic() - started)
        reply_at = self.clock()
        metadata = {
            "messageId": msg.message_id,
            "model": reply.model,
            "toolCalls": budget.summaries(runner.results, self.cfg.tool_result_budget, self.cfg.tool_results_budget),
            **reply.extra,
        }
        if llm_error:
            metadata["error"] = llm_error
        response_ms = max(0, int((reply_at - msg.received_at).total_seconds() * 1000))
        text = secrets.redact(reply.text)  # a model quoting a tool's output cannot quote a secret it never saw; still
        return Exchange(
            msg,
            ctx.instance_id,
            text,
            reply_at,
            reply.tokens_used,
            response_ms,
            {"messageId": msg.message_id},
            metadata,
        )

    @staticmethod
    def _saved(ex: Exchange, pair: tuple[dict[str, Any], dict[str, Any]]) -> Outcome:
        return _outcome(ex.instance_id, *pair)


def _outcome(instance_id: str, user_row: dict[str, Any], bot_row: dict[str, Any], replayed: bool = False) -> Outcome:
    """Derive the error event from the saved metadata, so a replay reports exactly what the first run did: the
    language model's failure if there was one, else the failed tool calls."""
    metadata = bot_row.get("metadata") or {}
    llm_error = metadata.get("error")
    if isinstance(llm_error, dict) and llm_error.get("code"):
        return Outcome(instance_id, user_row, bot_row, llm_error["code"], str(llm_error.get("message")), replayed)
    calls = metadata.get("toolCalls") or []
    failed = [c for c in calls if not c.get("ok")]
    if not failed:
        return Outcome(instance_id, user_row, bot_row, replayed=replayed)
    error = "; ".join(f"tool {c.get('tool')} failed: {c.get('error')}" for c in failed)
    return Outcome(instance_id, user_row, bot_row, failed[0].get("code") or errors.TOOL_FAILED, error, replayed)


def _short(params: dict[str, Any], limit: int = 200) -> str:
    text = repr(params)
    return text if len(text) <= limit else text[:limit] + "…"
