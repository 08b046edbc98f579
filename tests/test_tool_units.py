"""Unit tests (pure, no servers, fast) of the tool plumbing: access checks, result budgets, secrets (decryption and
redaction), back-off arithmetic and ``dispatch`` / ``ToolRunner`` driven by an in-memory tool family."""

from __future__ import annotations

import base64
import json
import logging
import random
import shutil
import subprocess
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import quote

import pytest

from botworker import errors
from botworker.config import load_config
from botworker.errors import TransientError
from botworker.message import ToolCall, ToolResult
from botworker.retry import backoff, retry_after
from botworker.tools import ToolContext, ToolFailure
from botworker.tools.access import denial
from botworker.tools.budget import clip, for_llm, for_metadata, summary
from botworker.tools.dispatch import ToolRunner, dispatch, max_attempts
from botworker.tools.secrets import REDACTED, SecretError, Secrets, decrypt, derive_key

OWNER = "user-1"

# ---- access.denial ---------------------------------------------------------------------------------------------

BOT = {"id": "b", "userId": OWNER}
ACTIVE_USER = {"id": OWNER, "isActive": True, "role": "user"}


@pytest.mark.parametrize(
    ("tool", "bot", "user", "user_id", "expected"),
    [
        # allowed
        ({"name": "t"}, BOT, ACTIVE_USER, OWNER, None),
        ({"name": "t", "isActive": True}, BOT, {"id": OWNER}, OWNER, None),
        ({"name": "t", "isActive": None}, BOT, {}, OWNER, None),  # only an explicit False is inactive
        ({"name": "t", "requiresAuth": True}, BOT, ACTIVE_USER, OWNER, None),
        ({"name": "t", "config": {"requiresAuth": True}}, BOT, ACTIVE_USER, OWNER, None),
        ({"name": "t", "config": {"requiresAuth": "no"}}, BOT, {"id": OWNER}, OWNER, None),  # a falsy spelling
        ({"name": "t", "requiresAuth": False}, BOT, {"id": OWNER, "isActive": False}, OWNER, None),
        ({"name": "t", "config": {"roles": ["admin", "user"]}}, BOT, ACTIVE_USER, OWNER, None),
        ({"name": "t", "config": {"roles": "user"}}, BOT, ACTIVE_USER, OWNER, None),
        ({"name": "t", "config": {"roles": ["1"]}}, BOT, {"id": OWNER, "role": 1}, OWNER, None),  # compared as text
        ({"name": "t", "config": "not a dict"}, BOT, ACTIVE_USER, OWNER, None),
        # owner mismatch
        ({"name": "t"}, {"userId": "someone-else"}, ACTIVE_USER, OWNER, "t runs only for the owner of this bot"),
        ({"name": "t"}, {}, ACTIVE_USER, OWNER, "t runs only for the owner of this bot"),
        ({"name": "t"}, BOT, {"id": "someone-else"}, OWNER, "t runs only for the owner of this bot"),
        ({"displayName": "Weather", "name": "w"}, BOT, ACTIVE_USER, "other", "Weather runs only for the owner"),
        ({}, BOT, ACTIVE_USER, "other", "this tool runs only for the owner"),
        # inactive tool
        ({"name": "t", "isActive": False}, BOT, ACTIVE_USER, OWNER, "t is not active"),
        # requiresAuth: the column (truthy) or the config key (True), needs isActive True
        ({"name": "t", "requiresAuth": True}, BOT, {"id": OWNER}, OWNER, "requires an authenticated, active user"),
        ({"name": "t", "requiresAuth": True}, BOT, {"id": OWNER, "isActive": False}, OWNER, "requires an authent"),
        ({"name": "t", "requiresAuth": True}, BOT, {"id": OWNER, "isActive": "true"}, OWNER, "requires an authent"),
        ({"name": "t", "requiresAuth": 1}, BOT, {"id": OWNER, "isActive": None}, OWNER, "requires an authent"),
        ({"name": "t", "config": {"requiresAuth": True}}, BOT, {"id": OWNER}, OWNER, "requires an authent"),
        ({"name": "t", "config": {"requiresAuth": "yes"}}, BOT, {"id": OWNER}, OWNER, "requires an authent"),
        ({"name": "t", "config": {"requiresAuth": 1}}, BOT, {"id": OWNER}, OWNER, "requires an authent"),
        ({"name": "t", "config": {"requiresAuth": True}}, BOT, {"isActive": False}, OWNER, "requires an authent"),
        # roles
        ({"name": "t", "config": {"roles": ["admin"]}}, BOT, ACTIVE_USER, OWNER, "limited to the role(s) admin"),
        ({"name": "t", "config": {"roles": ["admin"]}}, BOT, ACTIVE_USER, OWNER, "your role is 'user'"),
        ({"name": "t", "config": {"roles": "admin"}}, BOT, ACTIVE_USER, OWNER, "limited to the role(s) admin;"),
        ({"name": "t", "config": {"roles": ["a", "b"]}}, BOT, {"id": OWNER}, OWNER, "role(s) a, b; your role is None"),
        ({"name": "t", "config": {"roles": []}}, BOT, ACTIVE_USER, OWNER, "limited to the role(s) (none)"),
    ],
)
def test_denial(
    tool: dict[str, Any], bot: dict[str, Any], user: dict[str, Any], user_id: str, expected: str | None
) -> None:
    got = denial(tool, bot, user, user_id)
    if expected is None:
        assert got is None
    else:
        assert got is not None and expected in got, got


