"""Parsing and validation of raw payloads: every malformed shape gets the contract's error code."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from botworker import errors
from botworker.errors import MessageError
from botworker.message import Ids, Message, decode, message_id_of, parse_message, peek_ids, read

BOT = "11111111-1111-4111-8111-111111111111"
USER = "22222222-2222-4222-8222-222222222222"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def parse(payload: dict) -> object:
    return parse_message(payload, "m1", NOW, 16)


def test_valid_message() -> None:
    msg = parse({"botId": BOT.upper(), "userId": USER, "message": "hi", "instanceId": BOT})
    assert (msg.bot_id, msg.user_id, msg.text, msg.instance_id, msg.message_id) == (BOT, USER, "hi", BOT, "m1")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("not json", errors.INVALID_JSON),
        ("[1, 2]", errors.INVALID_JSON),
        ('"text"', errors.INVALID_JSON),
        (b"\xff\xfe", errors.INVALID_JSON),
    ],
)
def test_decode_rejects_non_objects(raw: str | bytes, code: str) -> None:
    with pytest.raises(MessageError) as err:
        decode(raw, 16)
    assert err.value.code == code


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"userId": USER, "message": "hi"}, errors.INVALID_MESSAGE),
        ({"botId": "nope", "userId": USER, "message": "hi"}, errors.INVALID_MESSAGE),
        ({"botId": 5, "userId": USER, "message": "hi"}, errors.INVALID_MESSAGE),
        ({"botId": BOT, "userId": None, "message": "hi"}, errors.INVALID_MESSAGE),
        ({"botId": BOT, "userId": USER}, errors.INVALID_MESSAGE),
        ({"botId": BOT, "userId": USER, "message": "   "}, errors.INVALID_MESSAGE),
        ({"botId": BOT, "userId": USER, "message": ["hi"]}, errors.INVALID_MESSAGE),
        ({"botId": BOT, "userId": USER, "message": "x" * 17}, errors.MESSAGE_TOO_LONG),
        ({"botId": BOT, "userId": USER, "message": "é" * 9}, errors.MESSAGE_TOO_LONG),  # 18 bytes in UTF-8
        ({"botId": BOT, "userId": USER, "message": "a\x00b"}, errors.INVALID_MESSAGE),
        ({"botId": BOT, "userId": USER, "message": "\ud800"}, errors.INVALID_MESSAGE),
        ({"botId": BOT, "userId": USER, "message": "hi", "instanceId": "x"}, errors.INVALID_MESSAGE),
        ({"botId": BOT, "userId": USER, "message": "hi", "messageId": ""}, errors.INVALID_MESSAGE),
        ({"botId": BOT, "userId": USER, "message": "hi", "messageId": {"a": 1}}, errors.INVALID_MESSAGE),
    ],
)
def test_invalid_messages(payload: dict, code: str) -> None:
    with pytest.raises(MessageError) as err:
        parse(payload)
    assert err.value.code == code and err.value.error


def test_huge_payload_is_refused_before_parsing() -> None:
    with pytest.raises(MessageError) as err:
        decode(json.dumps({"message": "x" * 10_000}), 16)
    assert err.value.code == errors.MESSAGE_TOO_LONG


def test_lone_surrogate_from_json_is_rejected_not_crashed() -> None:
    payload = decode(json.dumps({"botId": BOT, "userId": USER, "message": "\ud800"}), 16)
    with pytest.raises(MessageError):
        parse(payload)


def test_message_id_rules() -> None:
    assert message_id_of({"messageId": "abc"}) == "abc"
    assert message_id_of({"messageId": 42}) == "42"
    assert message_id_of({"messageId": True}) is None
    assert message_id_of({"messageId": "x" * 201}) is None
    assert message_id_of({}) is None


def test_peek_ids_keeps_only_strings() -> None:
    ids = peek_ids({"botId": BOT, "userId": 7, "instanceId": None}, "m")
    assert (ids.message_id, ids.bot_id, ids.user_id, ids.instance_id) == ("m", BOT, None, None)
    assert peek_ids([1], "m").bot_id is None


def test_read_gives_one_envelope_for_every_payload() -> None:
    unreadable = read(b"[1, 2]", 16, NOW)
    assert not unreadable.readable and unreadable.message is None and unreadable.error is not None
    assert unreadable.error.code == errors.INVALID_JSON and unreadable.ids.message_id  # an id of its own

    good = read(json.dumps({"botId": BOT, "userId": USER, "message": "hi", "messageId": "m7"}), 16, NOW)
    assert good.readable and good.error is None and good.rewritten is None and good.preview == "hi"
    assert good.message == Message(BOT, USER, "hi", "m7", None, NOW) and good.ids == Ids("m7", BOT, USER, None)

    unnamed = read(json.dumps({"botId": BOT, "userId": USER, "message": "hi"}), 16, NOW)
    assert unnamed.message is not None and unnamed.rewritten is not None
    assert json.loads(unnamed.rewritten)["messageId"] == unnamed.message.message_id == unnamed.ids.message_id

    invalid = read(json.dumps({"botId": BOT, "userId": "nope", "message": "hi", "messageId": "m8"}), 16, NOW)
    assert invalid.readable and invalid.message is None and invalid.error is not None
    assert invalid.error.code == errors.INVALID_MESSAGE and invalid.ids == Ids("m8", BOT, "nope", None)
