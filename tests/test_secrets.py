"""Unit tests of ``botworker.tools.secrets``: the platform's key derivation and AES-256-CBC values (checked against
Node's), malformed values and wrong keys failing as ValueError, and redaction of remembered secrets in their usual
encodings.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import subprocess
from typing import Any
from urllib.parse import quote

import pytest

from botworker.tools.secrets import REDACTED, decrypt, derive_key

from toolkit import remembering

NODE_KEY_HEX = "95812d6229fd44c4445215e08e7a8a7ba426ce5f75af3d0cf3c0497bb566b058"  # scryptSync('node-key','salt',32)


NODE_VECTOR = "07070707070707070707070707070707:8132d9d63c91c1cedb7d40eb82fbc2e089c180c0c1ce35751555a3dc2333734e"


NODE = shutil.which("node")


@pytest.mark.parametrize(
    ("passphrase", "key_hex"),
    [
        ("node-key", NODE_KEY_HEX),
        ("", "d0464f51a6f78120f9c19bfae4932fc09f2f88443774b15c4ba71f4dcaef28a5"),
        ("pässwörd", "af2f3b397586f3b0c48f91fe3eb7dc686f681c11da89d7350a408d9230b3633a"),
    ],
)
def test_derive_key_matches_node_scrypt_sync(passphrase: str, key_hex: str) -> None:
    # Values printed by Node v20: crypto.scryptSync(passphrase, 'salt', 32).toString('hex').
    assert derive_key(passphrase).hex() == key_hex


def test_decrypt_node_vector() -> None:
    assert decrypt(NODE_VECTOR, bytes.fromhex(NODE_KEY_HEX)) == "s3cr3t-ünïcode"
    assert decrypt("  " + NODE_VECTOR + "\n", derive_key("node-key")) == "s3cr3t-ünïcode"  # surrounding space


NODE_SCRIPT = r"""
const c = require('crypto');
const out = [];
for (const [pass, text] of JSON.parse(process.argv[1])) {
  const key = c.scryptSync(pass, 'salt', 32);
  const iv = c.randomBytes(16);
  const ci = c.createCipheriv('aes-256-cbc', key, iv);
  const enc = Buffer.concat([ci.update(text, 'utf8'), ci.final()]);
  out.push({key: key.toString('hex'), value: iv.toString('hex') + ':' + enc.toString('hex')});
}
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_decrypt_vectors_generated_by_node_now() -> None:
    cases = [
        ("node-key", ""),
        ("node-key", "x"),
        ("k", "exactly16bytes!!"),
        ("k", "a" * 100),
        ("ключ", 'значение 🔑 with "quotes" and \\ backslash'),
        ("", "empty passphrase"),
    ]
    proc = subprocess.run(
        [str(NODE), "-e", NODE_SCRIPT, json.dumps(cases)], capture_output=True, text=True, timeout=60, check=True
    )
    for (passphrase, plaintext), vector in zip(cases, json.loads(proc.stdout), strict=True):
        assert derive_key(passphrase).hex() == vector["key"]
        assert decrypt(vector["value"], derive_key(passphrase)) == plaintext


@pytest.mark.parametrize(
    "encrypted",
    [
        "",
        ":",
        "nocolonhere",
        "07" * 16,  # an iv alone
        "07" * 16 + ":",  # no ciphertext
        "070:" + "00" * 16,  # odd hex iv
        "07" * 16 + ":abc",  # odd hex ciphertext
        "zz" * 16 + ":" + "00" * 16,  # not hex
        "07" * 15 + ":" + "00" * 16,  # short iv
        "07" * 17 + ":" + "00" * 16,  # long iv
        "07" * 16 + ":" + "00" * 15,  # ciphertext not a whole block
        "07" * 16 + ":" + "00" * 17,
        "é" * 16 + ":" + "00" * 16,
        NODE_VECTOR.replace(":", ";"),
        NODE_VECTOR + ":00",
        NODE_VECTOR[:-2] + "00",  # last block tampered: padding breaks
    ],
)
def test_decrypt_malformed_is_value_error(encrypted: str) -> None:
    with pytest.raises(ValueError):
        decrypt(encrypted, bytes.fromhex(NODE_KEY_HEX))


