"""A request's own parts checked before anything is forked (its limits, the bot's scope, a shell run's working
directory), and a run's outcome in the reply's words (why it died, what it cost). Pure; no I/O."""

from __future__ import annotations

import json
import math
import re
import signal
from typing import Any

from . import files, jail, jail_child, policy

_SCOPE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Refused(ValueError):
    """A request the sandbox will not run; answered with its message."""


def limits(asked: Any) -> dict[str, Any]:
    """The run's limits: the defaults, lowered or raised by the request within MIN_LIMITS and MAX_LIMITS."""
    limits = dict(policy.DEFAULT_LIMITS)
    if asked is None:
        return limits
    if not isinstance(asked, dict):
        raise Refused("limits must be an object")
    for key, value in asked.items():
        if key not in limits or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Refused(f"invalid limit {key!r}")
        if math.isnan(value) or value < policy.MIN_LIMITS.get(key, 1):  # infinity is clamped just below
            raise Refused(f"limit {key!r} must be a number of at least {policy.MIN_LIMITS.get(key, 1)}")
        limits[key] = min(value, policy.MAX_LIMITS[key])
    return limits


def scope(value: Any) -> str | None:
    """The bot whose /files the run sees, as a safe directory name (or none)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _SCOPE.fullmatch(value):
        raise Refused("scope must be 1-64 letters, digits, '-' or '_'")
    return value


def cwd(value: Any, scope: str | None) -> str:
    """A shell run's working directory: /work, or a directory under its bot's /files."""
    if value in (None, "", policy.WORK_DIR):
        return policy.WORK_DIR
    if not isinstance(value, str) or scope is None:
        raise Refused("cwd must be a directory under /files (and the run needs a scope)")
    parts = files.split_path(value.removeprefix(policy.FILES_DIR))
    return "/".join([policy.FILES_DIR, *parts])


# What a run's result object may say (script.py, files.py); anything else it wrote is dropped. A run is untrusted
# even here: a key such as "id" or "lost" must never reach the reply frame, whose envelope is the sandbox's.
RESULT_KEYS = frozenset(
    {"ok", "result", "error", "line", "stdout", "truncated", "entries", "exists", "type", "content", "size", "written"}
)


def parse_result(out: jail.Outcome) -> dict[str, Any] | None:
    """The object a run wrote on its result pipe (its known keys only), or None."""
    try:
        value = json.loads(out.result)
    except ValueError:
        return None
    return {k: v for k, v in value.items() if k in RESULT_KEYS} if isinstance(value, dict) else None


def meta(out: jail.Outcome) -> dict[str, Any]:
    """What every reply about a run carries: exit code, why it was killed, truncation, time."""
    return {
        "exit_code": out.exit_code,
        "killed": out.killed or ("memory" if oom_killed(out) else None),
        "truncated": out.truncated,
        "duration_ms": out.duration_ms,
        "cpu_ms": out.cpu_ms,
    }


def oom_killed(out: jail.Outcome) -> bool:
    """The kernel killed part of the run for its memory limit, and the run died of SIGKILL."""
    return bool(out.oom_kills) and out.exit_code == 128 + signal.SIGKILL


def death(out: jail.Outcome, what: str) -> str:
    """Why a run produced no result, in words."""
    if out.killed == "wall_time":
        return f"{what} killed: wall-clock time limit"
    if out.killed == "cpu_time":
        return f"{what} killed: CPU time limit of the run"
    if oom_killed(out):
        return f"{what} killed: memory limit of the run"
    if out.exit_code == 128 + signal.SIGKILL:
        return f"{what} killed (CPU time or memory limit of a process)"
    if out.exit_code == jail_child.EXIT_SETUP_FAILED:
        tail = out.stderr.decode(errors="replace").strip().splitlines()
        return f"{what} could not start: {tail[-1] if tail else 'sandbox setup failed'}"
    if out.exit_code and out.exit_code > 128:
        return f"{what} killed by signal {out.exit_code - 128}"
    return f"{what} exited with status {out.exit_code}"
