"""Shell commands without a shell: a configured command line becomes an argv of an allowlisted program.

- The command is split with ``shlex`` (POSIX rules) *before* any parameter is filled in, and each ``{{name}}``
  is replaced inside its own argv element only: a parameter can never add, remove or split arguments, and no
  shell ever sees it (there is no shell in the jail's allowlist, and none is ever started).
- The program must be a bare name listed in ``policy.SHELL_PROGRAMS``; the absolute path comes from that table.
- NUL bytes and an argv over ``policy.MAX_ARGV_BYTES`` are refused. The environment is ``policy.SHELL_ENV`` plus
  at most one secret variable whose name matches ``policy.SECRET_ENV_NAME`` and is not a loader/PATH variable.
- stdin is /dev/null; stdout and stderr are captured and capped by the jail.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any

from .policy import (
    FORBIDDEN_ENV_NAMES,
    FORBIDDEN_ENV_PREFIXES,
    MAX_ARGV_BYTES,
    SECRET_ENV_NAME,
    SHELL_ENV,
    SHELL_PROGRAMS,
)

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class ShellRefused(ValueError):
    """The command is not allowed; the message says why."""


def build_argv(command: str, params: dict[str, Any]) -> tuple[str, list[str]]:
    """(absolute program path, argv) for a command template and its parameters."""
    if not isinstance(command, str) or "\x00" in command:
        raise ShellRefused("command must be a string without NUL bytes")
    try:
        tokens = shlex.split(command, posix=True)
    except ValueError as exc:
        raise ShellRefused(f"command cannot be parsed: {exc}") from None
    if not tokens:
        raise ShellRefused("command is empty")
    name = tokens[0]
    if name not in SHELL_PROGRAMS:
        allowed = ", ".join(sorted(SHELL_PROGRAMS))
        raise ShellRefused(f"program {name!r} is not allowed (allowed: {allowed})")
    if _PLACEHOLDER.search(name):
        raise ShellRefused("the program name cannot be a parameter")
    argv = [name] + [_fill(token, params) for token in tokens[1:]]
    if sum(len(a.encode("utf-8", "surrogatepass")) + 1 for a in argv) > MAX_ARGV_BYTES:
        raise ShellRefused(f"arguments exceed {MAX_ARGV_BYTES} bytes")
    return SHELL_PROGRAMS[name][0], argv


def _fill(token: str, params: dict[str, Any]) -> str:
    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in params:
            raise ShellRefused(f"parameter {key!r} is missing")
        v = params[key]
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ShellRefused(f"parameter {key!r} must be a string or a number")
        text = str(v)
        if "\x00" in text:
            raise ShellRefused(f"parameter {key!r} contains a NUL byte")
        return text

    return _PLACEHOLDER.sub(value, token)


def build_env(secret: dict[str, str] | None) -> dict[str, str]:
    """The fixed environment, plus the one secret variable a tool may name."""
    env = dict(SHELL_ENV)
    for key, value in (secret or {}).items():
        forbidden = key in FORBIDDEN_ENV_NAMES or key.startswith(FORBIDDEN_ENV_PREFIXES)
        if not isinstance(key, str) or not re.fullmatch(SECRET_ENV_NAME, key) or forbidden:
            raise ShellRefused(f"secret variable name {key!r} is not allowed")
        if not isinstance(value, str) or "\x00" in value:
            raise ShellRefused("secret value must be a string without NUL bytes")
        env[key] = value
    if len(secret or {}) > 1:
        raise ShellRefused("at most one secret variable")
    return env


def exec_job(path: str, argv: list[str], env: dict[str, str], cwd: str | None) -> Any:
    """The jail job: change to ``cwd`` (inside the jail) and replace the runner with the program."""

    def job(result_fd: int) -> None:
        if cwd:
            os.chdir(cwd)
        os.close(result_fd)
        os.execve(path, argv, env)

    return job