def test_decrypt_wrong_key_is_always_value_error() -> None:
    rng = random.Random(7)
    for _ in range(400):
        key = bytes(rng.randrange(256) for _ in range(32))
        try:
            decrypt(NODE_VECTOR, key)
        except ValueError:
            continue
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            pytest.fail(f"decrypt with a wrong key raised {type(exc).__name__}, not ValueError")
        pytest.fail("decrypt with a wrong key returned a value")  # pragma: no cover


@pytest.mark.parametrize("key", [b"", b"short", b"x" * 31, b"x" * 33])
def test_decrypt_bad_key_length_is_value_error(key: bytes) -> None:
    with pytest.raises(ValueError):
        decrypt(NODE_VECTOR, key)


def test_redact_nothing_remembered_is_identity() -> None:
    s = remembering()
    data = {"a": ["x", {"b": ("y",)}], "TOPSECRET": 1}
    assert s.redact(data) is data
    assert s.redact("TOPSECRET") == "TOPSECRET"
    assert s.used is False
    s.remember("")
    assert s.used is False and s.redact(data) is data


SECRET = 'p@ss w/"rd"é+=\\'


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("TOPSECRET", REDACTED),
        ("Bearer TOPSECRET!", f"Bearer {REDACTED}!"),
        ("TOPSECRETTOPSECRET", REDACTED * 2),
        ("topsecret", "topsecret"),  # case matters
        ("TOPSECRE", REDACTED),  # a piece at the edge of a text (a cut) is redacted...
        ("xTOPSECREx", "xTOPSECREx"),  # ...not one in the middle
        ("log: TOPS", f"log: {REDACTED}"),
        ("ECRET and more", f"{REDACTED} and more"),
        ("log: TOP", "log: TOP"),  # pieces under 4 characters are noise
        (f"q={quote('TOPSECRET', safe='')}", f"q={REDACTED}"),
        (f"b64 {base64.b64encode(b'TOPSECRET').decode()}", f"b64 {REDACTED}"),
        (42, 42),
        (None, None),
        (True, True),
        (b"TOPSECRET", b"TOPSECRET"),  # bytes are not looked at
        (["TOPSECRET", ("x", "TOPSECRET")], [REDACTED, ["x", REDACTED]]),  # tuples come back as lists
        ({"TOPSECRET": {"k": ["a TOPSECRET b"]}}, {REDACTED: {"k": [f"a {REDACTED} b"]}}),
        ({"n": 1, "l": [{"d": "TOPSECRET"}]}, {"n": 1, "l": [{"d": REDACTED}]}),
    ],
)
def test_redact(value: Any, expected: Any) -> None:
    assert remembering("TOPSECRET").redact(value) == expected


@pytest.mark.parametrize(
    "variant",
    [
        SECRET,
        quote(SECRET, safe=""),
        json.dumps(SECRET)[1:-1],
        base64.b64encode(SECRET.encode()).decode(),
    ],
    ids=["raw", "url-encoded", "json-escaped", "base64"],
)
def test_redact_encoded_variants(variant: str) -> None:
    s = remembering(SECRET)
    assert s.used is True
    got = s.redact({"in": f"<<{variant}>>", variant: [variant]})
    assert got == {"in": f"<<{REDACTED}>>", REDACTED: [REDACTED]}


def test_redact_json_dumped_payload() -> None:
    s = remembering(SECRET)
    body = json.dumps({"password": SECRET, "nested": [SECRET]})
    assert SECRET not in s.redact(body) and json.dumps(SECRET)[1:-1] not in s.redact(body)
    assert s.redact(body).count(REDACTED) == 2


@pytest.mark.parametrize("order", [("abc", "xxabcxx"), ("xxabcxx", "abc")])
def test_redact_secret_inside_another_secret(order: tuple[str, str]) -> None:
    s = remembering(*order)
    # the longer one is replaced whole, whichever was remembered first
    assert s.redact("1 xxabcxx 2 abc 3") == f"1 {REDACTED} 2 {REDACTED} 3"


def test_secret_value_not_in_repr() -> None:
    from botworker.tools.secrets import Secret

    assert "TOPSECRET" not in repr(Secret("id", "n", "k", None, None, "TOPSECRET"))
