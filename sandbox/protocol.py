"""The wire format between the worker and its sandbox process: length-prefixed, size-capped JSON frames.

    +----------------+---------------------------------------------+
    | length: 4 bytes | payload: `length` bytes of UTF-8 JSON object |
    | big-endian      | (at most MAX_FRAME_BYTES)                   |
    +----------------+---------------------------------------------+

One request frame, then one response frame, strictly alternating. Any frame that is not a JSON object, is larger
than the cap, or ends early raises ``ProtocolError``; the side that sees it closes the pipe (the client then
respawns the sandbox). Reads and writes take an absolute deadline (``time.monotonic()``), so no call blocks for
longer than its caller allows.
"""

from __future__ import annotations

import json
import os
import select
import struct
import time
from typing import Any

from .policy import MAX_FRAME_BYTES

_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A malformed, oversized or truncated frame, or a peer that went away."""


class FrameTimeout(ProtocolError):
    """The deadline passed before a whole frame could be read or written."""


def encode_frame(message: dict[str, Any], limit: int = MAX_FRAME_BYTES) -> bytes:
    # ASCII escapes: a lone surrogate in a string (possible in JSON input) still makes a valid frame.
    try:
        payload = json.dumps(message, separators=(",", ":"), allow_nan=False).encode("ascii")
    except ValueError as exc:
        raise ProtocolError(f"message cannot be encoded: {exc}") from None
    if len(payload) > limit:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the {limit}-byte limit")
    return _HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    try:
        message = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"frame is not UTF-8 JSON: {type(exc).__name__}") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    return message


def write_frame(fd: int, message: dict[str, Any], deadline: float | None = None, limit: int = MAX_FRAME_BYTES) -> None:
    write_payload(fd, encode_frame(message, limit)[_HEADER.size :], deadline)


def write_payload(fd: int, payload: bytes, deadline: float | None = None) -> None:
    """A frame of a payload as read (``read_payload``): the sandbox process relays frames without re-encoding."""
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        _wait(fd, deadline, write=True)
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ProtocolError(f"peer closed the pipe: {exc}") from None
        data = data[sent:]


def read_frame(fd: int, deadline: float | None = None, limit: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    return decode_payload(read_payload(fd, deadline, limit))


def read_payload(fd: int, deadline: float | None = None, limit: int = MAX_FRAME_BYTES) -> bytes:
    """One frame's payload, not decoded."""
    (length,) = _HEADER.unpack(_read_exactly(fd, _HEADER.size, deadline, header=True))
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds the {limit}-byte limit")
    return _read_exactly(fd, length, deadline)


def _read_exactly(fd: int, n: int, deadline: float | None, header: bool = False) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < n:
        _wait(fd, deadline, write=False)
        try:
            chunk = os.read(fd, min(n - got, 1 << 20))
        except BlockingIOError:
            continue
        if not chunk:
            where = "before a frame" if header and got == 0 else f"after {got} of {n} bytes"
            raise ProtocolError(f"pipe closed {where}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _wait(fd: int, deadline: float | None, write: bool) -> None:
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise FrameTimeout("deadline passed")
    poller = select.poll()
    poller.register(fd, select.POLLOUT if write else select.POLLIN)
    if not poller.poll(left * 1000):
        raise FrameTimeout("deadline passed")