def test_denial_checks_in_order_owner_first() -> None:
    tool = {"name": "t", "isActive": False, "requiresAuth": True, "config": {"roles": ["admin"]}}
    assert denial(tool, {"userId": "x"}, {}, OWNER) == "t runs only for the owner of this bot"
    assert denial(tool, BOT, {}, OWNER) == "t is not active"
    assert "requires" in (denial({**tool, "isActive": True}, BOT, {}, OWNER) or "")


# ---- budget ----------------------------------------------------------------------------------------------------

ALPHABET = ["a", "Z", " ", "é", "ß", "€", "中", "😀", "𝄞"]  # 1, 1, 1, 2, 2, 3, 3, 4, 4 bytes


def _marker(text: str, max_bytes: int) -> str:
    return f"…[truncated {len(text.encode())} bytes to {max_bytes}]"


def _strings() -> list[str]:
    rng = random.Random(1234)
    out = ["", "a", "é", "€", "😀", "😀" * 20, "é" * 30, "a" * 50 + "😀", "😀" + "a" * 50]
    out += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(60)]
    return out


def test_clip_never_cuts_inside_a_character() -> None:
    checked = 0
    for text in _strings():
        size = len(text.encode("utf-8"))
        for max_bytes in range(0, size + 6):
            got = clip(text, max_bytes)
            assert isinstance(got, str)
            got.encode("utf-8")  # no lone surrogates or other unencodable leftovers
            if size <= max_bytes:
                assert got == text
                continue
            marker = _marker(text, max_bytes)
            assert got.endswith(marker), (text, max_bytes, got)
            prefix = got[: -len(marker)]
            assert text.startswith(prefix), (text, max_bytes, got)
            budget = max_bytes - len(marker.encode())
            if budget >= 0:
                assert len(got.encode()) <= max_bytes
                # the longest whole-character prefix that fits
                assert len(prefix.encode()) <= budget
                nxt = text[: len(prefix) + 1]
                assert len(nxt.encode()) > budget
            else:
                assert prefix == ""  # the budget is smaller than the marker: the marker alone (over budget)
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize(
    ("text", "max_bytes", "expected"),
    [
        ("hello", 5, "hello"),
        ("hello", 100, "hello"),
        ("", 0, ""),
        ("x" * 100, 50, "x" * (50 - len(_marker("x" * 100, 50).encode())) + _marker("x" * 100, 50)),
        ("😀" * 30, 37, "😀" + _marker("😀" * 30, 37)),  # 37 - 30-byte marker = 7 bytes: one 4-byte char
        ("😀" * 30, 38, "😀😀" + _marker("😀" * 30, 38)),  # 8 bytes: two
    ],
    ids=["fits", "fits-loosely", "empty", "ascii", "emoji-partial-dropped", "emoji-exact"],
)
def test_clip_examples(text: str, max_bytes: int, expected: str) -> None:
    assert clip(text, max_bytes) == expected


def _result(
    name: str, data: Any = None, ok: bool = True, error: str | None = None, op: str | None = None
) -> ToolResult:
    return ToolResult(
        ToolCall("id-" + name, name, "fake", op, {"p": 1}), ok, data, error, 5, 1, None if ok else "tool_failed"
    )


