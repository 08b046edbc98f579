"""``botworker demo``: seed a demo user and bot, run a real worker fleet, send a few messages, print the replies.

With no REDIS_URL/DATABASE_URL (nor REDIS_HOST/DB_HOST) configured it starts private throwaway servers first
(``devstack``). The fleet is started exactly as an operator would: ``python -m botworker run`` in a subprocess.
``seed`` is also what the tests use to create a realistic bot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from .client import push_and_wait, send
from .config import Config, load_config
from .queue import connect
from .schema import migrate
from .tools import platform

DEMO_USER = "00000000-0000-4000-8000-000000000001"
DEMO_BOT = "00000000-0000-4000-8000-000000000002"


def seed(dsn: str, user_id: str = DEMO_USER, bot_id: str = DEMO_BOT, email: str | None = None) -> tuple[str, str]:
    """Create (or keep) a user with models, applications, a bot with a prompt and a platform tool."""
    ns = uuid.UUID(bot_id)

    def rid(name: str) -> str:
        return str(uuid.uuid5(ns, name))

    conn = psycopg.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                """INSERT INTO users (id, email, password, "firstName", "lastName", role, "isActive")
                   VALUES (%s, %s, 'x', 'Ada', 'Lovelace', 'user', true) ON CONFLICT (id) DO NOTHING""",
                (user_id, email or f"ada-{user_id[:8]}@example.com"),
            )
            cur.execute(
                """INSERT INTO bots (id, name, "displayName", description, model, "userId")
                   VALUES (%s, 'helper', 'Helper Bot', 'Answers questions about your platform data',
                           'gemini-2.5-flash', %s) ON CONFLICT (id) DO NOTHING""",
                (bot_id, user_id),
            )
            cur.execute(
                """INSERT INTO prompts (id, name, "userId") VALUES (%s, 'persona', %s) ON CONFLICT (id) DO NOTHING""",
                (rid("prompt"), user_id),
            )
            cur.execute(
                """INSERT INTO prompt_versions (id, name, content, version, "isActive", "promptId")
                   VALUES (%s, 'v1', 'You are Helper Bot, a concise assistant for the platform.', 1, true, %s)
                   ON CONFLICT (id) DO NOTHING""",
                (rid("prompt-v1"), rid("prompt")),
            )
            cur.execute(
                """INSERT INTO bot_prompts ("botId", "promptId") VALUES (%s, %s) ON CONFLICT DO NOTHING""",
                (bot_id, rid("prompt")),
            )
            # The platform tool, a custom script and a shell command (both run in the worker's sandbox process),
            # and a database tool (one read-only statement, the user's choice bound as a parameter).
            for key, name, display, description, kind, config in _tools(user_id):
                cur.execute(
                    """INSERT INTO bot_tools (id, name, "displayName", description, type, config, "botId")
                       VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING""",
                    (rid(key), name, display, description, kind, Jsonb(config), bot_id),
                )
            models = (("sentiment", "Sentiment classifier"), ("churn", "Churn predictor"), ("vision", "Image tagger"))
            for name, display in models:
                cur.execute(
                    """INSERT INTO models (id, name, "displayName", description, schema, "userId")
                       VALUES (%s, %s, %s, %s, '{}', %s) ON CONFLICT (id) DO NOTHING""",
                    (rid("model-" + name), name, display, f"The {display.lower()}", user_id),
                )
            for name, status in (("crm", "published"), ("support-desk", "draft")):
                cur.execute(
                    """INSERT INTO applications (id, name, "displayName", description, config, status, "userId")
                       VALUES (%s, %s, %s, %s, '{}', %s, %s) ON CONFLICT (id) DO NOTHING""",
                    (rid("app-" + name), name, name.title(), f"The {name} application", status, user_id),
                )
    finally:
        conn.close()
    return user_id, bot_id


def _tools(user_id: str) -> list[tuple[str, str, str, str, str, dict[str, Any]]]:
    """The demo bot's tools: (id key, name, display name, description, type, config)."""
    return [
        ("tool", "platform", "Platform data", "Reads your models, applications, bots and more", "mcp_tool",
         {"operations": list(platform.OPERATIONS)}),
        ("tool-script", "word_count", "Word counter", "Counts the words of a quoted text", "custom_script",
         {"script": WORD_COUNT}),
        ("tool-shell", "greeter", "Greeter", "Greets whoever is quoted", "shell_command",
         {"command": "echo Hello, {{param1}}!", "timeout": 5}),
        ("tool-db", "app_status", "Application status", "Counts your applications in a status", "database_query",
         _app_status(user_id)),
    ]  # fmt: skip


