"""Attacks through the public path: ``SandboxClient`` -> the sandbox process -> a confined run.

One client (one sandbox process) serves the whole module; it is started *after* a canary variable is put in this
process's environment and next to a host file holding a secret, and every reply is checked for both and for host
``/etc/passwd`` lines. Each ``test_cant_*`` tries one technique. After every test no process may be left in a run's
cgroup. Liveness bounds only (answered within the wall limit + 5 s), never performance. Runs in both modes (kit.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import landlock, policy
from sandbox.client import SandboxClient, SandboxError

import kit

UID, GID = kit.JAIL_UID, kit.JAIL_GID
CANARY = f"sandbox-canary-{uuid.uuid4().hex}"
HOST_SECRET = f"host-secret-{uuid.uuid4().hex}"
SLACK = 5.0  # seconds a reply may take beyond its wall limit (start-up, teardown, pipes)
JAIL_PASSWD = policy.ETC_FILES["passwd"].format(uid=kit.jail_identity()[0], gid=kit.jail_identity()[1])
# Lines of the host's passwd that the jail's synthetic one does not have (e.g. "root:x:0:0:root:/root:/bin/bash").
HOST_PASSWD_LINES = [line for line in Path("/etc/passwd").read_text().splitlines() if line and line not in JAIL_PASSWD][
    :5
]
MARKER = "\n[... output truncated ...]"


# ---- fixtures and helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sandbox-attacks-"))
    path.chmod(0o755)
    (path / "host-secret.txt").write_text(HOST_SECRET)  # a host file right next to the sandbox's own state
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def client(root: Path) -> Iterator[SandboxClient]:
    previous = os.environ.get("SANDBOX_CANARY")
    os.environ["SANDBOX_CANARY"] = CANARY  # set before the sandbox process starts: it must never see it
    sandbox = SandboxClient(root, UID, GID)
    try:
        hello = sandbox.start()
        assert hello["ok"] and not hello["weak"], hello
        yield sandbox
    finally:
        sandbox.close()
        if previous is None:
            os.environ.pop("SANDBOX_CANARY", None)
        else:
            os.environ["SANDBOX_CANARY"] = previous


@pytest.fixture(autouse=True)
def _nothing_left_behind(client: SandboxClient) -> Iterator[None]:
    yield
    left = kit.leftovers()
    if left:
        client.close()  # its runs die with it (parent-death signals), and the next test starts a fresh one
        pytest.fail(f"processes of a run outlived it: {left}")


def _assert_no_leak(reply: dict[str, Any]) -> None:
    text = json.dumps(reply, ensure_ascii=False)
    assert CANARY not in text, "the worker's environment leaked into a reply"
    assert HOST_SECRET not in text, "a host file leaked into a reply"
    for line in HOST_PASSWD_LINES:
        assert line not in text, f"host /etc/passwd leaked into a reply: {line!r}"


def ask(client: SandboxClient, request: dict[str, Any]) -> dict[str, Any]:
    """One request through the client: answered within its wall limit + SLACK, and nothing of the host in it."""
    limits = request.get("limits") or {}
    wall = min(
        float(limits.get("wall_seconds", policy.DEFAULT_LIMITS["wall_seconds"])), policy.MAX_LIMITS["wall_seconds"]
    )
    started = time.monotonic()
    reply = client.call(request)
    elapsed = time.monotonic() - started
    assert elapsed < wall + SLACK, f"answered after {elapsed:.1f}s with a {wall}s wall limit"
    _assert_no_leak(reply)
    return reply


def script(client: SandboxClient, source: str, params: dict[str, Any] | None = None, **limits: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"kind": "script", "source": source, "params": params or {}}
    if limits:
        request["limits"] = limits
    return ask(client, request)


def shell(client: SandboxClient, command: str, params: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return ask(client, {"kind": "shell", "command": command, "params": params or {}, **extra})


def file_op(client: SandboxClient, op: str, path: Any, scope: Any = "bot", **extra: Any) -> dict[str, Any]:
    return ask(client, {"kind": "file", "op": op, "path": path, "scope": scope, **extra})


def refused(reply: dict[str, Any]) -> bool:
    """Refused by the sandbox process before anything was forked (no run metadata in the reply)."""
    return reply["ok"] is False and bool(reply.get("error")) and "exit_code" not in reply


def still_serving(client: SandboxClient) -> None:
    reply = script(client, "result = 6 * 7")
    assert reply["ok"] and reply["result"] == 42, reply


# ---- the process boundary ----------------------------------------------------------------------------------


def test_cant_find_the_worker_environment_in_the_sandbox_process(client: SandboxClient) -> None:
    assert client.proc is not None
    assert "SANDBOX_CANARY" not in Path(f"/proc/{client.proc.pid}/cmdline").read_text()
    if not kit.ROOT_MODE:
        # The sandbox process is non-dumpable: even its own uid (the worker's) cannot read its environment, memory
        # or descriptors. What it was given is checked by root's pass.
        for what in ("environ", "mem", "fd"):
            with pytest.raises(PermissionError):
                os.listdir(f"/proc/{client.proc.pid}/fd") if what == "fd" else Path(
                    f"/proc/{client.proc.pid}/{what}"
                ).read_bytes()
        return
    environ = Path(f"/proc/{client.proc.pid}/environ").read_bytes()
    assert CANARY.encode() not in environ and b"SANDBOX_CANARY" not in environ
    fd_dir = f"/proc/{client.proc.pid}/fd"
    # No inherited descriptors but its two pipes and stderr (the worker's own, shared on purpose for log lines);
    # beyond those, two pipes to each of its lanes (lanes.py), and the cgroup.procs files of its own run groups
    # (opened by itself, close-on-exec).
    extra = [os.readlink(f"{fd_dir}/{fd}") for fd in os.listdir(fd_dir) if int(fd) > 2]
    lanes = client.call({"kind": "ping"})["lanes"]
    assert len([p for p in extra if p.startswith("pipe:")]) == 2 * len(lanes), extra
    assert all(f"/sandbox-{client.proc.pid}/run-" in p and p.endswith("/cgroup.procs") for p in extra
               if not p.startswith("pipe:")), extra  # fmt: skip
    worker_pipes = {os.readlink(f"{fd_dir}/{fd}") for fd in (0, 1)}
    for lane in lanes:  # a lane has its own two pipes for 0 and 1, none of the worker's, none of another lane's
        held = {fd: os.readlink(f"/proc/{lane}/fd/{fd}") for fd in os.listdir(f"/proc/{lane}/fd")}
        assert not worker_pipes & set(held.values()), held
        assert {"0", "1"} <= {fd for fd, p in held.items() if p.startswith("pipe:")} <= {"0", "1", "2"}, held
    assert os.readlink(f"{fd_dir}/0").startswith("pipe:") and os.readlink(f"{fd_dir}/1").startswith("pipe:")


# ---- scripts: the RestrictedPython escapes -----------------------------------------------------------------

SCRIPT_ESCAPES = {
    # the subclasses walk, written out and with computed names
    "subclasses_walk": "result = [c.__name__ for c in ().__class__.__base__.__subclasses__()]",
    "subclasses_computed": "o = getattr(getattr((), '__cla' + 'ss__'), '__ba' + 'se__')\nresult = getattr(o, '__subcl' + 'asses__')()",
    "getattr_computed_dunder": "n = '_' * 2 + 'class' + '_' * 2\nresult = getattr((), n)",
    "getattr_function_globals": "def f():\n    pass\nresult = getattr(f, '_' * 2 + 'globals' + '_' * 2)['__builtins__']",
    "getattr_str_subclass_name": "class S(str):\n    pass\nresult = getattr((), S('__class__'))",
    "getattr_reduce_ex": "result = getattr((), '__reduce' + '_ex__')(2)",
    "guarded_type_internals": "result = getattr(dict, '_ty' + 'pe')",
    "lambda_default_getattr": "f = lambda g=getattr: g((), '__class__')\nresult = f()",
    "sorted_key_getattr": "result = sorted(['__class__'], key=lambda n: getattr((), n))",
    "map_getattr": "result = list(map(getattr, [()], ['__class__']))",
    # format strings walking attributes
    "format_attribute": "result = '{0.__class__.__base__.__subclasses__}'.format(())",
    "format_map": "result = '{x.__class__}'.format_map({'x': ()})",
    "format_unbound": "result = str.format('{0.__class__}', ())",
    "format_via_getattr": "f = getattr('{0.__class__}', 'for' + 'mat')\nresult = f(())",
    "format_via_getattr_on_str": "f = getattr(str, 'format')\nresult = f('{0.__class__}', ())",
    "format_generator_frame": "def g():\n    yield 1\nresult = '{0.gi_frame.f_globals}'.format(g())",
    "fstring_attribute": "x = ()\nresult = f'{x.__class__}'",
    "string_formatter": "import string\nresult = string.Formatter().vformat('{0.__class__}', [()], {})",
    # frames of generators, coroutines, async generators and tracebacks
    "generator_frame": "def g():\n    yield 1\nresult = g().gi_frame.f_back.f_globals",
    "generator_frame_getattr": "def g():\n    yield 1\nresult = getattr(getattr(g(), 'gi_' + 'frame'), 'f_globals')",
    "generator_code": "def g():\n    yield 1\nresult = getattr(g(), 'gi_code')",
    "generator_yieldfrom": "def g():\n    yield 1\ndef h():\n    yield from g()\nx = h()\nnext(x)\nresult = getattr(x, 'gi_yieldfrom')",
    "coroutine_frame": "async def c():\n    pass\nresult = c().cr_frame.f_globals",
    "async_generator_frame": "async def g():\n    yield 1\nresult = g().ag_frame.f_globals",
    "traceback_frame": "try:\n    1 / 0\nexcept Exception as e:\n    result = e.__traceback__.tb_frame.f_globals",
    "traceback_getattr": "try:\n    1 / 0\nexcept Exception as e:\n    tb = getattr(e, '__trace' + 'back__')\n    result = getattr(getattr(tb, 'tb_frame'), 'f_globals')",
    "exception_context": "try:\n    1 / 0\nexcept Exception as e:\n    result = getattr(e, '__con' + 'text__')",
    "attribute_error_obj": "try:\n    params.nope\nexcept AttributeError as e:\n    result = e.obj",
    "attribute_error_obj_getattr": "try:\n    params.nope\nexcept AttributeError as e:\n    result = getattr(e, 'o' + 'bj')",
    # real modules behind the proxies
    "json_codecs": "import json\nresult = json.codecs.sys.modules['os'].environ",
    "re_enum": "import re\nresult = re.enum.sys.modules",
    "datetime_sys": "import datetime\nresult = datetime.sys.modules",
    "statistics_sys": "import statistics\nresult = statistics.sys.modules",
    "collections_sys": "import collections\nresult = collections.sys.modules",
    "random_os": "import random\nresult = getattr(random, '_' + 'os').environ",
    "functools_partial": "import functools\nresult = functools.partial",
    "proxy_getattr_dunder": "import math\nresult = getattr(math, '__getattr__')",
    # imports
    "from_json_import_decoder": "from json import decoder\nresult = decoder.scanstring",
    "from_collections_import_abc": "from collections import abc",
    "import_os_path": "import os.path\nresult = os.path.exists('/')",
    "import_json_decoder": "import json.decoder",
    "dunder_import": "result = __import__('os').environ",
    "builtins_import": "result = __builtins__['__import__']('os')",
    "import_builtins": "import builtins\nresult = builtins.open('/etc/passwd').read()",
    "import_importlib": "import importlib\nresult = importlib.import_module('os')",
    "import_os": "import os\nresult = dict(os.environ)",
    "import_sys": "import sys\nresult = list(sys.modules)",
    "import_ctypes": "import ctypes",
    "import_socket": "import socket",
    "operator_attrgetter": "import operator\nresult = operator.attrgetter('__class__')(())",
    "from_operator_attrgetter": "from operator import attrgetter\nresult = attrgetter('__class__')(())",
    # builtins that are not there
    "open": "result = open('/etc/passwd').read()",
    "eval": "result = eval('1')",
    "exec": "exec('result = 1')",
    "compile": "result = compile('1', 'x', 'eval')",
    "globals": "result = list(globals())",
    "vars": "result = vars()",
    "type": "result = type(())",
    "print_to_a_file": "print('x', file=params)",
    "json_object_hook": "import json\nresult = json.loads('{}', object_hook=print)",
    # plain-Python methods of real classes, called unbound with a foreign self (Counter.copy(int) is `type`)
    "counter_copy_unbound": "import collections\nresult = str(collections.Counter.copy(int))",
    "counter_copy_computed": "import collections\nresult = str(getattr(collections.Counter, 'co' + 'py')(int))",
    "counter_subclass": "import collections\nclass C(collections.Counter):\n    pass\nresult = str(C.copy(int))",
    "counter_most_common_unbound": "import collections\nresult = collections.Counter.most_common(params)",
}


@pytest.mark.parametrize("source", list(SCRIPT_ESCAPES.values()), ids=list(SCRIPT_ESCAPES))
def test_cant_escape_a_script(client: SandboxClient, source: str) -> None:
    reply = script(client, source, {"a": 1})
    assert reply["ok"] is False and "result" not in reply, reply
    assert reply["error"].startswith(("compile_error: ", "runtime_error: ")), reply


# ---- scripts: resources ------------------------------------------------------------------------------------


def test_cant_loop_past_the_cpu_limit(client: SandboxClient) -> None:
    reply = script(client, "while True:\n    pass", cpu_seconds=1, wall_seconds=10)
    # The run's CPU budget (its cgroup, watched by the sandbox) or the process's own RLIMIT_CPU, whichever is first.
    assert reply["ok"] is False and (reply["killed"] == "cpu_time" or reply["exit_code"] == 128 + signal.SIGKILL)
    assert "killed" in reply["error"], reply
    still_serving(client)


@pytest.mark.parametrize("source", ["x = 'x' * 10 ** 10", "x = [0] * 10 ** 9", "x = 'y' * (300 << 20)"])
def test_cant_allocate_past_the_memory_limit(client: SandboxClient, source: str) -> None:
    reply = script(client, source)
    assert reply["ok"] is False and "MemoryError" in reply["error"], reply
    still_serving(client)


def test_cant_recurse_the_runner_down(client: SandboxClient) -> None:
    reply = script(client, "def f(n):\n    return f(n + 1)\nresult = f(0)")
    assert reply["ok"] is False and "RecursionError" in reply["error"] and reply["exit_code"] == 0, reply


def test_cant_flood_the_output_of_a_script(client: SandboxClient) -> None:
    reply = script(client, "for i in range(100000):\n    print('x' * 99)", output_bytes=4096)
    assert reply["ok"] is True, reply
    assert len(reply["stdout"]) <= 4096 + len(MARKER) and reply["stdout"].endswith(MARKER)


def test_cant_hide_a_truncated_print_flood(client: SandboxClient) -> None:
    reply = script(client, "for i in range(100000):\n    print('x' * 99)", output_bytes=4096)
    assert reply["stdout"].endswith(MARKER) and reply["truncated"] is True, {**reply, "stdout": "..."}


@pytest.mark.parametrize("source", ["result = 'x' * 10 ** 6", "result = [[0] * 1000] * 1000", "result = {1: 2}"])
def test_cant_return_a_huge_or_foreign_result(client: SandboxClient, source: str) -> None:
    reply = script(client, source)
    assert reply["ok"] is False and reply["error"].startswith("result_error: ") and "result" not in reply, reply


def test_cant_outlast_the_wall_clock_with_a_high_cpu_limit(client: SandboxClient) -> None:
    reply = script(client, "while True:\n    pass", cpu_seconds=30, wall_seconds=1)
    assert reply["ok"] is False and reply["killed"] == "wall_time" and "wall-clock" in reply["error"], reply
    still_serving(client)


def test_cant_raise_limits_past_the_maximum(client: SandboxClient) -> None:
    reply = script(client, "while True:\n    pass", cpu_seconds=10**9, wall_seconds=1)
    assert reply["killed"] == "wall_time", reply
    for bad in ({"nope": 1}, {"wall_seconds": -1}, {"wall_seconds": 0}, {"cpu_seconds": True}, {"memory_bytes": "1"}):
        assert refused(ask(client, {"kind": "script", "source": "result = 1", "params": {}, "limits": bad})), bad


def test_cant_crash_the_sandbox_with_unencodable_text(client: SandboxClient) -> None:
    """A lone surrogate (valid in a JSON string escape, not in UTF-8) in params or content."""
    assert client.proc is not None
    pid = client.proc.pid
    for request in (
        {"kind": "script", "source": "result = params['a']", "params": {"a": "\ud800"}},
        {"kind": "file", "op": "write", "path": "s.txt", "content": "\udcff", "scope": "bot"},
        {"kind": "shell", "command": "echo {{a}}", "params": {"a": "\udcff"}},
    ):
        try:
            reply = ask(client, request)
        except (SandboxError, ValueError):  # the client refuses to encode it; nothing reached the sandbox
            continue
        assert reply["ok"] is False or "\ud800" not in json.dumps(reply), reply
    assert client.proc is not None and client.proc.pid == pid
    still_serving(client)


# ---- shell: argv injection -----------------------------------------------------------------------------------

INJECTED_VALUES = [
    "x; cat /etc/passwd",
    "$(cat /etc/passwd)",
    "`cat /etc/passwd`",
    "a | cat /etc/passwd",
    "a && cat /etc/passwd",
    "a\ncat /etc/passwd",
    "*",
    "/etc/*",
    "--help",
    "-v",
    "$HOME ${PATH}",
    "a'b\"c\\",
    "> /files/x",
    "%s%n%x",
]


@pytest.mark.parametrize("value", INJECTED_VALUES)
def test_cant_inject_through_a_parameter(client: SandboxClient, value: str) -> None:
    reply = shell(client, "printf %s {{a}}", {"a": value})
    assert reply["ok"] is True and reply["stdout"] == value, reply


@pytest.mark.parametrize(
    ("command", "stdout"),
    [
        ("echo hi; cat /etc/passwd", "hi; cat /etc/passwd\n"),
        ("echo $(cat /etc/passwd)", "$(cat /etc/passwd)\n"),
        ("echo `id`", "`id`\n"),
        ("echo a | cat /etc/passwd", "a | cat /etc/passwd\n"),
        ("echo a && cat /etc/passwd", "a && cat /etc/passwd\n"),
        ("echo a\ncat /etc/passwd", "a cat /etc/passwd\n"),
        ("echo $HOME $PATH", "$HOME $PATH\n"),
        ("echo *", "*\n"),
        ("echo a > /work/x", "a > /work/x\n"),
    ],
)
def test_cant_inject_through_the_command_line(client: SandboxClient, command: str, stdout: str) -> None:
    reply = shell(client, command)
    assert reply["ok"] is True and reply["stdout"] == stdout, reply


def test_cant_see_host_files_through_an_option_like_parameter(client: SandboxClient) -> None:
    reply = shell(client, "cat {{f}}", {"f": "--help"})  # a parameter is an operand: the file "--help"
    assert reply["ok"] is False and "--help: No such file or directory" in reply["stderr"], reply
    reply = shell(client, "cat {{f}}", {"f": "/etc/passwd"})
    assert reply["ok"] is True and reply["stdout"] == JAIL_PASSWD, reply  # the jail's own two users


HOST_PATHS = ["/etc/shadow", "/proc/self/environ", "/proc/1/environ", "/root/.bashrc", "/home", "/var/log/syslog",
              "/sys/kernel/hostname", "/etc/hostname/../shadow", "{root}/host-secret.txt"]  # fmt: skip


@pytest.mark.parametrize("path", HOST_PATHS)
@pytest.mark.parametrize("command", ["cat {{f}}", "date -f {{f}}", "wc --files0-from={{f}}", "base64 {{f}}"])
def test_cant_read_host_files_with_a_program(client: SandboxClient, root: Path, command: str, path: str) -> None:
    reply = shell(client, command, {"f": path.format(root=root)})
    assert reply["ok"] is False and reply["stdout"] == "", reply
    assert "No such file or directory" in reply["stderr"] or "Not a directory" in reply["stderr"], reply


def test_cant_grep_the_host_file_system(client: SandboxClient) -> None:
    reply = shell(client, "grep -r root /")
    assert reply["stdout"] == "", reply  # Landlock: the jail's root cannot even be listed
    reply = shell(client, "grep -r root /etc")
    lines = reply["stdout"].splitlines()
    assert lines and all(line.startswith(("/etc/passwd:", "/etc/group:")) for line in lines), reply


def test_cant_list_the_host_root(client: SandboxClient) -> None:
    reply = shell(client, "ls -la /")
    names = {line.split()[-1] for line in reply["stdout"].splitlines()[1:] if line.split()}
    jail = {".", "..", "usr", "bin", "lib", "lib64", "sbin", "etc", "dev", "work", "tmp"}
    assert names <= jail, names
    reply = shell(client, "ls /etc /dev")
    assert reply["ok"] and set(reply["stdout"].split()) == {"/etc:", "/dev:", *policy.ETC_FILES,
                                                             *(d.rsplit("/", 1)[1] for d in policy.DEVICES)}  # fmt: skip


def test_cant_set_the_clock(client: SandboxClient) -> None:
    assert refused(shell(client, "date -s {{d}}", {"d": "2000-01-01"}))  # not an allowed option
    reply = shell(client, "date {{d}}", {"d": "010100002000"})  # an operand that asks to set the clock
    assert reply["ok"] is False and "Operation not permitted" in reply["stderr"], reply
    assert time.time() > 1_700_000_000


def test_cant_flood_the_output_of_a_program(client: SandboxClient) -> None:
    reply = shell(client, "cat /dev/zero", limits={"output_bytes": 4096, "wall_seconds": 1.5})
    assert reply["ok"] is False and reply["truncated"] is True and reply["killed"] == "wall_time", {
        **reply,
        "stdout": "...",
    }
    assert len(reply["stdout"]) <= 4096
    reply = shell(client, "head -c 100000000 /dev/urandom", limits={"output_bytes": 4096})
    assert reply["truncated"] is True and len(reply["stdout"].encode("utf-8", "surrogatepass")) <= 3 * 4096
    still_serving(client)


def test_cant_block_forever(client: SandboxClient) -> None:
    reply = shell(client, "tail -c 1 /dev/zero", limits={"wall_seconds": 1})  # reads an endless file
    assert reply["ok"] is False and reply["killed"] == "wall_time", reply
    still_serving(client)


def test_cant_exhaust_memory_with_a_program(client: SandboxClient) -> None:
    reply = shell(client, "sort /dev/zero", limits={"wall_seconds": 5})
    assert reply["ok"] is False, reply  # "memory exhausted" (address-space limit) or the wall clock, never the host


@pytest.mark.parametrize(
    "command",
    ["sh -c id", "bash -c id", "python3 -c 1", "env", "find / -name x", "xargs echo", "awk 1", "sed p",
     "/usr/bin/echo hi", "./echo hi", "../usr/bin/echo hi", "usr/bin/echo hi", "ECHO hi", "'echo hi'", "timeout 1 echo",
     "nohup echo", "setsid echo", "busybox echo", "perl -e 1", "tee /files/x", "cp /etc/passwd /work/x",
     "ln -s / /work/x", "mount", "{{p}} hi", "", "   "],
)  # fmt: skip
def test_cant_run_a_program_off_the_allowlist(client: SandboxClient, command: str) -> None:
    assert refused(shell(client, command, {"p": "echo"}))


@pytest.mark.parametrize(
    "name",
    ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "LD_ANYTHING", "PATH", "HOME", "IFS", "PYTHONPATH", "ld_preload",
     "path", "Path", "1ABC", "A-B", "A B", "", "A" * 65, "A=B"],
)  # fmt: skip
def test_cant_inject_an_environment_variable(client: SandboxClient, name: str) -> None:
    assert refused(shell(client, "echo hi", secret_env={name: "/files/evil.so"}))


def test_cant_smuggle_more_than_one_or_a_bad_secret(client: SandboxClient) -> None:
    assert refused(shell(client, "echo hi", secret_env={"A": "1", "B": "2"}))
    assert refused(shell(client, "echo hi", secret_env={"A": "x\x00y"}))
    assert refused(shell(client, "echo hi", secret_env={"A": 1}))
    for name in ("BASH_ENV", "GCONV_PATH", "LOCPATH", "GLIBC_TUNABLES", "LC_ALL", "TZ", "LD_PRELOAD", "path"):
        assert refused(shell(client, "echo hi", secret_env={name: "/files/evil"})), name
    reply = shell(client, "echo hi", secret_env={"API_TOKEN": "t0k3n"})
    assert reply["ok"] and reply["stdout"] == "hi\n", reply


@pytest.mark.parametrize("where", ["/work", "/tmp"])
def test_cant_leave_state_for_the_next_run(client: SandboxClient, where: str) -> None:
    reply = shell(client, "sort -o {{f}} /etc/passwd", {"f": f"{where}/left"})
    assert reply["ok"], reply
    reply = shell(client, "cat {{f}}", {"f": f"{where}/left"})
    assert reply["ok"] is False and "No such file" in reply["stderr"], reply


@pytest.mark.parametrize(
    "target", ["/etc/passwd", "/etc/new", "/usr/new", "/new", "/dev/new", "/bin/new", "/files/new"]
)
def test_cant_write_outside_the_writable_mounts(client: SandboxClient, target: str) -> None:
    reply = shell(client, "sort -o {{f}} /etc/group", {"f": target})
    assert reply["ok"] is False, reply
    reply = shell(client, "cat {{f}}", {"f": target})
    assert "sandbox:x:" not in reply["stdout"] or target == "/etc/passwd", reply
    assert shell(client, "cat /etc/passwd")["stdout"] == JAIL_PASSWD


@pytest.mark.parametrize("cwd", ["/files/../..", "/files/a/../../..", "..", "x\x00y", "a" * 5000, 7])
def test_cant_escape_through_the_working_directory(client: SandboxClient, cwd: Any) -> None:
    assert refused(shell(client, "ls", cwd=cwd, scope="bot"))


def test_cant_use_a_working_directory_without_a_scope_or_outside_files(client: SandboxClient) -> None:
    assert refused(shell(client, "ls", cwd="/files"))
    reply = shell(client, "ls", cwd="/etc", scope="bot")  # means /files/etc: not there
    assert reply["ok"] is False and "/files/etc" in reply["error"], reply


def test_cant_crash_the_sandbox_with_a_reply_over_the_frame_cap(client: SandboxClient) -> None:
    cap = int(policy.MAX_LIMITS["output_bytes"])
    # 17 valid (empty) lines print the 65000-byte format each (control characters: 6 bytes each in JSON) -> stdout
    # fills its cap; then one invalid line of backslashes comes back doubled in date's error -> stderr fills its cap.
    content = "\n" * 17 + "\\" * (cap - 18) + "\n"
    assert file_op(client, "write", "dates.txt", "flood", content=content)["ok"]
    assert client.proc is not None
    pid = client.proc.pid
    reply = shell(client, "date -f /files/dates.txt {{fmt}}", {"fmt": "+" + "\x01" * 65000}, scope="flood",
                  limits={"output_bytes": cap})  # fmt: skip
    assert reply["truncated"] is True and client.proc is not None and client.proc.pid == pid


# ---- files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["..", "../x", "a/../../x", "/../x", "./../x", "a/./../../x", "x/..", "x\x00y", "a" * 5000]
)
@pytest.mark.parametrize("op", ["read", "write", "list", "exists"])
def test_cant_traverse_out_of_files(client: SandboxClient, op: str, path: str) -> None:
    assert refused(file_op(client, op, path, content="x"))


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "/etc/shadow",
        "/proc/self/environ",
        "/dev/zero",
        "dev/zero",
        "/usr/bin/ls",
        "{root}/host-secret.txt",
    ],
)
def test_cant_read_outside_files_with_an_absolute_path(client: SandboxClient, root: Path, path: str) -> None:
    reply = file_op(client, "read", path.format(root=root))
    assert reply["ok"] is False and "no such file" in reply["error"] and "content" not in reply, reply


def test_cant_read_a_directory_or_a_too_long_name(client: SandboxClient) -> None:
    assert file_op(client, "write", "dir/inner.txt", content="x")["ok"]
    reply = file_op(client, "read", "dir")
    assert reply["ok"] is False and "not a regular file" in reply["error"], reply
    reply = file_op(client, "read", "a" * 300)
    assert reply["ok"] is False and "too long" in reply["error"].lower(), reply
    reply = file_op(client, "write", "dir/inner.txt/deeper", content="x")
    assert reply["ok"] is False and "not a directory" in reply["error"], reply
    reply = file_op(client, "write", "dir", content="x")
    assert reply["ok"] is False, reply


def test_cant_write_more_than_the_cap(client: SandboxClient, root: Path) -> None:
    big = "x" * (policy.MAX_FILE_BYTES + 1)
    assert refused(file_op(client, "write", "big.txt", content=big))
    assert not (root / "files" / "bot" / "big.txt").exists()
    reply = file_op(client, "write", "big.txt", content=big[:-1])
    assert reply["ok"] and reply["written"] == policy.MAX_FILE_BYTES, reply
    host = root / "files" / "bot" / "big.txt"
    assert host.stat().st_size == policy.MAX_FILE_BYTES and host.stat().st_uid == kit.host_owner()
    reply = file_op(
        client, "write", "wide.txt", content="é" * (policy.MAX_FILE_BYTES // 2 + 1)
    )  # bytes, not characters
    assert refused(reply)


def test_cant_list_more_than_the_scope(client: SandboxClient) -> None:
    assert file_op(client, "write", "listed.txt", "lister", content="x")["ok"]
    reply = file_op(client, "list", "/", "lister")
    assert reply["ok"] and [e["name"] for e in reply["entries"]] == ["listed.txt"], reply


@pytest.mark.parametrize(
    "scope", ["../x", "a/b", "/etc", "", ".", "..", "a b", "a" * 65, "é", "x\x00", 123, ["a"], {"a": 1}, True]
)
def test_cant_name_a_scope_outside_files(client: SandboxClient, root: Path, scope: Any) -> None:
    before = sorted(p.name for p in root.iterdir()), sorted(p.name for p in (root / "files").iterdir())
    assert refused(file_op(client, "write", "x.txt", scope, content="x"))
    assert refused(shell(client, "echo hi", scope=scope))
    assert refused(ask(client, {"kind": "script", "source": "result = 1", "params": {}, "scope": scope}))
    after = sorted(p.name for p in root.iterdir()), sorted(p.name for p in (root / "files").iterdir())
    assert after == before


def test_cant_use_file_operations_without_a_scope(client: SandboxClient) -> None:
    assert refused(ask(client, {"kind": "file", "op": "list", "path": "/"}))


@pytest.mark.parametrize("op", ["delete", "chmod", "symlink", "", None, ["read"]])
def test_cant_use_an_unknown_file_operation(client: SandboxClient, op: Any) -> None:
    assert refused(file_op(client, op, "x.txt", content="x"))


@pytest.mark.parametrize("content", [123, None, ["x"], {"a": 1}])
def test_cant_write_content_that_is_not_text(client: SandboxClient, content: Any) -> None:
    assert refused(file_op(client, "write", "c.txt", content=content))


def test_cant_see_another_scopes_files(client: SandboxClient) -> None:
    assert file_op(client, "write", "mine.txt", "alice", content="alice's")["ok"]
    assert file_op(client, "read", "mine.txt", "alice")["content"] == "alice's"
    reply = file_op(client, "read", "mine.txt", "bob")
    assert reply["ok"] is False and "content" not in reply, reply
    assert file_op(client, "exists", "mine.txt", "bob")["exists"] is False
    assert all(e["name"] != "mine.txt" for e in file_op(client, "list", "/", "bob")["entries"])
    reply = shell(client, "cat /files/mine.txt", scope="bob")
    assert reply["ok"] is False and "No such file" in reply["stderr"], reply
    reply = shell(client, "cat /files/mine.txt")  # no scope: no /files at all
    assert reply["ok"] is False and "No such file" in reply["stderr"], reply
    reply = shell(client, "cat mine.txt", cwd="/files", scope="alice")
    assert reply["ok"] and reply["stdout"] == "alice's", reply


def test_cant_reach_special_files_through_files(client: SandboxClient) -> None:
    assert file_op(client, "write", "zero", content="not a device")["ok"]
    reply = file_op(client, "read", "zero")
    assert reply["ok"] and reply["content"] == "not a device" and reply["size"] == 12, reply
    for path in ("/dev/zero", "dev/urandom", "/proc/self/mem"):
        reply = file_op(client, "exists", path)
        assert reply.get("exists") is False or (reply["ok"] is False and "no such file" in reply["error"]), reply


# ---- an allowlisted program running another (the audit's escape) --------------------------------------------

PAYLOAD = "\n".join(["# padding " + "x" * 60] * 3000 + ["id >&2", ""])  # dash reads it: comments, then id
COMPRESS_ESCAPES = [
    # the audit's command, and the ways getopt_long would also read it
    ("sort -S 64K -T /tmp --compress-program=dash -o /tmp/out /files/p.sh", {}),
    ("sort --compress-program=dash /files/p.sh", {}),
    ("sort --compress-prog=dash /files/p.sh", {}),  # a unique prefix
    ("sort --com dash /files/p.sh", {}),  # a prefix and a separate argument
    ("sort --compress-program dash /files/p.sh", {}),
    ("sort /files/p.sh --compress-program=dash", {}),  # after the operand: getopt permutes
    ("sort -- /files/p.sh --compress-program=dash", {}),  # after "--": an operand (a missing file), harmless
    ("sort {{opt}} /files/p.sh", {"opt": "--compress-program=dash"}),  # a parameter as an option
    ("sort {{opt}} /files/p.sh", {"opt": "--com=dash"}),
    ("sort -k1 {{opt}} /files/p.sh", {"opt": "--compress-program=/usr/bin/dash"}),
    ("sort --{{o}}=dash /files/p.sh", {"o": "compress-program"}),
    ("sort -{{o}} /files/p.sh", {"o": "-compress-program=dash"}),
    ("sort --files0-from={{f}}", {"f": "/files/p.sh"}),
    ("sort --random-source=/files/p.sh /files/p.sh", {}),
    ("sort --parallel=64 /files/p.sh", {}),
    ("tail -f /files/p.sh", {}),
    ("tail --follow=name --retry /files/p.sh", {}),
    ("date --set=2000-01-01", {}),
    ("grep -X perl x /files/p.sh", {}),
    ("echo {{a}}", {"a": "--help"}),
    ("echo -n {{a}} x", {"a": "-e"}),
]


@pytest.mark.parametrize(("command", "params"), COMPRESS_ESCAPES, ids=[c for c, _ in COMPRESS_ESCAPES])
def test_cant_run_another_program_through_an_allowed_one(
    client: SandboxClient, command: str, params: dict[str, Any]
) -> None:
    assert file_op(client, "write", "p.sh", "escape", content=PAYLOAD)["ok"]
    reply = shell(client, command, params, scope="escape", limits={"wall_seconds": 3})
    assert refused(reply) or (reply["ok"] is False and "uid=" not in reply["stdout"]), reply
    assert "uid=" not in reply.get("stdout", "") + reply.get("stderr", ""), "another program ran"


def test_cant_take_a_parameter_value_for_an_option(client: SandboxClient) -> None:
    for value in ("--help", "-n", "--compress-program=dash", "-", "--"):
        reply = shell(client, "printf %s {{a}}", {"a": value})
        assert reply["ok"] and reply["stdout"] == value, reply
        reply = shell(client, "head -c 100 {{f}}", {"f": value})  # an operand: a file of that name, not an option
        assert value == "-" or "No such file or directory" in reply["stderr"], reply


# ---- one budget per run, and the disk ----------------------------------------------------------------------


def test_cant_write_the_bots_files_from_a_shell_command(client: SandboxClient, root: Path) -> None:
    for command in ("sort -o /files/out /etc/passwd", "uniq /etc/passwd /files/out"):
        reply = shell(client, command, scope="writer")
        assert reply["ok"] is False and "Read-only file system" in reply["stderr"], reply
    assert not (root / "files" / "writer" / "out").exists()


def test_cant_stash_a_secret_in_files_for_a_later_read(client: SandboxClient, root: Path) -> None:
    reply = shell(client, "sort -o /files/stash /etc/passwd", scope="stasher", secret_env={"API_TOKEN": "t0k3n"})
    assert reply["ok"] is False and "Read-only file system" in reply["stderr"], reply
    assert file_op(client, "exists", "stash", "stasher")["exists"] is False


def test_cant_fill_the_disk_through_work(client: SandboxClient, root: Path) -> None:
    before = shutil.disk_usage(root).used
    reply = shell(client, "sort -o /work/big /dev/zero", limits={"wall_seconds": 3})  # endless input
    assert reply["ok"] is False, reply
    work = policy.DEFAULT_LIMITS["work_bytes"]
    assert shutil.disk_usage(root).used - before < work, "a run wrote to the host's disk"
    reply = shell(client, "head -c 50000000 -- /dev/zero", limits={"output_bytes": 16})
    assert reply["truncated"], reply  # (stdout is capped, not written anywhere)
    assert not any((root / "runs").iterdir()), "a run left a work directory on the host"


def test_cant_fill_the_bots_files_past_the_quota(client: SandboxClient, root: Path, monkeypatch: Any) -> None:
    chunk = "q" * policy.MAX_FILE_BYTES
    written = 0
    for n in range(policy.FILES_QUOTA_BYTES // policy.MAX_FILE_BYTES + 2):
        reply = file_op(client, "write", f"f{n}.txt", "quota", content=chunk)
        if not reply["ok"]:
            assert "quota" in reply["error"], reply
            break
        written += reply["written"]
    else:
        pytest.fail("the quota never refused a write")
    used = sum(p.stat().st_size for p in (root / "files" / "quota").rglob("*") if p.is_file())
    assert written == used <= policy.FILES_QUOTA_BYTES, (written, used)
    assert file_op(client, "write", "f0.txt", "quota", content="smaller")["ok"]  # replacing a file frees its bytes


# ---- files: special files answered at once -----------------------------------------------------------------


@pytest.mark.parametrize("op", ["read", "write"])
def test_cant_hang_a_file_operation_on_a_fifo(client: SandboxClient, root: Path, op: str) -> None:
    directory = root / "files" / "fifo"
    file_op(client, "list", "/", "fifo")  # makes the directory
    if not (directory / "pipe").exists():
        os.mkfifo(directory / "pipe")
        os.chmod(directory / "pipe", 0o660)  # (whatever our umask): the run may open it, and must not wait on it
        if kit.ROOT_MODE:
            os.chown(directory / "pipe", 0, GID)
    started = time.monotonic()
    reply = file_op(client, op, "pipe", "fifo", content="x", limits={"wall_seconds": 5})
    assert reply["ok"] is False and "not a regular file" in reply["error"], reply
    assert time.monotonic() - started < 2, "the operation waited on the FIFO"
    assert file_op(client, "exists", "pipe", "fifo")["type"] == "other"


# ---- the runner's own words ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["raise ValueError(10 ** 5000)", "raise KeyError(10 ** 5000)",
                                    "x = {}\nx[10 ** 5000]"])  # fmt: skip
def test_cant_break_the_runner_with_an_unprintable_error(client: SandboxClient, source: str) -> None:
    reply = script(client, source)
    assert reply["ok"] is False and reply["error"].startswith("runtime_error: "), reply
    assert "could not be shown" in reply["error"] and reply["exit_code"] == 0, reply


# ---- every layer at once, as an operator's `sandbox check` sees it -------------------------------------------


def test_cant_find_a_layer_missing_in_sandbox_check(client: SandboxClient) -> None:
    """The battery of `python -m sandbox check` (memory, processes and CPU over budget, disk caps, execute rights,
    identity, seccomp), run by this mode's sandbox: every required layer holds, and Landlock where the kernel
    has it."""
    report = client.call({"kind": "check", "limits": {"wall_seconds": 60}})
    failed = [c for c in report["checks"] if not c["ok"] and (c["required"] or landlock.abi_version())]
    assert report["ok"] and not failed, failed
    assert {c["layer"] for c in report["checks"]} >= {"namespaces", "identity", "capabilities", "seccomp",
        "cgroup memory", "cgroup pids", "cgroup cpu", "disk /work and /tmp", "disk /files"}  # fmt: skip


# ---- the sandbox process itself ------------------------------------------------------------------------------


def test_cant_kill_the_sandbox_with_a_request_after_a_small_run(client: SandboxClient) -> None:
    """The sandbox lives in its runs' cgroup: between runs it must not be held to the last run's memory."""
    assert client.proc is not None
    pid = client.proc.pid
    assert script(client, "result = 1", memory_bytes=32 << 20)["ok"]
    reply = script(client, "result = len(params['a'])", {"a": [{"k": "v"}] * 300_000})
    assert reply["ok"] and reply["result"] == 300_000, reply
    assert client.proc.pid == pid, "the sandbox process was replaced"


@pytest.mark.parametrize(
    ("command", "params"),
    [("echo " + "{{a}}" * 1000, {"a": "x" * (1 << 20)}), ("echo " + "a " * 2_000_000, {})],
    ids=["placeholder_amplification", "megabytes_of_command"],
)
def test_cant_stall_or_kill_the_sandbox_with_a_huge_command(
    client: SandboxClient, command: str, params: dict[str, Any]
) -> None:
    assert client.proc is not None
    pid = client.proc.pid
    started = time.monotonic()
    reply = shell(client, command, params, limits={"wall_seconds": 0.5})
    assert refused(reply) and "exceed" in reply["error"], {**reply, "stdout": "..."}
    assert time.monotonic() - started < 2 and client.proc.pid == pid


@pytest.mark.parametrize("value", ["f", "bf", "lf", "+1f"])
def test_cant_make_tail_follow_through_an_attached_argument(client: SandboxClient, value: str) -> None:
    """tail reads a "-c<x>f" in argv[1] as its obsolete "follow" form before getopt: the argument is kept apart."""
    assert file_op(client, "write", "t.txt", "tail", content="line\n")["ok"]
    started = time.monotonic()
    reply = shell(client, "tail -c{{n}} /files/t.txt", {"n": value}, scope="tail", limits={"wall_seconds": 3})
    assert reply["killed"] is None and time.monotonic() - started < 2, reply
    assert reply["ok"] is False and "invalid number of bytes" in reply["stderr"], reply
