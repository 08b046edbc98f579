"""Tools: the vocabulary every tool family shares (``ToolFailure``, ``ToolContext``, the ``Family`` shape).

A family is any object (usually a module) with ``TYPES`` (the ``bot_tools.type`` values it runs), ``run(call, tool,
ctx)`` returning JSON-able data or raising ``ToolFailure``, and optionally ``retryable(tool) -> bool`` (its calls
are idempotent and may be retried on transient failures). Families are found through the ``botworker.tools``
entry-point group (``registry.py``), built-in ones included; ``dispatch.py`` runs a call through permissions,
parameter validation, retries and redaction and always returns a ``ToolResult``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .. import errors
from ..config import Config
from ..message import ToolCall
from ..store import Store

if TYPE_CHECKING:
    import requests

    from sandbox.client import SandboxClient

    from .secrets import Secrets


class ToolFailure(Exception):
    """A tool call failed for a reason worth showing to the user (not a bug).

    ``transient``: the same call may well succeed if retried (a timeout, a 503...); ``retry_after``: the seconds
    the other side asked us to wait. ``code`` is the bot_errors code the failure maps to.
    """

    def __init__(
        self,
        reason: str,
        code: str = errors.TOOL_FAILED,
        transient: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.transient = transient
        self.retry_after = retry_after


@dataclass(frozen=True)
class ToolContext:
    """What a tool may use for one message: the asking user (the only scope tools run in), the bot, the
    database, settings, and this worker's sandbox, HTTP session and the message's secrets."""

    user_id: str
    bot: dict[str, Any]
    tools: list[dict[str, Any]]
    store: Store
    cfg: Config
    sandbox: SandboxClient | None = None
    user: dict[str, Any] | None = None  # the users row (role, isActive) of user_id
    http: requests.Session | None = None  # pinned to the outbound policy (tools/outbound.py)
    secrets: Secrets | None = None


class Family(Protocol):
    """The shape of a tool family (a module or any object)."""

    TYPES: tuple[str, ...]

    def run(self, call: ToolCall, tool: dict[str, Any], ctx: ToolContext) -> Any: ...


def config_of(tool: dict[str, Any]) -> dict[str, Any]:
    """The tool's ``config`` object (an empty one when it is missing or not an object)."""
    config = tool.get("config")
    return config if isinstance(config, dict) else {}


def secret_id_of(config: dict[str, Any]) -> Any:
    """The secret a tool's config names: ``secretId``, or the platform's older ``githubSecretId``."""
    return config.get("secretId") or config.get("githubSecretId")