def _app_status(user_id: str) -> dict[str, Any]:
    return {
        "query": 'SELECT count(*) AS applications FROM applications WHERE "userId" = '
        f"'{user_id}' AND status = '{{{{status}}}}'",
        "type": "select",
        "parameters": {"status": {"type": "string", "enum": ["draft", "published"], "default": "published"}},
    }


WORD_COUNT = """\
text = params.get("param1", "")
words = text.split()
print("counting", len(words), "words")
result = {"words": len(words), "longest": max(words, key=len) if words else None}
"""

DEMO_MESSAGES = [
    "Hello there!",
    "list my models",
    "show applications",
    "search for bots",
    "who am i",
    'run the word counter on "the quick brown fox jumps"',
    'ask the greeter to greet "Ada"',
    "check the application status status=draft",
]


def run_demo(cfg: Config, use_devstack: bool, procs: int = 2) -> int:
    """Set up, run a fleet, talk to it, stop it. Returns the exit code."""
    stack = None
    if use_devstack:
        from .devstack import DevStack

        print("Starting private Redis and PostgreSQL (set REDIS_URL and DATABASE_URL to use your own)...")
        stack = DevStack().start()
        redis_url, database_url = stack.redis_url, stack.database_url
    else:
        redis_url, database_url = cfg.redis_url, cfg.database_url
    fleet = None
    sandbox_root = None
    try:
        created = migrate(database_url)
        print(f"Schema ready ({len(created)} objects created). Seeding a demo user and bot...")
        user_id, bot_id = seed(database_url)
        env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url}
        if cfg.sources["sandbox_root"] == "default":
            sandbox_root = tempfile.mkdtemp(prefix="botworker-demo-sandbox-")
            os.chmod(sandbox_root, 0o755)
            env["SANDBOX_ROOT"] = sandbox_root
        fleet = subprocess.Popen(
            [sys.executable, "-m", "botworker", "run", "--procs", str(procs), "--log-level", "WARNING"], env=env
        )
        # Our own servers as configured (Sentinels, TLS, ACL user...), or the private Redis as a plain URL.
        ours = cfg if stack is None else load_config(environ={"REDIS_URL": redis_url}, env_file=None)
        client = connect(ours, decode_responses=True)
        print(f"Worker fleet started (pid {fleet.pid}, {procs} workers). Talking to bot {bot_id}:\n")
        instance_id = None
        for text in DEMO_MESSAGES:
            answer = send(client, bot_id, user_id, text, instance_id=instance_id, timeout=60)
            if answer is None:
                print(f"  you> {text}\n  (no answer within 60 s)")
                return 1
            channel, event = answer
            instance_id = event.get("instanceId") or instance_id
            print(f"  you> {text}")
            print(f"  bot> {_render(channel, event)}\n")
        malformed = json.dumps({"botId": "not-a-uuid", "userId": user_id, "message": "hi", "messageId": "demo-bad"})
        answer = push_and_wait(client, malformed, "demo-bad", 60)
        print(f"  (malformed message) -> {_render(*answer) if answer else 'no answer'}\n")
        print(f"Conversation {instance_id}: {2 * len(DEMO_MESSAGES)} rows in chat_messages.")
        return 0
    finally:
        if fleet is not None:
            fleet.send_signal(signal.SIGTERM)
            fleet.wait(timeout=60)
        if stack is not None:
            stack.stop()
        if sandbox_root is not None:
            shutil.rmtree(sandbox_root, ignore_errors=True)


def _render(channel: str, event: dict[str, Any]) -> str:
    if channel == "bot_errors":
        return f"[bot_errors {event['code']}] {event['error']}"
    meta = event["botResponse"].get("metadata") or {}
    return f"{event['botResponse']['content']}   [model {meta.get('model')}, {event['botResponse']['responseTime']} ms]"
