"""File operations (read, write, list, exists) confined to one directory, walked without following symlinks.

Runs inside the jail, where the bot's directory is mounted at ``/files`` and nothing of the host is visible; on
top of that, every path is walked one component at a time from a descriptor of the base directory with
``O_NOFOLLOW``, and ``..``, empty components and NUL bytes are refused, so a symlink planted in the directory
cannot lead anywhere else (not even elsewhere in the jail). Sizes are capped by ``policy``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from typing import Any

from .policy import MAX_FILE_BYTES, MAX_LIST_ENTRIES

OPERATIONS = ("read", "write", "list", "exists")


class FileRefused(ValueError):
    """The operation or path is not allowed; the message says why."""


def split_path(path: str) -> list[str]:
    """A path relative to the base directory, as components. A leading '/' means the base directory itself."""
    if not isinstance(path, str) or "\x00" in path or len(path) > 4096:
        raise FileRefused("path must be a string without NUL bytes, at most 4096 characters")
    parts = [p for p in path.strip().split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise FileRefused("path must not contain '..'")
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
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o770, dir_fd=fd)
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
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
            assert content is not None
            data = content.encode("utf-8")
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660, dir_fd=parent
            )
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise FileRefused("not a regular file")
                written = os.write(fd, data)
            finally:
                os.close(fd)
            return {"ok": True, "written": written}
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


def _read(parent: int, name: str) -> dict[str, Any]:
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
