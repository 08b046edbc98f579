"""The API server's side of the contract, for operators and tests: push a message and wait for its event.

``send`` subscribes to the ``bot_responses`` and ``bot_errors`` channels before it pushes, so it cannot miss the
answer, and it only listens: the events stay on their lists for the platform's own consumers.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

from .queue import ERRORS, MESSAGES, RESPONSES


def send(
    client: redis.Redis,
    bot_id: str,
    user_id: str,
    text: str,
    instance_id: str | None = None,
    timeout: float = 30.0,
    message_id: str | None = None,
) -> tuple[str, dict[str, Any]] | None:
    """Push one message; return ``("bot_responses" | "bot_errors", event)``, or None after ``timeout`` seconds."""
    message_id = message_id or str(uuid.uuid4())
    payload: dict[str, Any] = {"botId": bot_id, "userId": user_id, "message": text, "messageId": message_id}
    if instance_id:
        payload["instanceId"] = instance_id
    return push_and_wait(client, json.dumps(payload), message_id, timeout)


def push_and_wait(
    client: redis.Redis, raw: str, message_id: str | None, timeout: float
) -> tuple[str, dict[str, Any]] | None:
    """Push a raw payload; wait for the first event with this message id (any event if ``message_id`` is None)."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(RESPONSES, ERRORS)
    try:
        client.lpush(MESSAGES, raw)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            item = pubsub.get_message(timeout=min(left, 1.0))
            if item is None or item.get("type") != "message":
                continue
            event = json.loads(item["data"])
            if message_id is None or event.get("messageId") == message_id:
                channel = item["channel"].decode() if isinstance(item["channel"], bytes) else item["channel"]
                return channel, event
        return None
    finally:
        pubsub.close()