def test_for_llm_entries_and_per_tool_budget() -> None:
    results = [
        _result("a", {"k": "v"}),
        _result("b", "plain text"),
        _result("c", ok=False, error="it broke"),
        _result("d", "x" * 1000),
        _result("p", ["m1"], op="list_models"),
    ]
    out = for_llm(results, per_tool=200, total=10_000)
    assert out[0] == {"tool": "a", "ok": True, "result": '{"k": "v"}'}
    assert out[1] == {"tool": "b", "ok": True, "result": "plain text"}
    assert out[2] == {"tool": "c", "ok": False, "error": "it broke"}
    assert out[3]["result"].endswith("…[truncated 1000 bytes to 200]")
    assert len(out[3]["result"].encode()) <= 200
    assert out[4] == {"tool": "p", "ok": True, "operation": "list_models", "result": '["m1"]'}


def test_for_llm_json_keeps_unicode_and_stringifies_unknown_types() -> None:
    out = for_llm([_result("a", {"t": "é", "when": datetime(2024, 1, 2, tzinfo=UTC)})], 1000, 1000)
    assert out[0]["result"] == '{"t": "é", "when": "2024-01-02 00:00:00+00:00"}'


def test_for_llm_total_budget_and_left_out_results() -> None:
    results = [_result(str(i), "é" * 300) for i in range(5)]  # 600 bytes each
    out = for_llm(results, per_tool=500, total=1000)
    sizes = [len(e["result"].encode()) for e in out]
    assert 450 <= sizes[0] <= 500 and 450 <= sizes[1] <= 500  # per-tool budget
    assert sum(sizes[:2]) <= 1000  # total budget
    # (the third gets the few bytes left over: see test_for_llm_never_exceeds_total)
    assert [e["result"] for e in out[3:]] == ["[left out: the tool results budget is used up]"] * 2
    assert all(e["ok"] for e in out)


def test_for_llm_zero_total_leaves_everything_out() -> None:
    out = for_llm([_result("a", "x"), _result("b", ok=False, error="e")], per_tool=100, total=0)
    assert out == [
        {"tool": "a", "ok": True, "result": "[left out: the tool results budget is used up]"},
        {"tool": "b", "ok": False, "error": "[left out: the tool results budget is used up]"},
    ]


def test_for_llm_never_exceeds_total() -> None:
    # 3 results of exactly 390 bytes fit (1170 of 1180); the 4th gets a 10-byte budget, and clip() returns its
    # ~37-byte marker: the clipped results together exceed `total`.
    results = [_result(str(i), "x" * 390) for i in range(3)] + [_result("3", "y" * 390)]
    out = for_llm(results, per_tool=400, total=1180)
    clipped = [e["result"] for e in out if not e["result"].startswith("[left out")]
    assert sum(len(t.encode()) for t in clipped) <= 1180


@pytest.mark.parametrize(
    ("data", "per_tool", "expected", "was_clipped"),
    [
        ({"a": 1}, 100, {"a": 1}, False),
        ("short", 5, "short", False),
        ([1, 2, 3], 9, [1, 2, 3], False),  # "[1, 2, 3]" is 9 bytes
        (None, 4, None, False),
        ("x" * 100, 60, clip("x" * 100, 60), True),
        ({"k": "é" * 100}, 80, clip(json.dumps({"k": "é" * 100}, ensure_ascii=False), 80), True),
    ],
)
def test_for_metadata(data: Any, per_tool: int, expected: Any, was_clipped: bool) -> None:
    got, clipped = for_metadata(data, per_tool)
    assert (got, clipped) == (expected, was_clipped)


def test_for_metadata_keeps_json_valid() -> None:
    got, clipped = for_metadata({"r": float("nan"), "m": [float("inf"), 1.5]}, 100)
    assert not clipped and got == {"r": "nan", "m": ["inf", 1.5]}
    json.dumps(got, allow_nan=False)  # what jsonb and a JavaScript reader accept


def test_summary() -> None:
    small = summary(_result("a", {"k": "v"}), 100)
    assert small["result"] == {"k": "v"} and "resultTruncated" not in small
    assert small["tool"] == "a" and small["ok"] is True and small["params"] == {"p": 1}
    big = summary(_result("b", "x" * 500), 100)
    assert big["resultTruncated"] is True
    assert isinstance(big["result"], str) and len(big["result"].encode()) <= 100
    failed = summary(_result("c", ok=False, error="e" * 500), 100)
    assert failed["error"] == "e" * 500 and failed["code"] == "tool_failed"  # errors are not clipped here
    assert "result" not in failed and "resultTruncated" not in failed


# ---- secrets ---------------------------------------------------------------------------------------------------

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


