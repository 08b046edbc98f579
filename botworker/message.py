"""The values that flow through one message's processing, reading the raw payload, and the events' shapes.

Everything here is a frozen dataclass or a pure function: no I/O. ``read`` turns the bytes popped from
``bot_messages`` into an ``Envelope``: the ids it carries, the validated ``Message`` or the ``MessageError`` (with
the contract's error code) that says why it is not one, and the id assigned when the producer gave none.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import errors
from .errors import MessageError

MAX_MESSAGE_ID_CHARS = 200


@dataclass(frozen=True)
class Message:
    """One validated user message, as the API server pushed it (``message_id`` always set by then)."""

    bot_id: str
    user_id: str
    text: str
    message_id: str
    instance_id: str | None
    received_at: datetime


@dataclass(frozen=True)
class ToolCall:
    """A tool the message asks for: which ``bot_tools`` row, which operation, which parameters."""

    tool_id: str
    name: str
    type: str
    operation: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolResult:
    """What one tool call produced. ``ok=False`` carries a human-readable ``error`` and its ``code``; never an
    exception. ``attempts`` counts retries of transient failures."""

    call: ToolCall
    ok: bool
    data: Any = None
    error: str | None = None
    duration_ms: int = 0
    attempts: int = 1
    code: str | None = None

    def summary(self) -> dict[str, Any]:
        """The outcome as stored in the reply's metadata (``tools.budget.summary`` clips large results)."""
        out: dict[str, Any] = {
            "tool": self.call.name,
            "type": self.call.type,
            "ok": self.ok,
            "durationMs": self.duration_ms,
            "attempts": self.attempts,
        }
        if self.call.operation:
            out["operation"] = self.call.operation
        if self.call.params:
            out["params"] = self.call.params
        if self.ok:
            out["result"] = self.data
        else:
            out["error"] = self.error
            out["code"] = self.code or "tool_failed"
        return out


@dataclass(frozen=True)
class Reply:
    """The bot's answer as the responder produced it."""

    text: str
    model: str
    tokens_used: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ids:
    """The identifying fields of a payload, as far as they can be read, for error events of bad messages."""

    message_id: str
    bot_id: str | None = None
    user_id: str | None = None
    instance_id: str | None = None


@dataclass(frozen=True)
class Envelope:
    """One popped payload, read once."""

    ids: Ids  # message id always set (assigned when the payload has none)
    message: Message | None  # None: ``error`` says why
    error: MessageError | None = None
    readable: bool = True  # a JSON object at all (an unreadable payload is answered at once, not attempted)
    rewritten: str | None = None  # the payload with its assigned messageId, for the in-flight copy
    preview: str = "?"  # the start of the text, for the log
    queued_at: float | None = None  # the producer's optional ``queuedAt`` (epoch seconds), for latency metrics


def read(raw: bytes | str, max_bytes: int, received_at: datetime) -> Envelope:
    """The message boundary's one call: bytes from the queue -> an Envelope. Never raises."""
    try:
        payload = decode(raw, max_bytes)
    except MessageError as exc:
        return Envelope(Ids(str(uuid.uuid4())), None, exc, readable=False)
    mid = message_id_of(payload)
    rewritten = None
    if mid is None:
        mid = str(uuid.uuid4())
        if payload.get("messageId") is None:
            # Recorded in the in-flight copy, so that a retry after a crash keeps the same id.
            rewritten = json.dumps({**payload, "messageId": mid}, ensure_ascii=False, separators=(",", ":"))
    text = payload.get("message")
    preview = text[:50] if isinstance(text, str) else "?"
    ids = peek_ids(payload, mid)
    queued = queued_at_of(payload)
    try:
        msg = parse_message(payload, mid, received_at, max_bytes)
        return Envelope(ids, msg, None, True, rewritten, preview, queued)
    except MessageError as exc:
        return Envelope(ids, None, exc, True, rewritten, preview, queued)


def queued_at_of(payload: dict[str, Any]) -> float | None:
    """The optional ``queuedAt`` a producer may add (milliseconds since the epoch, as JavaScript's ``Date.now()``
    gives, or an ISO 8601 time), in epoch seconds; None when absent or unreadable: it only feeds the end-to-end
    latency metric, so a bad one is ignored rather than failing the message."""
    value = payload.get("queuedAt")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e14:
        return value / 1000
    if isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return stamp.timestamp() if stamp.tzinfo is not None else None
    return None


def peek_ids(payload: Any, message_id: str) -> Ids:
    """Read whatever ids a (possibly invalid) decoded payload has; strings only, anything else becomes None."""
    if not isinstance(payload, dict):
        return Ids(message_id)

    def text(key: str) -> str | None:
        value = payload.get(key)
        return value if isinstance(value, str) else None

    return Ids(message_id, text("botId"), text("userId"), text("instanceId"))


