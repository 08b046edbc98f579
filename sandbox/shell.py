"""Shell commands without a shell: a configured command line becomes the argv of one allowlisted program, with
only the options ``policy.SHELL_PROGRAMS`` lists for it.

- The command is split with ``shlex`` (POSIX rules) *before* any parameter is filled in, and each ``{{name}}``
  is replaced inside its own argv element only: a parameter can never add, remove or split arguments, and no
  shell ever sees it (there is no shell in the jail's allowlist, and none is ever started).
- The program must be a bare name listed in ``policy.SHELL_PROGRAMS``; the absolute path comes from that table.
- The command line is read the way the program itself reads it (GNU ``getopt_long``, see ``policy.Program``):
  every option must be listed for that program, long options spelled out in full (``getopt_long`` would accept any
  unique prefix, ``--compress-prog`` for ``--compress-program``: a prefix is refused rather than guessed), and a
  parameter may fill an operand or an option's argument but never name an option. The program then gets
  ``OPTIONS -- OPERANDS``, one short option per element with its argument apart, so a parameter value that starts
  with ``-`` is still an operand and no program-specific reading of a cluster applies; ``echo``, which has no
  ``--``, refuses a value it would read as an option.
- NUL bytes, a command and an argv over ``policy.MAX_ARGV_BYTES`` are refused (the argv while it is being filled,
  so a parameter repeated a thousand times is never built). The environment is ``policy.SHELL_ENV`` plus
  at most one secret variable whose name matches ``policy.SECRET_ENV_NAME`` and is not one programs read.
- stdin is /dev/null; stdout and stderr are captured and capped by the jail. ``executables`` names the only files
  the run may execute (the program and its ELF interpreter), which jail.py hands to Landlock.
"""

from __future__ import annotations

import os
import re
import shlex
import struct
from functools import cache
from typing import Any

from .policy import (
    ECHO,
    FORBIDDEN_ENV_NAMES,
    FORBIDDEN_ENV_PREFIXES,
    GETOPT_POSIX,
    MAX_ARGV_BYTES,
    NO_OPTIONS,
    SECRET_ENV_NAME,
    SHELL_ENV,
    SHELL_PROGRAMS,
    Program,
)

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_NONE, _REQUIRED, _OPTIONAL = "none", "required", "optional"
_ECHO_OPTION = re.compile(r"-[neE]+")


class ShellRefused(ValueError):
    """The command is not allowed; the message says why."""


def build_argv(command: str, params: dict[str, Any]) -> tuple[str, list[str]]:
    """(absolute program path, argv) for a command template and its parameters."""
    if not isinstance(command, str) or "\x00" in command:
        raise ShellRefused("command must be a string without NUL bytes")
    if len(command) > MAX_ARGV_BYTES:  # before shlex, which is slow on megabytes
        raise ShellRefused(f"command exceeds {MAX_ARGV_BYTES} characters")
    try:
        tokens = shlex.split(command, posix=True)
    except ValueError as exc:
        raise ShellRefused(f"command cannot be parsed: {exc}") from None
    if not tokens:
        raise ShellRefused("command is empty")
    name = tokens[0]
    if _PLACEHOLDER.search(name):
        raise ShellRefused("the program name cannot be a parameter")
    if name not in SHELL_PROGRAMS:
        allowed = ", ".join(sorted(SHELL_PROGRAMS))
        raise ShellRefused(f"program {name!r} is not allowed (allowed: {allowed})")
    program = SHELL_PROGRAMS[name]
    budget = [MAX_ARGV_BYTES]  # counted down while filling: a parameter used a thousand times is refused early
    filled = [_fill(token, params, budget) for token in tokens[1:]]
    if program.syntax == ECHO:
        args = _echo(tokens[1:], filled)
    else:
        options, operands = _getopt(name, program, tokens[1:], filled)
        args = options + (["--", *operands] if operands else [])
        # What the program will see must parse back to the same options: a check of the check.
        if _getopt(name, program, args, args) != (options, operands):
            raise ShellRefused(f"{name}: the command line does not parse back to the same options")
    argv = [name, *args]
    if sum(len(a.encode("utf-8", "surrogatepass")) + 1 for a in argv) > MAX_ARGV_BYTES:
        raise ShellRefused(f"arguments exceed {MAX_ARGV_BYTES} bytes")
    return program.path, argv


def _fill(token: str, params: dict[str, Any], budget: list[int]) -> str:
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
        budget[0] -= len(text)
        if budget[0] < 0:
            raise ShellRefused(f"arguments exceed {MAX_ARGV_BYTES} bytes")
        return text

    return _PLACEHOLDER.sub(value, token)


# ---- reading a command line as the program does ----------------------------------------------------------------


def _specs(program: Program) -> tuple[dict[str, str], dict[str, str]]:
    short: dict[str, str] = {}
    letters = program.short
    i = 0
    while i < len(letters):
        kind = _OPTIONAL if letters.startswith("::", i + 1) else _REQUIRED if letters.startswith(":", i + 1) else _NONE
        short[letters[i]] = kind
        i += {_NONE: 1, _REQUIRED: 2, _OPTIONAL: 3}[kind]
    long: dict[str, str] = {}
    for spec in program.long:
        if spec.endswith("[=]"):
            long[spec[:-3]] = _OPTIONAL
        elif spec.endswith("="):
            long[spec[:-1]] = _REQUIRED
        else:
            long[spec] = _NONE
    return short, long


def _first_placeholder(template: str) -> int:
    found = _PLACEHOLDER.search(template)
    return found.start() if found else len(template)