def _secrets(*values: str) -> Secrets:
    s = Secrets(store=None, encryption_key="k", user_id="u")  # type: ignore[arg-type]
    for value in values:
        s.remember(value)
    return s


def test_redact_nothing_remembered_is_identity() -> None:
    s = _secrets()
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
    assert _secrets("TOPSECRET").redact(value) == expected


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
    s = _secrets(SECRET)
    assert s.used is True
    got = s.redact({"in": f"<<{variant}>>", variant: [variant]})
    assert got == {"in": f"<<{REDACTED}>>", REDACTED: [REDACTED]}


def test_redact_json_dumped_payload() -> None:
    s = _secrets(SECRET)
    body = json.dumps({"password": SECRET, "nested": [SECRET]})
    assert SECRET not in s.redact(body) and json.dumps(SECRET)[1:-1] not in s.redact(body)
    assert s.redact(body).count(REDACTED) == 2


@pytest.mark.parametrize("order", [("abc", "xxabcxx"), ("xxabcxx", "abc")])
def test_redact_secret_inside_another_secret(order: tuple[str, str]) -> None:
    s = _secrets(*order)
    # the longer one is replaced whole, whichever was remembered first
    assert s.redact("1 xxabcxx 2 abc 3") == f"1 {REDACTED} 2 {REDACTED} 3"


def test_secret_value_not_in_repr() -> None:
    from botworker.tools.secrets import Secret

    assert "TOPSECRET" not in repr(Secret("id", "n", "k", None, None, "TOPSECRET"))


# ---- retry -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", range(1, 11))
@pytest.mark.parametrize(("base", "cap"), [(0.5, 30.0), (1.0, 5.0), (0.0, 10.0), (2.0, 1000.0)])
def test_backoff_bounds(attempt: int, base: float, cap: float) -> None:
    ceiling = min(cap, base * 2 ** (attempt - 1))
    low = backoff(attempt, base, cap, rng=lambda: 0.0)
    high = backoff(attempt, base, cap, rng=lambda: 1.0)
    mid = backoff(attempt, base, cap, rng=lambda: 0.5)
    assert low == pytest.approx(ceiling / 2)
    assert high == pytest.approx(ceiling)
    assert low <= mid <= high <= cap
    assert high == pytest.approx(min(cap, base * 2 ** (attempt - 1)))


def test_backoff_grows_then_caps() -> None:
    highs = [backoff(n, 0.5, 10.0, rng=lambda: 1.0) for n in range(1, 11)]
    assert highs == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    assert backoff(0, 0.5, 10.0, rng=lambda: 1.0) == 0.5  # attempt < 1 counts as the first
    assert backoff(-3, 0.5, 10.0, rng=lambda: 0.0) == 0.25


def test_backoff_default_rng_in_range() -> None:
    for _ in range(200):
        assert 2.0 <= backoff(3, 1.0, 60.0) <= 4.0


NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        ("007", 7.0),
        (format_datetime(datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC), usegmt=True), 30.0),
        ("Wed, 01 May 2024 12:02:00 GMT", 120.0),
        ("Wed, 01 May 2024 14:02:00 +0200", 120.0),
        ("Wed, 01 May 2024 11:00:00 GMT", 0.0),  # in the past: now
        (None, None),
        ("", None),
        ("   ", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("1e3", None),
        ("Wed, 99 Foo 2024 12:00:00 GMT", None),
        ("Wed, 01 May", None),
    ],
)
def test_retry_after(value: str | None, expected: float | None) -> None:
    got = retry_after(value, now=lambda: NOW)
    assert got == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize("value", ["²", "1²", "³"])
def test_retry_after_unicode_digit_garbage_is_none(value: str) -> None:
    # str.isdigit() is True for superscripts (U+00B2 is in Latin-1, so a header can carry it) but float() refuses
    # them: the ValueError escapes instead of None ("unreadable").
    assert retry_after(value, now=lambda: NOW) is None


# ---- dispatch / ToolRunner -------------------------------------------------------------------------------------


