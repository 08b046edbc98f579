"""File operations and the server's words about a run, on their own (no jail): the quota's walk, paths, reasons."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import files, jail, policy, request


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="files-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_quota_counts_directories_and_files(base: Path) -> None:
    (base / "a" / "b").mkdir(parents=True)
    (base / "a" / "f.txt").write_bytes(b"x" * 1000)
    used, entries = files.usage(str(base), 100)
    dirs = (base / "a").stat().st_size + (base / "a" / "b").stat().st_size
    assert (used, entries) == (1000 + dirs, 3)


def test_cant_break_the_quota_walk_with_a_tree_deeper_than_path_max(base: Path) -> None:
    """A walk by path fails past PATH_MAX (and then every later write of the bot failed): this one walks by
    descriptor. (File operations cannot make such a tree any more: paths are capped; an old one may exist.)"""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(30):  # 30 x 200 characters: past PATH_MAX (4096) from the base
            os.mkdir("d" * 200, dir_fd=fd)
            nxt = os.open("d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "wb") as f:
            f.write(b"y" * 10)
    finally:
        os.close(fd)
    used, entries = files.usage(str(base), 1000)
    assert entries == 31 and used >= 10
    reply = files.operate(str(base), "write", "new.txt", "fits")
    assert reply == {"ok": True, "written": 4}, reply


@pytest.mark.parametrize("path", ["/".join(["d"] * (policy.MAX_PATH_DEPTH + 1)), "x" * (policy.MAX_PATH_CHARS + 1)])
def test_cant_write_a_path_past_the_depth_or_length_cap(base: Path, path: str) -> None:
    reply = files.operate(str(base), "write", path, "x")
    assert reply["ok"] is False and ("deep" in reply["error"] or "characters" in reply["error"]), reply
    assert list(base.iterdir()) == []


def test_a_run_the_kernel_killed_for_its_memory_says_so_whoever_was_chosen() -> None:
    out = jail.Outcome(exit_code=128 + signal.SIGKILL, oom_kills=1)
    assert request.meta(out)["killed"] == "memory"
    assert request.death(out, "sort") == "sort killed: memory limit of the run"
    assert request.death(jail.Outcome(exit_code=128 + signal.SIGTERM), "sort") == "sort killed by signal 15"
