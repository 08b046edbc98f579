"""The shell policy on its own (no run): a command line is read the way its program reads it, and only the options
policy.py lists for that program get through. The last tests hold the policy against the programs installed here."""

from __future__ import annotations

import subprocess

import pytest

from sandbox import policy, shell
from sandbox.shell import ShellRefused, build_argv


def argv(command: str, **params: object) -> list[str]:
    return build_argv(command, dict(params))[1]


def test_options_first_then_operands_after_a_double_dash() -> None:
    assert argv("sort -rn -k2 {{f}} -o /tmp/x", f="--help") == [
        "sort", "-r", "-n", "-k", "2", "-o", "/tmp/x", "--", "--help"]  # fmt: skip
    assert argv("sort /files/a --reverse") == ["sort", "--reverse", "--", "/files/a"]  # getopt permutes
    assert argv("cat") == ["cat"]
    assert argv("cat -- -n") == ["cat", "--", "-n"]


@pytest.mark.parametrize(
    "command",
    [
        "sort --compress-program=dash x",
        "sort --compress-prog=dash x",  # getopt_long takes a unique prefix: refused, never guessed
        "sort --com dash x",
        "sort --rev x",  # even a prefix of an allowed option
        "sort -S 64K x",
        "sort -rS64K x",  # inside a cluster
        "sort -T /tmp x",
        "sort --parallel=2 x",
        "sort --files0-from=/files/list",
        "sort --random-source=/dev/urandom x",
        "tail -f x",
        "tail --follow=name x",
        "tail -5 x",  # obsolete -NUM forms are not listed
        "head -5 x",
        "date -s now",
        "date --set=now",
        "grep -X perl a x",
        "ls --color=always",
        "uniq -2 x",
        "seq -1 1",  # an operand that starts with '-' goes after "--"
        "printf -v x",
        "expr -x",
    ],
)
def test_an_option_that_is_not_listed_is_refused(command: str) -> None:
    with pytest.raises(ShellRefused, match="not allowed"):
        build_argv(command, {})


@pytest.mark.parametrize(
    "command",
    ["sort -{{o}} x", "sort --{{o}} x", "sort --{{o}}=dash x", "sort -r{{o}} x", "sort --key{{o}} x", "ls -{{o}}"],
)
def test_a_parameter_cannot_name_an_option(command: str) -> None:
    with pytest.raises(ShellRefused, match=r"parameter cannot name an option|not allowed"):
        build_argv(command, {"o": "compress-program"})


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("sort --key={{k}} x", ["sort", "--key=--compress-program=dash", "--", "x"]),  # an argument, not an option
        ("sort -k {{k}} x", ["sort", "-k", "--compress-program=dash", "--", "x"]),
        ("sort -k{{k}} x", ["sort", "-k", "--compress-program=dash", "--", "x"]),
        ("sort -rnk{{k}} x", ["sort", "-r", "-n", "-k", "--compress-program=dash", "--", "x"]),
        ("head -n {{k}} x", ["head", "-n", "--compress-program=dash", "--", "x"]),
        ("sort {{k}}", ["sort", "--", "--compress-program=dash"]),
        ("sort -- {{k}} -r", ["sort", "--", "--compress-program=dash", "-r"]),
        ("basename {{k}} -s", ["basename", "--", "--compress-program=dash", "-s"]),  # "+": options stop at operands
    ],
)
def test_a_parameter_fills_an_argument_or_an_operand(command: str, expected: list[str]) -> None:
    assert argv(command, k="--compress-program=dash") == expected


def test_clusters_come_out_one_option_per_element() -> None:
    """tail reads a "-cf" in argv[1] as its obsolete "bytes, follow" form before getopt: the value "f" of
    `tail -c{{n}}` would follow forever. One option per element, arguments apart, leaves nothing to such readings."""
    assert argv("tail -c{{n}} /files/x", n="f") == ["tail", "-c", "f", "--", "/files/x"]
    assert argv("tail -cf /files/x") == ["tail", "-c", "f", "--", "/files/x"]
    assert argv("ls -lah") == ["ls", "-l", "-a", "-h"]
    assert argv("date -Iseconds") == ["date", "-Iseconds"]  # an optional argument stays attached