class FakeFamily:
    """An in-memory tool family: each run pops the next outcome (an exception is raised, anything else returned)."""

    TYPES = ("fake", "mcp_tool")

    def __init__(self, *outcomes: Any, retryable: bool = False) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[ToolCall] = []
        self._retryable = retryable

    def retryable(self, tool: dict[str, Any]) -> bool:
        return self._retryable

    def run(self, call: ToolCall, tool: dict[str, Any], ctx: ToolContext) -> Any:
        self.calls.append(call)
        outcome = self.outcomes.pop(0) if self.outcomes else {"ok": True}
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class PlainFamily:
    """A family without ``retryable``."""

    TYPES = ("fake",)

    def __init__(self, *outcomes: Any) -> None:
        self.inner = FakeFamily(*outcomes)

    def run(self, call: ToolCall, tool: dict[str, Any], ctx: ToolContext) -> Any:
        return self.inner.run(call, tool, ctx)


def fake_tool(tid: str = "t1", name: str = "fake_tool", kind: str = "fake", **config: Any) -> dict[str, Any]:
    return {"id": tid, "name": name, "type": kind, "isActive": True, "config": config}


def make_ctx(
    tools: list[dict[str, Any]],
    user: dict[str, Any] | None = None,
    secrets: Secrets | None = None,
    bot: dict[str, Any] | None = None,
    **env: str,
) -> ToolContext:
    cfg = load_config(environ={"TOOL_RETRY_DELAY": "0", **env}, env_file=None)
    return ToolContext(
        user_id=OWNER,
        bot=bot if bot is not None else BOT,
        tools=tools,
        store=None,  # type: ignore[arg-type]
        cfg=cfg,
        user=user if user is not None else dict(ACTIVE_USER),
        secrets=secrets,
    )


def call_of(tool: dict[str, Any], **params: Any) -> ToolCall:
    return ToolCall(str(tool["id"]), tool["name"], tool["type"], None, params)


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def run(
    tool: dict[str, Any], family: Any, ctx: ToolContext | None = None, call: ToolCall | None = None, **params: Any
) -> tuple[ToolResult, Sleeps]:
    sleeps = Sleeps()
    ctx = ctx or make_ctx([tool])
    result = dispatch(call or call_of(tool, **params), ctx, {"fake": family, "mcp_tool": family}, sleep=sleeps)
    return result, sleeps


def test_dispatch_ok() -> None:
    tool = fake_tool()
    family = FakeFamily({"answer": 42})
    result, sleeps = run(tool, family, x="1")
    assert (result.ok, result.data, result.error, result.code, result.attempts) == (True, {"answer": 42}, None, None, 1)
    assert result.call.params == {"x": "1"}
    assert sleeps == [] and len(family.calls) == 1


def test_dispatch_unknown_tool_id_is_denied() -> None:
    tool = fake_tool()
    family = FakeFamily()
    result, _ = run(tool, family, call=ToolCall("nope", "ghost", "fake", None, {}))
    assert (result.ok, result.code) == (False, errors.TOOL_DENIED)
    assert result.error == "tool ghost is not an active tool of this bot"
    assert family.calls == [] and result.attempts == 1


def test_dispatch_unknown_type_is_unsupported() -> None:
    tool = fake_tool(kind="teleport")
    result = dispatch(call_of(tool), make_ctx([tool]), {"fake": FakeFamily()}, sleep=Sleeps())
    assert (result.ok, result.code) == (False, errors.TOOL_UNSUPPORTED)
    assert "'teleport' is not supported" in (result.error or "")


@pytest.mark.parametrize(
    ("tool", "ctx_args", "fragment"),
    [
        (fake_tool(), {"bot": {"userId": "someone-else"}}, "runs only for the owner"),
        ({**fake_tool(), "isActive": False}, {}, "is not active"),
        ({**fake_tool(), "requiresAuth": True}, {"user": {"id": OWNER, "isActive": False}}, "requires an authent"),
        (fake_tool(requiresAuth=True), {"user": {"id": OWNER}}, "requires an authenticated"),
        (fake_tool(roles=["admin"]), {}, "limited to the role(s) admin"),
    ],
)
def test_dispatch_access_denial(tool: dict[str, Any], ctx_args: dict[str, Any], fragment: str) -> None:
    family = FakeFamily()
    result, _ = run(tool, family, make_ctx([tool], **ctx_args))
    assert (result.ok, result.code) == (False, errors.TOOL_DENIED)
    assert fragment in (result.error or "")
    assert family.calls == []


def test_dispatch_without_user_row_uses_user_id() -> None:
    tool = fake_tool(requiresAuth=True)
    ctx = ToolContext(OWNER, BOT, [tool], None, make_ctx([]).cfg)  # type: ignore[arg-type]
    result = dispatch(call_of(tool), ctx, {"fake": FakeFamily()}, sleep=Sleeps())
    assert result.code == errors.TOOL_DENIED  # no users row: not an active user


