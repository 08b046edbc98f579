"""``shell_command``, ``custom_script`` and ``file_operation`` tools: everything runs in this worker's sandbox process.

The worker never runs these itself: it sends the tool's configuration and the call's parameters to the sandbox
(see the ``sandbox`` package) and turns its answer into a tool result. Files live per bot (the sandbox's
``/files`` is ``SANDBOX_ROOT/files/<botId>``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from sandbox.client import SandboxError
from sandbox.policy import MAX_LIMITS, MIN_LIMITS

from .. import metrics
from ..message import ToolCall
from . import ToolContext, ToolFailure, config_of, secret_id_of
from .params import PLACEHOLDER as _PLACEHOLDER

TYPES = ("shell_command", "custom_script", "file_operation")
READ_ONLY_FILE_OPS = ("read", "list", "exists")


def run(call: ToolCall, tool: dict[str, Any], ctx: ToolContext) -> Any:
    config = config_of(tool)
    if call.type == "custom_script":
        request = _script(config, call.params)
    elif call.type == "shell_command":
        request = _shell(config, call.params)
        secret_id = secret_id_of(config)
        if secret_id:
            if ctx.secrets is None:
                raise ToolFailure("secrets are not available here")
            secret = ctx.secrets.get(secret_id)
            # One environment variable named by the secret's `key`; the sandbox checks the name against its policy.
            request["secret_env"] = {str(secret.key): secret.value}
    else:
        request = _file(config, call.params)
    request["scope"] = str(ctx.bot["id"])
    if ctx.sandbox is None:
        raise ToolFailure("this worker has no sandbox configured")
    try:
        reply = ctx.sandbox.call(request)
    except SandboxError as exc:
        metrics.sandbox_run(request["kind"], "unavailable")
        raise ToolFailure(str(exc)) from None
    killed = reply.get("killed")
    metrics.sandbox_run(request["kind"], "ok" if reply.get("ok") else "killed" if killed else "failed", killed)
    if not reply.get("ok"):
        raise ToolFailure(_failure(reply))
    return _result(call.type, reply)


def _script(config: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    source = config.get("script")
    if not isinstance(source, str) or not source.strip():
        raise ToolFailure("custom_script tool has no `script` in its config")
    return {"kind": "script", "source": source, "params": params, "limits": _limits(config)}


def _shell(config: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    command = config.get("command")
    if not isinstance(command, str) or not command.strip():
        raise ToolFailure("shell_command tool has no `command` in its config")
    request: dict[str, Any] = {"kind": "shell", "command": command, "params": params, "limits": _limits(config)}
    if config.get("cwd"):
        request["cwd"] = str(config["cwd"])
    return request


def _file(config: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    op = config.get("operation")
    if op is None and params.get("operation") in READ_ONLY_FILE_OPS:
        op = params["operation"]  # without one in the config, a caller may only choose an operation that reads
    path = config.get("path") or params.get("path")
    if not isinstance(op, str) or not isinstance(path, str):
        raise ToolFailure("file_operation tool needs an `operation` (in its config, to write) and a `path`")
    request: dict[str, Any] = {"kind": "file", "op": op, "path": _fill(path, params)}
    content = config.get("content", params.get("content"))
    if isinstance(content, str):
        request["content"] = _fill(content, params)
    return request


def _fill(template: str, params: dict[str, Any]) -> str:
    """``{{name}}`` -> the parameter's text (the sandbox validates the resulting path itself)."""

    def value(match: re.Match[str]) -> str:
        if match.group(1) not in params:
            raise ToolFailure(f"parameter {match.group(1)!r} is missing")
        return str(params[match.group(1)])

    return _PLACEHOLDER.sub(value, template)


def _limits(config: dict[str, Any]) -> dict[str, Any]:
    timeout = config.get("timeout")
    if timeout is None:
        return {}
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ToolFailure("`timeout` must be a positive number of seconds")
    # Tool configs of the platform give timeouts in milliseconds when they are large (the platform's first worker used 30000).
    seconds = timeout / 1000 if timeout > 300 else timeout
    return {"wall_seconds": min(max(float(seconds), MIN_LIMITS["wall_seconds"]), MAX_LIMITS["wall_seconds"])}


def _failure(reply: dict[str, Any]) -> str:
    error = str(reply.get("error") or "failed")
    if reply.get("line"):
        error += f" (line {reply['line']})"
    stderr = (reply.get("stderr") or "").strip()
    return f"{error}: {stderr[-500:]}" if stderr else error


def _result(kind: str, reply: dict[str, Any]) -> Any:
    if kind == "custom_script":
        out = {"result": reply.get("result"), "stdout": reply.get("stdout", "")}
    elif kind == "shell_command":
        out = {"stdout": reply.get("stdout", ""), "stderr": reply.get("stderr", ""), "exitCode": reply.get("exit_code")}
    else:
        out = {
            k: v
            for k, v in reply.items()
            if k not in ("id", "ok", "exit_code", "killed", "truncated", "duration_ms", "cpu_ms")
        }
    if reply.get("truncated"):
        out["truncated"] = True
    if reply.get("weak"):
        out["weakSandbox"] = True  # SANDBOX_ALLOW_WEAK: this ran without namespaces (development only)
    return out