def _getopt(name: str, program: Program, templates: list[str], filled: list[str]) -> tuple[list[str], list[str]]:
    """Split a command line into (options with their arguments, operands), as ``getopt_long`` would.

    ``templates`` are the elements as written by the tool (with ``{{...}}``), ``filled`` the same elements with
    the parameters in. Whether an element is an option is decided on the template, so no value can make one.
    """
    short, long = _specs(program) if program.syntax != NO_OPTIONS else ({}, {})
    allowed = " ".join([f"-{c}" for c in short] + [f"--{n}" for n in long]) or "none"
    options: list[str] = []
    operands: list[str] = []
    i, ended = 0, False
    while i < len(templates):
        template, value = templates[i], filled[i]
        i += 1
        if ended or template == "-" or not template.startswith("-"):
            operands.append(value)
            if program.syntax == GETOPT_POSIX:
                ended = True  # getopt_long with "+" stops at the first operand
            continue
        if template == "--":
            ended = True
            continue
        named = _first_placeholder(template)
        if template.startswith("--"):
            option, eq, _ = template[2:].partition("=")
            if named < 2 + len(option) + len(eq):
                raise ShellRefused(f"{name}: a parameter cannot name an option ({template!r})")
            kind = long.get(option)
            if kind is None:
                raise ShellRefused(
                    f"{name}: option --{option} is not allowed (allowed: {allowed}; long options in full)"
                )
            if eq and kind == _NONE:
                raise ShellRefused(f"{name}: option --{option} takes no argument")
            options.append(value)
            if kind == _REQUIRED and not eq:
                i = _take_argument(name, f"--{option}", templates, filled, i, options)
            continue
        i = _short_cluster(name, template, value, named, short, allowed, (templates, filled, i), options)
    return options, operands


def _short_cluster(
    name: str,
    template: str,
    value: str,
    named: int,
    short: dict[str, str],
    allowed: str,
    rest_of_line: tuple[list[str], list[str], int],
    options: list[str],
) -> int:
    """One element of short options (``-rnk2``) into ``options``; returns the index of the next element (one
    further when a required argument was the next element)."""
    templates, filled, i = rest_of_line
    # A cluster comes out one option per element, a required argument in an element of its own ("-rnk2" ->
    # "-r", "-n", "-k", "2"): what the program sees then never depends on how it reads a cluster itself
    # (tail reads "-cf" in argv[1] as its obsolete "-c, follow" form before getopt does).
    j = 1
    while j < len(template):
        if named <= j:
            raise ShellRefused(f"{name}: a parameter cannot name an option ({template!r})")
        letter = template[j]
        kind = short.get(letter)
        if kind is None:
            raise ShellRefused(
                f"{name}: option -{letter} is not allowed (allowed: {allowed}; "
                "an operand that starts with '-' goes after '--')"
            )
        j += 1
        rest = value[j:]  # the letters before j are literal: the same in the template and the value
        if kind == _OPTIONAL:  # an optional argument can only be attached
            options.append(f"-{letter}{rest}")
            break
        options.append(f"-{letter}")
        if kind == _REQUIRED:
            if rest:
                options.append(rest)
            else:
                i = _take_argument(name, f"-{letter}", templates, filled, i, options)
            break
    return i


def _take_argument(name: str, option: str, templates: list[str], filled: list[str], i: int, out: list[str]) -> int:
    if i >= len(templates):
        raise ShellRefused(f"{name}: option {option} needs an argument")
    out.append(filled[i])
    return i + 1


def _echo(templates: list[str], filled: list[str]) -> list[str]:
    """coreutils echo: leading elements made only of -n, -e, -E are options; --help/--version alone are too."""
    if len(filled) == 1 and filled[0] in ("--help", "--version"):
        raise ShellRefused("echo: --help and --version are not allowed")
    for template, value in zip(templates, filled, strict=True):
        if not _ECHO_OPTION.fullmatch(value):
            break  # echo prints this element and everything after it
        if template != value:
            raise ShellRefused(f"echo: a parameter value that echo would read as an option ({value!r}) is refused")
    return filled


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


# ---- what a run may execute ------------------------------------------------------------------------------------

_PT_INTERP = 3


@cache
def executables(path: str) -> tuple[str, ...]:
    """The files the kernel must execute to start ``path``: the program and its ELF interpreter (the dynamic
    loader, which ``execve`` opens for execution too), as real paths. Read from the host's copy of ``/usr``, which
    the jail shows at the same place. Raises OSError when the program is not a readable ELF file."""
    real = os.path.realpath(path)
    with open(real, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] not in (1, 2) or head[5] != 1:
            raise OSError(f"{path} is not a little-endian ELF program")
        wide = head[4] == 2  # 64-bit
        phoff = struct.unpack_from("<Q" if wide else "<I", head, 32 if wide else 28)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 54 if wide else 42)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for n in range(phnum):
            entry = table[n * phentsize : (n + 1) * phentsize]
            if struct.unpack_from("<I", entry, 0)[0] != _PT_INTERP:
                continue
            # p_offset and p_filesz: 64-bit entries at 8 and 32, 32-bit ones at 4 and 16
            offset, size = struct.unpack_from("<QxxxxxxxxxxxxxxxxQ" if wide else "<IxxxxxxxxI", entry, 8 if wide else 4)
            f.seek(offset)
            interpreter = f.read(size).rstrip(b"\x00").decode()
            return real, os.path.realpath(interpreter)
    return (real,)  # a static program


def exec_job(path: str, argv: list[str], env: dict[str, str], cwd: str | None) -> Any:
    """The jail job: change to ``cwd`` (inside the jail) and replace the runner with the program."""

    def job(result_fd: int) -> None:
        if cwd:
            os.chdir(cwd)
        os.close(result_fd)
        os.execve(path, argv, env)

    return job
