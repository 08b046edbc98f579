"""File operations (read, write, list, exists) confined to one directory, walked without following symlinks.

Runs inside the jail, where the bot's directory is mounted at ``/files`` and nothing of the host is visible; on
top of that, every path is walked one component at a time from a descriptor of the base directory with
``O_NOFOLLOW``, and ``..``, empty components and NUL bytes are refused, so a symlink planted in the directory
cannot lead anywhere else (not even elsewhere in the jail). Only regular files are read or written: everything is
opened with ``O_NONBLOCK`` and checked with ``fstat`` before use, so a FIFO, socket or device answers at once with
a refusal instead of hanging the run. Sizes are capped by ``policy``, and every write is checked against the bot's
quota (``policy.FILES_QUOTA_BYTES`` and ``FILES_QUOTA_ENTRIES`` for the directory as a whole) and then made under
an ``RLIMIT_FSIZE`` of what is left of it. File operations are the only runs that can write ``/files``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import stat
from typing import Any

from .policy import (
    FILES_QUOTA_BYTES,
    FILES_QUOTA_ENTRIES,
    MAX_FILE_BYTES,
    MAX_LIST_ENTRIES,
    MAX_PATH_CHARS,
    MAX_PATH_DEPTH,
)

OPERATIONS = ("read", "write", "list", "exists")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


class FileRefused(ValueError):
    """The operation or path is not allowed; the message says why."""


def split_path(path: str) -> list[str]:
    """A path relative to the base directory, as components. A leading '/' means the base directory itself."""
    if not isinstance(path, str) or "\x00" in path or len(path) > MAX_PATH_CHARS:
        raise FileRefused(f"path must be a string without NUL bytes, at most {MAX_PATH_CHARS} characters")
    parts = [p for p in path.strip().split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise FileRefused("path must not contain '..'")
    if len(parts) > MAX_PATH_DEPTH:
        raise FileRefused(f"path must not be more than {MAX_PATH_DEPTH} directories deep")
    return parts


def check_request(op: str, path: str, content: Any) -> None:
    """Refuse a bad request before anything is forked."""
    if op not in OPERATIONS:
        raise FileRefused(f"operation must be one of {', '.join(OPERATIONS)}")
    parts = split_path(path)
    if op in ("read", "write") and not parts:
        raise FileRefused(f"{op} needs a file path")
    if op == "write":
        if not isinstance(content, str):
            raise FileRefused("write needs `content` as a string")
        if len(content.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
            raise FileRefused(f"content exceeds {MAX_FILE_BYTES} bytes")


def _walk(base: str, parts: list[str], create: bool) -> int:
    """A descriptor of the directory holding the last component, reached without following any symlink."""
    fd = os.open(base, _DIR_FLAGS)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o770, dir_fd=fd)
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def operate(base: str, op: str, path: str, content: str | None = None) -> dict[str, Any]:
    """Do one operation; errors become ``{"ok": False, "error": ...}``."""
    try:
        check_request(op, path, content)
        parts = split_path(path)
        if op == "list":
            return {"ok": True, "entries": _list(base, parts)}
        data = content.encode("utf-8") if op == "write" and isinstance(content, str) else b""
        left = _check_quota(base, parts, len(data)) if op == "write" else 0
        parent = _walk(base, parts[:-1], create=op == "write")
        try:
            name = parts[-1] if parts else "."
            if op == "exists":
                try:
                    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    return {"ok": True, "exists": False}
                return {"ok": True, "exists": True, "type": _kind(st.st_mode)}
            if op == "read":
                return {"ok": True, **_read(parent, name)}
            return {"ok": True, "written": _write(parent, name, data, left)}
        finally:
            os.close(parent)
    except FileRefused as exc:
        return {"ok": False, "error": str(exc)}
    except FileNotFoundError:
        return {"ok": False, "error": f"{path}: no such file or directory"}
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            reason = "a symbolic link (links are not followed)"
        elif exc.errno == errno.ENOTDIR:
            reason = "a part of the path is not a directory (or is a symbolic link: links are not followed)"
        else:
            reason = os.strerror(exc.errno or 0)
        return {"ok": False, "error": f"{path}: {reason}"}


def _check_quota(base: str, parts: list[str], size: int) -> int:
    """Refuse a write of ``size`` bytes to ``parts`` that would take the bot's files past their quota, before
    anything is created; returns the bytes left for it (the RLIMIT_FSIZE of the write)."""
    used_bytes, used_entries = usage(base, FILES_QUOTA_ENTRIES + 1)
    new_entries, replaced = 1, 0
    fd = os.open(base, _DIR_FLAGS)
    try:
        for i, part in enumerate(parts):
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                new_entries = len(parts) - i  # this directory and everything below it, the file included
                break
            if i == len(parts) - 1:
                new_entries, replaced = 0, st.st_size if stat.S_ISREG(st.st_mode) else 0
            elif stat.S_ISDIR(st.st_mode):
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
            else:
                break  # _walk reports it
    finally:
        os.close(fd)
    if used_entries + new_entries > FILES_QUOTA_ENTRIES:
        raise FileRefused(f"quota: the bot's files hold {used_entries} entries (at most {FILES_QUOTA_ENTRIES})")
    left = FILES_QUOTA_BYTES - (used_bytes - replaced)
    if size > left:
        raise FileRefused(f"quota: {size} bytes do not fit; {max(left, 0)} of {FILES_QUOTA_BYTES} bytes are left")
    return left


def _write(parent: int, name: str, data: bytes, left: int) -> int:
    """Write one regular file, under an RLIMIT_FSIZE of what the quota leaves."""
    _only_regular(parent, name)
    cap = min(left, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))  # whatever happens below, no file grows past the quota
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o660, dir_fd=parent)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileRefused("not a regular file")
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return len(data)


def usage(base: str, stop_after: int) -> tuple[int, int]:
    """(bytes, entries) under ``base``: regular files and directories by their size, symlinks not followed, walked
    by descriptor (no path grows past PATH_MAX however deep the tree); counting stops after ``stop_after`` entries
    (the directory is over its quota by then anyway)."""
    counted = [0, 0]

    def walk(fd: int) -> None:
        with os.scandir(fd) as it:
            for entry in it:
                counted[1] += 1
                if counted[1] >= stop_after:  # (each level stops at its next entry)
                    return
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                    counted[0] += st.st_size
                if stat.S_ISDIR(st.st_mode):
                    child = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                    try:
                        walk(child)
                    finally:
                        os.close(child)

    top = os.open(base, _DIR_FLAGS)
    try:
        walk(top)
    finally:
        os.close(top)
    return counted[0], counted[1]


def _only_regular(parent: int, name: str) -> None:
    """Refuse a FIFO, socket or device by what it is, before opening it (the open itself is non-blocking and
    checked again with fstat: this only makes the answer say why)."""
    try:
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode)):
        raise FileRefused("not a regular file")


def _read(parent: int, name: str) -> dict[str, Any]:
    _only_regular(parent, name)
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=parent)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused("not a regular file")
        data = os.read(fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    return {"content": data[:MAX_FILE_BYTES].decode("utf-8", "replace"), "size": st.st_size,
            "truncated": len(data) > MAX_FILE_BYTES}  # fmt: skip


def _list(base: str, parts: list[str]) -> list[dict[str, Any]]:
    fd = _walk(base, parts, create=False)
    try:
        entries = []
        for name in sorted(os.listdir(fd))[:MAX_LIST_ENTRIES]:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            entries.append({"name": name, "type": _kind(st.st_mode), "size": st.st_size})
        return entries
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "link" if stat.S_ISLNK(mode) else "other"


def file_job(base: str, op: str, path: str, content: str | None) -> Any:
    """The jail job: do the operation and write its JSON result on the result descriptor."""

    def job(result_fd: int) -> None:
        data = json.dumps(operate(base, op, path, content), ensure_ascii=False).encode("utf-8")
        while data:
            data = data[os.write(result_fd, data) :]

    return job