@pytest.mark.parametrize(
    ("given", "fragment"),
    [({}, "parameter 'days' is required"), ({"days": "many"}, "parameter 'days' must be an integer")],
)
def test_dispatch_invalid_params(given: dict[str, Any], fragment: str) -> None:
    tool = fake_tool(parameters={"days": {"type": "integer", "required": True}})
    family = FakeFamily()
    result, _ = run(tool, family, **given)
    assert (result.ok, result.code) == (False, errors.TOOL_INVALID_PARAMS)
    assert fragment in (result.error or "")
    assert family.calls == []


def test_dispatch_family_sees_coerced_params() -> None:
    tool = fake_tool(parameters={"days": "integer", "unit": {"type": "string", "default": "c"}})
    family = FakeFamily()
    result, _ = run(tool, family, days="3", param1="x")
    assert family.calls[0].params == {"days": 3, "unit": "c", "param1": "x"}
    assert result.call.params == {"days": 3, "unit": "c", "param1": "x"}


def transient(msg: str = "timeout", retry_after: float | None = None) -> ToolFailure:
    return ToolFailure(msg, errors.TOOL_FAILED, transient=True, retry_after=retry_after)


@pytest.mark.parametrize(
    ("config", "retryable", "expected"),
    [
        ({}, False, 1),
        ({}, True, 4),  # TOOL_MAX_ATTEMPTS
        ({"retry": True}, False, 4),
        ({"retry": False}, True, 1),
        ({"retry": False, "maxAttempts": 5}, True, 1),
        ({"maxAttempts": 2}, False, 2),
        ({"maxAttempts": 7}, True, 7),  # maxAttempts is not bounded by TOOL_MAX_ATTEMPTS...
        ({"maxAttempts": 50}, False, 10),  # ...but by 10
        ({"maxAttempts": 0}, True, 4),  # invalid: ignored
        ({"maxAttempts": 0}, False, 1),
        ({"maxAttempts": True}, False, 1),  # a bool is not a count
        ({"maxAttempts": "3"}, False, 1),
        ({"retry": "yes"}, False, 1),  # only true opts in
    ],
)
def test_dispatch_retries_transient_failures(config: dict[str, Any], retryable: bool, expected: int) -> None:
    tool = fake_tool(**config)
    family = FakeFamily(*[transient(f"fail {i}") for i in range(20)], retryable=retryable)
    ticks: list[int] = []
    sleeps = Sleeps()
    ctx = make_ctx([tool], TOOL_MAX_ATTEMPTS="4")
    assert max_attempts(family, tool, ctx) == expected  # type: ignore[arg-type]
    result = dispatch(call_of(tool), ctx, {"fake": family}, tick=lambda: ticks.append(1), sleep=sleeps)
    assert (result.ok, result.attempts, len(family.calls)) == (False, expected, expected)
    assert result.error == f"fail {expected - 1}"
    assert result.code == errors.TOOL_FAILED
    assert sleeps == [0.0] * (expected - 1)  # TOOL_RETRY_DELAY=0
    assert len(ticks) == expected - 1


def test_dispatch_family_without_retryable_is_not_retried() -> None:
    tool = fake_tool()
    family = PlainFamily(transient(), transient())
    result, _ = run(tool, family)
    assert (result.ok, result.attempts) == (False, 1)
    tool = fake_tool(retry=True)
    family = PlainFamily(transient(), {"fine": 1})
    result, _ = run(tool, family)
    assert (result.ok, result.attempts, result.data) == (True, 2, {"fine": 1})


def test_dispatch_success_after_retries() -> None:
    tool = fake_tool()
    family = FakeFamily(transient(), transient(), "third time", retryable=True)
    result, sleeps = run(tool, family)
    assert (result.ok, result.data, result.attempts) == (True, "third time", 3)
    assert sleeps == [0.0, 0.0]


def test_dispatch_non_transient_failure_not_retried() -> None:
    tool = fake_tool(retry=True)
    family = FakeFamily(ToolFailure("404 not found", errors.TOOL_FAILED), "never")
    result, sleeps = run(tool, family)
    assert (result.ok, result.error, result.attempts, sleeps) == (False, "404 not found", 1, [])