def test_a_command_or_its_arguments_past_the_cap_are_refused_before_the_work() -> None:
    with pytest.raises(ShellRefused, match="exceeds"):
        build_argv("echo " + "a " * policy.MAX_ARGV_BYTES, {})
    with pytest.raises(ShellRefused, match="exceed"):  # 1,000 copies of 1 MiB are never built
        build_argv("echo " + "{{a}}" * 1000, {"a": "x" * (1 << 20)})


def test_a_missing_option_argument_is_refused() -> None:
    for command in ("sort -k", "sort --key", "head -n"):
        with pytest.raises(ShellRefused, match="needs an argument"):
            build_argv(command, {})
    with pytest.raises(ShellRefused, match="takes no argument"):
        build_argv("sort --reverse=yes x", {})


def test_programs_without_options_get_a_leading_double_dash() -> None:
    assert argv("printf %s {{a}}", a="--help") == ["printf", "--", "%s", "--help"]
    assert argv("expr {{a}} + 1", a="-5") == ["expr", "--", "-5", "+", "1"]
    assert argv("true") == ["true"]


def test_echo_refuses_a_value_it_would_read_as_an_option() -> None:
    assert argv("echo -n {{a}}", a="hello") == ["echo", "-n", "hello"]
    assert argv("echo {{a}} {{b}}", a="x", b="-n") == ["echo", "x", "-n"]  # after an operand: printed
    assert argv("echo {{a}}", a="-x") == ["echo", "-x"]  # not an echo option: printed as is
    for value in ("-n", "-e", "-neE", "--help", "--version"):
        with pytest.raises(ShellRefused):
            build_argv("echo {{a}}", {"a": value})
    with pytest.raises(ShellRefused):
        build_argv("echo -e {{a}} x", {"a": "-n"})


def test_secret_names_that_programs_read_are_refused() -> None:
    for name in ("POSIXLY_CORRECT", "GREP_OPTIONS", "TIME_STYLE", "QUOTING_STYLE", "LS_COLORS", "BLOCK_SIZE",
                 "OMP_NUM_THREADS", "OMP_THREAD_LIMIT", "OUTPUT_CHARSET", "LIBC_FATAL_STDERR_"):  # fmt: skip
        with pytest.raises(ShellRefused):
            shell.build_env({name: "x"})


def test_the_executables_are_the_program_and_its_loader() -> None:
    found = shell.executables("/usr/bin/sort")
    assert found[0] == "/usr/bin/sort" and len(found) == 2 and "ld-linux" in found[1], found


# ---- the policy against the programs installed here --------------------------------------------------------


def _help(program: policy.Program) -> str:
    done = subprocess.run([program.path, "--help"], capture_output=True, text=True, timeout=10, env={"LC_ALL": "C"})
    return done.stdout


@pytest.mark.parametrize("name", [n for n, p in policy.SHELL_PROGRAMS.items() if p.syntax != policy.NO_OPTIONS])
def test_every_listed_option_exists_in_the_installed_program(name: str) -> None:
    """A typo in the allowlist would be a wrong model of how the program reads its command line."""
    program = policy.SHELL_PROGRAMS[name]
    text = _help(program)
    short, long = shell._specs(program)
    missing = [f"-{c}" for c in short if f"-{c}" not in text]
    missing += [f"--{n}" for n in long if f"--{n}" not in text]
    assert not missing, f"{name} --help does not mention {missing}"
    for option, kind in long.items():  # an option documented with "=ARG" takes one
        documented = f"--{option}=" in text or f"--{option}[=" in text
        assert documented == (kind != "none"), f"{name} --{option}: argument kind {kind!r} against its --help"


def test_every_program_is_where_the_policy_says() -> None:
    for name, program in policy.SHELL_PROGRAMS.items():
        assert shell.executables(program.path), name