def decode(raw: bytes | str, max_bytes: int) -> dict[str, Any]:
    """Bytes from the queue -> a JSON object, or MessageError(invalid_json / message_too_long)."""
    # A payload far larger than any valid message (JSON escapes take up to 6 bytes a character, plus the other
    # fields) is refused before parsing, so a huge push cannot balloon a worker's memory.
    if len(raw) > 6 * max_bytes + 4096:
        raise MessageError(errors.MESSAGE_TOO_LONG, f"payload is {len(raw)} bytes; messages are limited to {max_bytes}")
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(errors.INVALID_JSON, f"payload is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise MessageError(errors.INVALID_JSON, f"payload must be a JSON object, not {type(payload).__name__}")
    return payload


def message_id_of(payload: dict[str, Any]) -> str | None:
    """The producer's messageId as a string (numbers are accepted and turned into strings), or None."""
    value = payload.get("messageId")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (str, int)) and 0 < len(str(value)) <= MAX_MESSAGE_ID_CHARS:
        return str(value)
    return None


def _uuid(payload: dict[str, Any], key: str, required: bool) -> str | None:
    value = payload.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise MessageError(
            errors.INVALID_MESSAGE,
            f"`{key}` must be a uuid string" + ("" if value is None else f", got {type(value).__name__}"),
        )
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise MessageError(errors.INVALID_MESSAGE, f"`{key}` is not a valid uuid: {value[:60]!r}") from None


def parse_message(payload: dict[str, Any], message_id: str, received_at: datetime, max_bytes: int) -> Message:
    """Validate a decoded payload against the contract's message shape."""
    bot_id = _uuid(payload, "botId", required=True)
    user_id = _uuid(payload, "userId", required=True)
    instance_id = _uuid(payload, "instanceId", required=False)
    text = payload.get("message")
    if not isinstance(text, str):
        raise MessageError(errors.INVALID_MESSAGE, "`message` must be a string")
    if not text.strip():
        raise MessageError(errors.INVALID_MESSAGE, "`message` must not be empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise MessageError(errors.INVALID_MESSAGE, "`message` is not valid Unicode (lone surrogate)") from None
    if size > max_bytes:
        raise MessageError(errors.MESSAGE_TOO_LONG, f"`message` is {size} bytes; the limit is {max_bytes}")
    if "\x00" in text:
        # PostgreSQL text cannot hold NUL; say so instead of failing in the database.
        raise MessageError(errors.INVALID_MESSAGE, "`message` must not contain NUL characters")
    if payload.get("messageId") is not None and message_id_of(payload) is None:
        raise MessageError(
            errors.INVALID_MESSAGE,
            f"`messageId` must be a non-empty string of at most {MAX_MESSAGE_ID_CHARS} characters",
        )
    assert bot_id and user_id
    return Message(bot_id, user_id, text, message_id, instance_id, received_at)


def response_event(
    instance_id: str, bot_id: str, user_id: str, message_id: str, user_row: dict[str, Any], bot_row: dict[str, Any]
) -> dict[str, Any]:
    """The ``bot_responses`` event of CONTRACT.md."""
    return {
        "instanceId": instance_id,
        "botId": bot_id,
        "userId": user_id,
        "messageId": message_id,
        "userMessage": user_row,
        "botResponse": bot_row,
    }


def reply_events(
    msg: Message, instance_id: str, user_row: dict[str, Any], bot_row: dict[str, Any], code: str | None, error: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A settled message's ``bot_responses`` event, and its ``bot_errors`` event when a step failed on the way
    (a tool, the LLM: the reply explains it)."""
    response = response_event(instance_id, msg.bot_id, msg.user_id, msg.message_id, user_row, bot_row)
    if not (code and error):
        return response, None
    return response, error_event(Ids(msg.message_id, msg.bot_id, msg.user_id, instance_id), code, error)


def error_event(ids: Ids, code: str, error: str) -> dict[str, Any]:
    """The ``bot_errors`` event of CONTRACT.md."""
    return {
        "botId": ids.bot_id,
        "userId": ids.user_id,
        "instanceId": ids.instance_id,
        "messageId": ids.message_id,
        "error": error,
        "code": code,
    }


_AS_IS = frozenset({str, int, bool, type(None)})  # what JSON takes as it is (the common case: checked first)


def jsonable(value: Any, api_stamps: bool = False) -> Any:
    """A value (a column's, a row's) as JSON: numbers stay numbers (non-finite ones, and integers beyond 2**53,
    become text), uuids text, bytes base64, times ISO 8601. With ``api_stamps`` (the platform's own rows, written
    in UTC) timestamps are shown as the platform's API shows them: UTC, milliseconds, 'Z'; otherwise as they came
    (a tool's database says nothing about the zone of a naive timestamp)."""
    kind = type(value)
    if kind in _AS_IS:
        return value
    if kind is dict:
        return {k if type(k) is str else str(k): jsonable(v, api_stamps) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return str(value)
        if value == value.to_integral_value():
            return int(value) if abs(value) < 2**53 else str(value)  # exact: beyond 2**53 a float would round
        as_float = float(value)
        return as_float if math.isfinite(as_float) and abs(value) < 2**53 else str(value)
    if isinstance(value, dt.datetime) and api_stamps:
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat(timespec="milliseconds") + "Z"
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): jsonable(v, api_stamps) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, api_stamps) for v in value]
    return str(value)