def test_dispatch_backoff_uses_tool_retry_delay() -> None:
    tool = fake_tool(retry=True)
    family = FakeFamily(transient(), transient(), transient())
    sleeps = Sleeps()
    ctx = make_ctx([tool], TOOL_RETRY_DELAY="1", TOOL_MAX_ATTEMPTS="3")
    dispatch(call_of(tool), ctx, {"fake": family}, sleep=sleeps)
    assert len(sleeps) == 2
    assert 0.5 <= sleeps[0] <= 1.0 and 1.0 <= sleeps[1] <= 2.0


def test_dispatch_honours_retry_after() -> None:
    tool = fake_tool(retry=True)
    family = FakeFamily(transient("429", retry_after=2.5), transient("429", retry_after=0), "ok")
    result, sleeps = run(tool, family, make_ctx([tool], TOOL_RETRY_AFTER_MAX="3"))
    assert (result.ok, result.attempts) == (True, 3)
    assert sleeps == [2.5, 0]


def test_dispatch_retry_after_longer_than_max_ends_the_call() -> None:
    tool = fake_tool(retry=True)
    family = FakeFamily(transient("503 busy", retry_after=120), "never")
    result, sleeps = run(tool, family, make_ctx([tool], TOOL_RETRY_AFTER_MAX="30"))
    assert (result.ok, result.attempts, sleeps, len(family.calls)) == (False, 1, [], 1)
    assert result.error == "503 busy (the server asks to retry after 120s; TOOL_RETRY_AFTER_MAX is 30s)"
    assert result.code == errors.TOOL_FAILED


def test_dispatch_retry_after_on_last_attempt_is_just_the_failure() -> None:
    tool = fake_tool()  # not retryable: one attempt, the Retry-After is not mentioned
    result, sleeps = run(tool, FakeFamily(transient("503 busy", retry_after=120)))
    assert (result.error, sleeps) == ("503 busy", [])


def test_dispatch_unexpected_exception_is_internal_error_with_redacted_log(caplog: pytest.LogCaptureFixture) -> None:
    secrets = _secrets("TOPSECRET")
    tool = fake_tool()
    family = FakeFamily(ValueError("TOPSECRET leaked"))
    caplog.set_level(logging.DEBUG, logger="botworker")
    result, _ = run(tool, family, make_ctx([tool], secrets=secrets))
    assert (result.ok, result.code) == (False, errors.TOOL_FAILED)
    assert result.error == "internal error in tool fake_tool: ValueError"
    assert "Traceback" in caplog.text and "ValueError" in caplog.text
    assert f"{REDACTED} leaked" in caplog.text
    assert "TOPSECRET" not in caplog.text


def test_dispatch_unexpected_exception_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    tool = fake_tool()
    result, _ = run(tool, FakeFamily(KeyError("k")))
    assert result.error == "internal error in tool fake_tool: KeyError"
    assert "KeyError" in caplog.text


def test_dispatch_retry_log_is_redacted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="botworker")
    tool = fake_tool(retry=True)
    family = FakeFamily(transient("timeout calling https://u:TOPSECRET@h/"), "ok")
    result, _ = run(tool, family, make_ctx([tool], secrets=_secrets("TOPSECRET")))
    assert result.ok
    assert "retrying" in caplog.text and "TOPSECRET" not in caplog.text


def test_dispatch_result_and_error_are_redacted() -> None:
    secrets = _secrets("TOPSECRET")
    tool = fake_tool()
    data = {"token": "TOPSECRET", "TOPSECRET": ["xTOPSECRETx", 1], "n": None}
    result, _ = run(tool, FakeFamily(data), make_ctx([tool], secrets=secrets))
    assert result.data == {"token": REDACTED, REDACTED: [f"x{REDACTED}x", 1], "n": None}
    assert data["token"] == "TOPSECRET"  # the family's own object is not changed
    result, _ = run(tool, FakeFamily(ToolFailure("bad key TOPSECRET")), make_ctx([tool], secrets=secrets))
    assert result.error == f"bad key {REDACTED}"


def test_dispatch_secret_error_is_a_failed_result() -> None:
    tool = fake_tool()
    result, _ = run(tool, FakeFamily(SecretError("secret 1 not found")))
    assert (result.ok, result.error, result.code) == (False, "secret 1 not found", errors.TOOL_FAILED)


def test_dispatch_transient_error_propagates() -> None:
    tool = fake_tool(retry=True)
    family = FakeFamily(TransientError(errors.DATABASE_UNAVAILABLE, "db down"), "never")
    with pytest.raises(TransientError):
        run(tool, family)
    assert len(family.calls) == 1  # not retried as a tool failure


