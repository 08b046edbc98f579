"""``botworker migrate``: create the contract's tables where they are missing, and the worker's own indexes.

For development, tests and the demo only: in production the platform's API server owns the schema and the worker
runs against it without any migration. Everything here is ``IF NOT EXISTS``: an existing platform table is never
altered; the only thing added to one is an index (named ``botworker_*``), which speeds up history and the
exactly-once check but is not required.
"""

from __future__ import annotations

import psycopg

# Types and defaults follow what the platform's API server (TypeORM) creates; see shared CONTRACT.md.
_ENUMS = {
    "prompt_versions_type_enum": ("llm", "code_generation"),
    "bot_tools_type_enum": (
        "mcp_tool",
        "http_request",
        "database_query",
        "shell_command",
        "custom_script",
        "file_operation",
        "workflow_action",
    ),
    "bot_instances_status_enum": ("running", "stopped", "error", "starting", "stopping"),
    "chat_messages_role_enum": ("user", "bot", "system"),
}

_STAMPS = '"createdAt" timestamp NOT NULL DEFAULT now(), "updatedAt" timestamp NOT NULL DEFAULT now()'
# The platform uses uuid-ossp's uuid_generate_v4(); where that extension is not installed (the PyPI PostgreSQL
# build lacks it) the built-in gen_random_uuid() gives the same kind of id.
_ID = "id uuid PRIMARY KEY DEFAULT {uuid}()"

_TABLES = [
    f"""users ({_ID}, email varchar NOT NULL UNIQUE, password varchar NOT NULL DEFAULT '', "firstName" varchar,
        "lastName" varchar, role varchar NOT NULL DEFAULT 'user', "isActive" boolean NOT NULL DEFAULT true, {_STAMPS})""",
    f"""bots ({_ID}, name varchar NOT NULL, "displayName" varchar NOT NULL, description varchar,
        "isActive" boolean NOT NULL DEFAULT true, model varchar NOT NULL DEFAULT 'gemini-2.5-flash',
        "userId" uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE, {_STAMPS})""",
    f"""prompts ({_ID}, name varchar NOT NULL, description varchar,
        "userId" uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE, {_STAMPS})""",
    f"""prompt_versions ({_ID}, name varchar NOT NULL, content text NOT NULL,
        type prompt_versions_type_enum NOT NULL DEFAULT 'llm', version integer NOT NULL DEFAULT 1, description varchar,
        "isActive" boolean NOT NULL DEFAULT true, "promptId" uuid NOT NULL REFERENCES prompts(id) ON DELETE CASCADE,
        {_STAMPS})""",
    """bot_prompts ("botId" uuid NOT NULL REFERENCES bots(id) ON DELETE CASCADE,
        "promptId" uuid NOT NULL REFERENCES prompts(id) ON DELETE CASCADE, PRIMARY KEY ("botId", "promptId"))""",
    f"""bot_tools ({_ID}, name varchar NOT NULL, "displayName" varchar NOT NULL, description text,
        type bot_tools_type_enum NOT NULL, config jsonb NOT NULL DEFAULT '{{}}', "isActive" boolean NOT NULL DEFAULT true,
        "requiresAuth" boolean NOT NULL DEFAULT false, "botId" uuid NOT NULL REFERENCES bots(id) ON DELETE CASCADE,
        {_STAMPS})""",
    f"""bot_instances ({_ID}, "botId" uuid NOT NULL REFERENCES bots(id) ON DELETE CASCADE,
        "userId" uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        status bot_instances_status_enum NOT NULL DEFAULT 'stopped', "lastStartedAt" timestamp, "lastStoppedAt" timestamp,
        "errorMessage" varchar, metadata jsonb, {_STAMPS})""",
    f"""chat_messages ({_ID}, "botInstanceId" uuid NOT NULL REFERENCES bot_instances(id) ON DELETE CASCADE,
        "userId" uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE, role chat_messages_role_enum NOT NULL DEFAULT 'user',
        content text NOT NULL, metadata jsonb, "responseTime" integer, "tokensUsed" integer, {_STAMPS})""",
    f"""models ({_ID}, name varchar NOT NULL, "displayName" varchar, description text, schema jsonb,
        "isSystem" boolean NOT NULL DEFAULT false, "userId" uuid REFERENCES users(id) ON DELETE CASCADE, {_STAMPS})""",
    f"""applications ({_ID}, name varchar NOT NULL, "displayName" varchar, description text, config jsonb,
        status varchar NOT NULL DEFAULT 'draft', "userId" uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE, {_STAMPS})""",
    f"""secrets ({_ID}, name varchar NOT NULL, key varchar NOT NULL, "encryptedValue" text NOT NULL,
        type varchar NOT NULL DEFAULT 'api_key', provider varchar, "isActive" boolean NOT NULL DEFAULT true,
        "userId" uuid NOT NULL REFERENCES users(id) ON DELETE CASCADE, {_STAMPS})""",
]

# The worker's own indexes: history by instance and time, the exactly-once lookup by message id.
_INDEXES = [
    'botworker_chat_instance_created ON chat_messages ("botInstanceId", "createdAt")',
    "botworker_chat_message_id ON chat_messages ((metadata->>'messageId'))",
    'botworker_bot_tools_bot ON bot_tools ("botId")',
]


def migrate(dsn: str) -> list[str]:
    """Create what is missing; return the names of the tables and indexes that were created."""
    created: list[str] = []
    # Client-side binding: CREATE TYPE ... AS ENUM takes its labels as literals, not parameters.
    conn = psycopg.connect(dsn, connect_timeout=10, cursor_factory=psycopg.ClientCursor)
    try:
        with conn, conn.cursor() as cur:
            # Serialise concurrent `migrate` runs (tests start several) on one database.
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('botworker:migrate'))")
            cur.execute("SAVEPOINT ext")
            try:
                cur.execute('CREATE EXTENSION IF NOT EXISTS "uuid-ossp"')
                uuid_default = "uuid_generate_v4"
            except psycopg.Error:
                cur.execute("ROLLBACK TO SAVEPOINT ext")
                uuid_default = "gen_random_uuid"
            for name, labels in _ENUMS.items():
                cur.execute("SELECT 1 FROM pg_type WHERE typname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE TYPE {name} AS ENUM ({', '.join(['%s'] * len(labels))})", labels)
            for ddl in _TABLES:
                table = ddl.split(" ", 1)[0]
                cur.execute("SELECT to_regclass(%s)", (f"public.{table}",))
                if cur.fetchone()[0] is None:
                    cur.execute(f"CREATE TABLE {ddl}".replace("{uuid}", uuid_default))
                    created.append(table)
            for ddl in _INDEXES:
                index = ddl.split(" ", 1)[0]
                cur.execute("SELECT to_regclass(%s)", (f"public.{index}",))
                if cur.fetchone()[0] is None:
                    cur.execute(f"CREATE INDEX IF NOT EXISTS {ddl}")
                    created.append(index)
    finally:
        conn.close()
    return created
