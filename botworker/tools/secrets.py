"""Secrets: decrypt a ``secrets`` row for the one tool call that needs it, and redact its value from everything else.

The platform stores ``encryptedValue`` as ``hex(iv):hex(ciphertext)``: AES-256-CBC with PKCS#7 padding, the key
being scrypt(ENCRYPTION_KEY, salt "salt", 32 bytes, N=16384, r=8, p=1), Node.js's ``crypto.scryptSync`` defaults.
The key is derived once per process (scrypt is slow on purpose: ~50 ms).

A secret is used only if it belongs to the message's user and is active; otherwise the answer is "not found", the
same as for an id that does not exist, so ids of other users' secrets reveal nothing. Every value decrypted while
a message is handled is remembered by that message's ``Secrets``, and ``redact`` replaces it (raw, URL- or form-encoded,
JSON-escaped, HTML-escaped, read as Latin-1, base64; and a piece of it left at the edge of a text that a size cap
cut) in whatever is about to leave the tool call: results, errors, logs.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_plus

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .. import errors
from ..store import Store

REDACTED = "[redacted]"
_MIN_PIECE = 4  # characters: a shorter piece of a secret at the edge of a cut text is not redacted (noise)
_SELECT = """SELECT id, name, key, "encryptedValue", type, provider FROM secrets
             WHERE id = %(id)s AND "userId" = %(user)s AND "isActive" """


class SecretError(Exception):
    """A secret cannot be used; ``str()`` is safe to show (it never contains the value)."""

    code = errors.TOOL_FAILED


@functools.lru_cache(maxsize=4)
def derive_key(passphrase: str) -> bytes:
    """The AES-256 key Node's ``scryptSync(passphrase, 'salt', 32)`` gives."""
    return hashlib.scrypt(passphrase.encode(), salt=b"salt", n=16384, r=8, p=1, dklen=32, maxmem=64 << 20)


def decrypt(encrypted: str, key: bytes) -> str:
    """``hex(iv):hex(ciphertext)`` -> the UTF-8 plaintext; ValueError if it is malformed or the key is wrong."""
    iv_hex, sep, ct_hex = encrypted.strip().partition(":")
    iv, ciphertext = bytes.fromhex(iv_hex), bytes.fromhex(ct_hex)
    if not sep or len(iv) != 16 or not ciphertext or len(ciphertext) % 16:
        raise ValueError("not hex(iv):hex(ciphertext) with a 16-byte iv")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return (unpadder.update(padded) + unpadder.finalize()).decode("utf-8")


@dataclass(frozen=True)
class Secret:
    """A decrypted secret. ``value`` is kept out of ``repr`` so a stray log line cannot print it."""

    id: str
    name: str
    key: str
    type: str | None
    provider: str | None
    value: str = field(repr=False)


class Secrets:
    """The secrets of one message's user: fetched on demand, remembered for redaction."""

    def __init__(self, store: Store, encryption_key: str, user_id: str) -> None:
        self._store = store
        self._passphrase = encryption_key
        self._user_id = user_id
        self._needles: list[str] = []

    def get(self, secret_id: Any) -> Secret:
        """The active secret ``secret_id`` of this user, decrypted, or SecretError."""
        try:
            sid = str(uuid.UUID(str(secret_id)))
        except ValueError:
            raise SecretError(f"secret {str(secret_id)[:60]!r} not found") from None
        if not self._passphrase:
            raise SecretError("this worker cannot use secrets: ENCRYPTION_KEY is not set")
        rows = self._store.fetch(_SELECT, {"id": sid, "user": self._user_id})
        if not rows:
            raise SecretError(f"secret {sid} not found (or not active) for this user")
        row = rows[0]
        try:
            value = decrypt(str(row["encryptedValue"]), derive_key(self._passphrase))
        except ValueError:
            raise SecretError(f"secret {sid} cannot be decrypted (does ENCRYPTION_KEY match the platform's?)") from None
        self.remember(value)
        return Secret(sid, row["name"], row["key"], row["type"], row["provider"], value)

    def remember(self, value: str) -> None:
        """Redact ``value`` (and its usual encodings) from now on."""
        if not value:
            return
        raw = value.encode("utf-8")
        variants = {
            value,
            quote(value, safe=""),
            re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quote(value, safe="")),  # %2f as well as %2F
            quote_plus(value),
            json.dumps(value)[1:-1],
            json.dumps(value, ensure_ascii=False)[1:-1],
            html.escape(value),
            value.replace("&", "&amp;")
            .replace("<", "&lt;")
            .replace(">", "&gt;")
            .replace('"', "&#34;")
            .replace("'", "&#39;"),  # numeric character references, as markupsafe/Jinja write them
            json.dumps(value)[1:-1].replace("/", "\\/"),  # PHP's json_encode escapes slashes
            raw.decode("latin-1"),  # UTF-8 bytes read as Latin-1: what a body without a charset decodes to
            base64.b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode(),
        }
        for variant in variants:
            if variant and variant not in self._needles:
                self._needles.append(variant)
        self._needles.sort(key=len, reverse=True)  # longest first: a value inside another is replaced inside it

    def _redact_edges(self, text: str) -> str:
        """A secret cut in two by a size cap (a truncated body, a clipped error) leaves a piece at an end of the
        text: a prefix of it at the end, or a suffix at the start. Pieces of at least ``_MIN_PIECE`` characters
        are redacted too. Linear in the lengths (a long token and a large result must not cost seconds)."""
        if len(text) < _MIN_PIECE:
            return text
        for needle in self._needles:
            # Cheap test first (a C substring search): an overlap of _MIN_PIECE or more contains these pieces.
            if text[-_MIN_PIECE:] in needle and (k := _overlap(text, needle)) >= _MIN_PIECE:
                text = text[:-k] + REDACTED  # the longest end of `text` that begins `needle`
            if text[:_MIN_PIECE] in needle and (k := _overlap(needle, text)) >= _MIN_PIECE:
                text = REDACTED + text[k:]  # the longest end of `needle` that begins `text`
        return text

    @property
    def used(self) -> bool:
        return bool(self._needles)

    def redact(self, value: Any) -> Any:
        """``value`` with every remembered secret replaced by ``[redacted]``, in strings, keys and nested data."""
        if not self._needles:
            return value
        if isinstance(value, str):
            for needle in self._needles:
                if needle in value:
                    value = value.replace(needle, REDACTED)
            return self._redact_edges(value)
        if isinstance(value, dict):
            return {self.redact(k): self.redact(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.redact(v) for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in self._needles:
            return REDACTED  # a numeric secret echoed back as a JSON number
        return value


def _overlap(text: str, needle: str) -> int:
    """The length of the longest proper prefix of ``needle`` that ``text`` ends with (KMP over the pair)."""
    tail = text[-(len(needle) - 1) :] if len(needle) > 1 else ""
    if not tail:
        return 0
    # Prefix function of needle[:-1] + sentinel + tail: its last value is the overlap. None cannot equal a char.
    seq: list[str | None] = [*needle[:-1], None, *tail]
    pi = [0] * len(seq)
    for i in range(1, len(seq)):
        k = pi[i - 1]
        while k and seq[i] != seq[k]:
            k = pi[k - 1]
        if seq[i] == seq[k]:
            k += 1
        pi[i] = k
    return pi[-1]
