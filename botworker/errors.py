"""The exception tree, the error codes of ``bot_errors`` events and the process exit codes, in one place.

Exceptions::

    BotworkerError                 base of everything raised on purpose
    ├── ConfigError                an invalid setting; names the variable (exit EXIT_CONFIG)
    ├── BootError                  Redis or PostgreSQL unreachable past the boot window (exit EXIT_BOOT)
    └── CodedError                 carries a ``code`` (the bot_errors codes below) and a readable ``error``
        ├── MessageError           this message cannot be processed: one ``bot_errors`` event, settled
        ├── TransientError         the infrastructure failed (database down...): retry the message later
        └── LLMError               the language model failed (after its retries): apology reply + ``bot_errors``

Inside the pipeline a ``MessageError`` ends the message with one ``bot_errors`` event (and, where a reply can
still be given, a fallback reply); a ``TransientError`` puts the message back for another attempt, until
``max_attempts``, then it is dead-lettered.
"""

from __future__ import annotations

# Exit codes of `botworker` / `python worker.py` (documented in docs/operations.md).
EXIT_OK = 0  # normal stop (also after a warm or cold shutdown)
EXIT_ERROR = 1  # unexpected error (a bug): see the log
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_CONFIG = 3  # invalid configuration value: the message names the variable
EXIT_BOOT = 4  # workers could not boot: Redis or PostgreSQL unreachable past BOOT_TIMEOUT
EXIT_NO_WORKERS = 5  # `status`: no live worker fleet
EXIT_SEND_FAILED = 6  # `send`: a bot_errors event or no answer in time; `dead`: a named message is not a dead letter
EXIT_SANDBOX_MISSING = 7  # `sandbox-check`: a required sandbox layer does not hold here, or no sandbox could start
# A worker process's own exit code when it cannot boot (seen only by its supervisor, which then exits EXIT_BOOT):
# sysexits' EX_TEMPFAIL, apart from every code the command itself uses.
EXIT_WORKER_BOOT = 75

# Machine-readable `code` values of bot_errors events (documented in docs/errors.md).
INVALID_JSON = "invalid_json"
INVALID_MESSAGE = "invalid_message"
MESSAGE_TOO_LONG = "message_too_long"
BOT_NOT_FOUND = "bot_not_found"
BOT_INACTIVE = "bot_inactive"
INSTANCE_NOT_FOUND = "instance_not_found"
USER_NOT_FOUND = "user_not_found"
TOOL_FAILED = "tool_failed"
TOOL_DENIED = "tool_denied"
TOOL_INVALID_PARAMS = "tool_invalid_params"
TOOL_UNSUPPORTED = "tool_unsupported"
LLM_RATE_LIMITED = "llm_rate_limited"
LLM_QUOTA_EXCEEDED = "llm_quota_exceeded"
LLM_SAFETY_BLOCKED = "llm_safety_blocked"
LLM_INVALID_KEY = "llm_invalid_key"
LLM_TIMEOUT = "llm_timeout"
LLM_UNAVAILABLE = "llm_unavailable"
LLM_BAD_REQUEST = "llm_bad_request"
DATABASE_UNAVAILABLE = "database_unavailable"
DEAD_LETTERED = "dead_lettered"
INTERNAL_ERROR = "internal_error"

ERROR_CODES: dict[str, str] = {
    INVALID_JSON: "the payload is not a JSON object",
    INVALID_MESSAGE: "a field is missing or has the wrong type (botId/userId/instanceId must be uuids)",
    MESSAGE_TOO_LONG: "`message` is longer than MAX_MESSAGE_BYTES",
    BOT_NOT_FOUND: "no bot with that id that this user may use",
    BOT_INACTIVE: "the bot exists but is not active",
    INSTANCE_NOT_FOUND: "instanceId does not name an instance of this bot and user",
    USER_NOT_FOUND: "userId names no user",
    TOOL_FAILED: "a tool call failed; the reply explains it (sent as well)",
    TOOL_DENIED: "a tool may not run for this user (owner, requiresAuth, roles); the reply says why",
    TOOL_INVALID_PARAMS: "a tool's parameters are missing or invalid (declared parameters, placeholders, SQL shape)",
    TOOL_UNSUPPORTED: "the tool's type is not run by this worker (workflow_action, or no plugin for the type)",
    LLM_RATE_LIMITED: "Gemini answered 429 until the retries ran out; the apology reply is sent",
    LLM_QUOTA_EXCEEDED: "the Gemini key's quota is used up (429 naming a quota); the apology reply is sent",
    LLM_SAFETY_BLOCKED: "Gemini blocked the prompt or the answer for safety; the apology reply is sent",
    LLM_INVALID_KEY: "Gemini refused the key (401/403, or 400 API_KEY_INVALID)",
    LLM_TIMEOUT: "Gemini did not answer within GEMINI_TIMEOUT / LLM_DEADLINE",
    LLM_UNAVAILABLE: "Gemini failed with 5xx or could not be reached, retries exhausted",
    LLM_BAD_REQUEST: "Gemini refused the request (400) or sent a response that cannot be used",
    DATABASE_UNAVAILABLE: "PostgreSQL failed while processing; the message is retried",
    DEAD_LETTERED: "the message failed MAX_ATTEMPTS times; it is in bot_messages:dead",
    INTERNAL_ERROR: "an unexpected error in the worker (a bug); see the worker log",
}


def one_line(value: object, limit: int = 300) -> str:
    """An error (or any value) as one line of at most ``limit`` characters, for logs and events."""
    return " ".join((str(value) or type(value).__name__).split())[:limit]


class BotworkerError(Exception):
    """Base of every error the worker raises on purpose."""


class ConfigError(BotworkerError):
    """An invalid configuration value. The message names the variable."""


class BootError(BotworkerError):
    """A process could not reach Redis or PostgreSQL within its boot window."""


class CodedError(BotworkerError):
    """An error with the machine-readable ``code`` of a bot_errors event and a readable ``error``."""

    def __init__(self, code: str, error: str) -> None:
        super().__init__(error)
        self.code = code
        self.error = error


class MessageError(CodedError):
    """This message cannot be processed (bad input, unknown bot...): it ends with one bot_errors event."""


class TransientError(CodedError):
    """The infrastructure failed, not the message: put it back and try again later."""


class LLMError(CodedError):
    """The language model gave no usable answer (its retries spent). The message still gets an apology reply
    and one ``bot_errors`` event with ``code`` (one of the ``llm_*`` codes)."""

    def __init__(self, code: str, error: str, tokens_used: int = 0, extra: dict[str, object] | None = None) -> None:
        super().__init__(code, error)
        self.tokens_used = tokens_used
        self.extra = extra or {}