def test_dispatch_other_message_errors_are_internal_errors() -> None:
    tool = fake_tool()
    result, _ = run(tool, FakeFamily(errors.MessageError(errors.INVALID_MESSAGE, "x")))
    assert result.error == "internal error in tool fake_tool: MessageError"


# ToolRunner ------------------------------------------------------------------------------------------------------


def runner(tools: list[dict[str, Any]], family: Any = None, **ctx_args: Any) -> tuple[ToolRunner, Any]:
    family = family or FakeFamily()
    return ToolRunner(make_ctx(tools, **ctx_args), {"fake": family, "mcp_tool": family}), family


def test_runner_call_function_unknown_name() -> None:
    tools, family = runner([fake_tool()])
    result = tools.call_function("nope", {"a": 1})
    assert (result.ok, result.code, result.attempts) == (False, errors.TOOL_DENIED, 1)
    assert result.error == "there is no tool named 'nope'"
    assert (result.call.tool_id, result.call.type, result.call.params) == ("", "unknown", {"a": 1})
    assert tools.results == [result]
    assert family.calls == []


def test_runner_call_function_runs_and_records() -> None:
    tools, family = runner([fake_tool(name="weather api", parameters={"days": "integer"})])
    result = tools.call_function("weather_api", {"days": 3.0})
    assert result.ok and family.calls[0].params == {"days": 3}
    assert family.calls[0].name == "weather api"
    assert tools.call_function("weather_api", None).ok
    assert [r.ok for r in tools.results] == [True, True]


def test_runner_call_function_mcp_tool_pops_operation() -> None:
    platform = fake_tool("p", "platform", "mcp_tool")
    tools, family = runner([platform])
    args = {"operation": "search_platform", "query": "cats"}
    result = tools.call_function("platform", args)
    assert result.ok
    [call] = family.calls
    assert (call.type, call.operation, call.params) == ("mcp_tool", "search_platform", {"query": "cats"})
    assert args == {"operation": "search_platform", "query": "cats"}  # the caller's dict is not changed
    tools.call_function("platform", {"operation": ""})
    assert family.calls[1].operation is None


def test_runner_operation_stays_a_param_for_other_tools() -> None:
    tools, family = runner([fake_tool()])
    tools.call_function("fake_tool", {"operation": "x"})
    assert family.calls[0].operation is None and family.calls[0].params == {"operation": "x"}


def test_runner_declarations_skip_denied_and_unknown_types() -> None:
    ok = fake_tool("1", "weather", parameters={"city": {"type": "string", "required": True}})
    inactive = {**fake_tool("2", "inactive"), "isActive": False}
    admin_only = fake_tool("3", "admin_only", roles=["admin"])
    unknown = fake_tool("4", "teleport", kind="teleport")
    needs_auth = {**fake_tool("5", "needs_auth"), "requiresAuth": True}
    platform = fake_tool("6", "platform", "mcp_tool", operations=["list_models"])
    tools, _ = runner([ok, inactive, admin_only, unknown, needs_auth, platform])
    decls = tools.declarations()
    assert [d["name"] for d in decls] == ["weather", "needs_auth", "platform"]
    assert decls[0]["parameters"]["required"] == ["city"]
    assert decls[2]["parameters"]["properties"]["operation"]["enum"] == ["list_models"]
    # an inactive user loses the requiresAuth tool
    tools, _ = runner([ok, needs_auth], user={"id": OWNER, "isActive": False})
    assert [d["name"] for d in tools.declarations()] == ["weather"]


def test_runner_duplicate_names_get_distinct_function_names() -> None:
    a = fake_tool("1", "weather")
    b = fake_tool("2", "weather")
    c = fake_tool("3", "Weather!")  # the same function name after cleaning
    d = fake_tool("4", "x" * 80)
    e = fake_tool("5", "x" * 70)  # the same 64-character function name
    tools, family = runner([a, b, c, d, e])
    names = [decl["name"] for decl in tools.declarations()]
    assert len(set(names)) == 5
    assert names[0] == "weather" and names[3] == "x" * 64
    for name in names:
        assert len(name) <= 64 and name[0].isalpha()
    for name, tool in zip(names, [a, b, c, d, e], strict=True):
        tools.call_function(name, {})
        assert family.calls[-1].tool_id == tool["id"]


def test_runner_run_records_failures() -> None:
    tools, _ = runner([fake_tool()], family=FakeFamily(ToolFailure("nope")))
    result = tools.run(call_of(fake_tool()))
    assert not result.ok and tools.results == [result]
