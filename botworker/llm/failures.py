"""What a failed language-model request means: its ``llm_*`` code, whether to retry, how long the server asks to wait.

Pure functions over what an HTTP error carries (status, Google's error JSON, the ``Retry-After`` header), so the
policy reads on one screen and is tested without a server. ``gemini.py`` feeds it the SDK's exceptions.

============================================  ======================  =========================================
failure                                       code                    retried (LLM_MAX_ATTEMPTS, LLM_DEADLINE)
============================================  ======================  =========================================
401, 403, or 400 naming API_KEY_INVALID       llm_invalid_key         no
429 naming a daily quota, or "quota           llm_quota_exceeded      no: waiting seconds will not help
exceeded" with no delay to wait for
other 429                                     llm_rate_limited        yes, after Retry-After / RetryInfo if given
408, or no answer within GEMINI_TIMEOUT       llm_timeout             yes
500, 502, 503, 504, connection failures       llm_unavailable         yes, after Retry-After if given
other 5xx                                     llm_unavailable         no
other 4xx (400, 404...)                       llm_bad_request         no
a body that is not a response, an empty       llm_bad_request         once
candidate
prompt or answer blocked for safety           llm_safety_blocked      no
LLM_DEADLINE over before a request starts     llm_timeout             (a retry cut short by the deadline keeps
                                                                      its own code: 503s end as llm_unavailable)
============================================  ======================  =========================================
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .. import errors
from ..errors import one_line
from ..retry import retry_after

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
SAFETY_REASONS = frozenset({"SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY"})
_DAILY_QUOTA = re.compile(r"per ?day|daily|limit: ?0\b", re.IGNORECASE)
_QUOTA_EXCEEDED = re.compile(
    r"exceeded (?:your )?(?:current )?quota|quota (?:has been )?(?:exceeded|exhausted)|insufficient quota", re.I
)
_RETRY_IN = re.compile(r"retry in (\d+(?:\.\d+)?) ?s", re.IGNORECASE)


@dataclass(frozen=True)
class Failure:
    """One failed attempt, classified: its ``llm_*`` code, whether trying again may help, the server's delay."""

    code: str
    error: str
    retryable: bool = False
    delay: float | None = None  # seconds the server asked us to wait (Retry-After, RetryInfo)
    once: bool = False  # retried at most once (an unreadable or empty answer)


def from_status(status: int, name: str | None, message: str, body: Any, retry_after_header: str | None) -> Failure:
    """An HTTP error answer: ``status`` and Google's ``error.status`` ``name``, ``message`` and JSON ``body``."""
    details = error_details(body)
    said = f"Gemini answered {status} {name or ''}".rstrip() + (f": {one_line(message)}" if message else "")
    reasons = {str(d.get("reason")) for d in details}
    if (
        status in (401, 403)
        or "API_KEY_INVALID" in reasons
        or (status == 400 and "api key not valid" in message.lower())
    ):
        return Failure(errors.LLM_INVALID_KEY, said)
    delay = server_delay(retry_after_header, details, message)
    if status == 429:
        violations = " ".join(json.dumps(v) for d in details for v in d.get("violations") or [])
        if _DAILY_QUOTA.search(message + " " + violations) or (delay is None and _QUOTA_EXCEEDED.search(message)):
            return Failure(errors.LLM_QUOTA_EXCEEDED, said)
        return Failure(errors.LLM_RATE_LIMITED, said, True, delay)
    if status == 408:
        return Failure(errors.LLM_TIMEOUT, said, True)
    if status >= 500:
        return Failure(errors.LLM_UNAVAILABLE, said, status in RETRY_STATUSES, delay)
    return Failure(errors.LLM_BAD_REQUEST, said)


def timed_out(what: str) -> Failure:
    return Failure(errors.LLM_TIMEOUT, f"Gemini did not answer in time ({what})", True)


def unreachable(what: str) -> Failure:
    return Failure(errors.LLM_UNAVAILABLE, f"cannot reach Gemini ({one_line(what)})", True)


def unreadable(what: str) -> Failure:
    return Failure(errors.LLM_BAD_REQUEST, f"Gemini sent a response that cannot be read ({what})", True, once=True)


def no_answer(block_reason: str | None, block_message: str | None, finish_reason: str | None) -> Failure:
    """Why a 200 response without text or function calls has none: a blocked prompt, a blocked answer, or nothing."""
    if block_reason:
        said = f": {one_line(block_message)}" if block_message else ""
        return Failure(errors.LLM_SAFETY_BLOCKED, f"Gemini blocked the prompt ({block_reason}){said}")
    if finish_reason in SAFETY_REASONS:
        return Failure(errors.LLM_SAFETY_BLOCKED, f"Gemini blocked the answer (finishReason {finish_reason})")
    return Failure(
        errors.LLM_BAD_REQUEST,
        f"Gemini returned no answer (finishReason {finish_reason or 'missing'})",
        True,
        once=True,
    )


def error_details(body: Any) -> list[dict[str, Any]]:
    """The ``error.details`` entries of a Google error body (ErrorInfo, RetryInfo, QuotaFailure...)."""
    error = body.get("error", body) if isinstance(body, dict) else None
    found = error.get("details") if isinstance(error, dict) else None
    return [d for d in found if isinstance(d, dict)] if isinstance(found, list) else []


def server_delay(header: str | None, details: list[dict[str, Any]], message: str = "") -> float | None:
    """The wait the server asked for: ``Retry-After``, else RetryInfo's ``retryDelay`` ("2.5s"), else "retry in Ns"."""
    delay = retry_after(header)
    if delay is not None:
        return delay
    for detail in details:
        value = detail.get("retryDelay")
        if str(detail.get("@type", "")).endswith("RetryInfo") and isinstance(value, str):
            try:
                return max(0.0, float(value.strip().removesuffix("s")))
            except ValueError:
                pass
    found = _RETRY_IN.search(message)
    return float(found.group(1)) if found else None
