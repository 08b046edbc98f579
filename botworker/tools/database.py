"""``database_query`` tools: one SQL statement from the tool's config, with the call's parameters bound.

Config: ``{"query", "type"?: "select" | "insert" | "update" | "delete", "secretId"?, "retry"?, "maxAttempts"?}``.
- ``sql.py`` turns ``{{name}}`` placeholders into bound parameters and refuses anything but one statement, read by
  PostgreSQL's own parser before the server sees it; the statement must fit the type (``select`` tools: SELECT,
  including VALUES, TABLE and WITH ... SELECT);
- ``select`` tools run in a READ ONLY transaction (so a data-modifying CTE or function fails) and are rolled back;
  write types only when the config says so, in their own transaction, committed;
- every statement gets ``statement_timeout`` = DB_TOOL_TIMEOUT and at most DB_TOOL_MAX_ROWS rows come back;
- on the platform database the statement runs on a connection of its own, logged in as DB_TOOL_URL's role when
  set: the operator's way to keep tool authors away from tables such as ``users`` and ``secrets`` (a login, not
  ``SET ROLE``, which the tool's own SQL could undo with ``set_config('role', 'none', true)``);
- with ``secretId`` the connection string is that secret's value, and its host must pass the outbound policy
  (connections go to the checked address through libpq's ``hostaddr``).
Results: ``{"columns", "rows": [{column: value}], "rowCount", "truncated"}``, values made JSON-able.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from .. import errors
from ..errors import one_line
from ..message import ToolCall, jsonable
from . import ToolContext, ToolFailure, config_of, outbound, secret_id_of
from .sql import Prepared, SqlRefused, prepare

TYPES = ("database_query",)
KINDS = ("select", "insert", "update", "delete")
_TRANSIENT = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


def retryable(tool: dict[str, Any]) -> bool:
    return str(config_of(tool).get("type") or "select").lower() == "select"


def run(call: ToolCall, tool: dict[str, Any], ctx: ToolContext) -> Any:
    config = config_of(tool)
    kind = str(config.get("type") or "select").lower()
    prepared = _checked(config, kind, call.params)
    statement = prepared.sql
    if kind == "select":
        # Wrapped as a subquery: the row cap is applied by the server (nothing beyond it is produced or sent), and
        # the server itself refuses anything but one query inside the parentheses.
        statement = f"SELECT * FROM (\n{statement}\n) AS botworker_tool LIMIT {ctx.cfg.db_tool_max_rows + 1}"
    started = time.monotonic()
    try:
        with _connection(ctx, secret_id_of(config)) as conn, psycopg.RawCursor(conn, row_factory=dict_row) as cur:
            return _execute(cur, ctx, kind, statement, prepared)
    except psycopg.Error as exc:
        raise _failure(exc, ctx, time.monotonic() - started) from None


def _checked(config: dict[str, Any], kind: str, params: dict[str, Any]) -> Prepared:
    """The tool's statement with the call's values bound, or ToolFailure: the wrong type, not one statement of
    the kind its type allows."""
    if kind not in KINDS:
        raise ToolFailure(f"database_query type {kind!r} is not one of {', '.join(KINDS)}", errors.TOOL_INVALID_PARAMS)
    query = config.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ToolFailure("database_query tool has no `query` in its config")
    try:
        prepared = prepare(query, params)
    except SqlRefused as exc:
        raise ToolFailure(f"query refused: {exc}", errors.TOOL_INVALID_PARAMS) from None
    if prepared.kind != kind:
        raise ToolFailure(
            f"a {kind} tool may only run {kind.upper()} statements, not {prepared.kind.upper()}",
            errors.TOOL_INVALID_PARAMS,
        )
    return prepared


def _execute(cur: psycopg.RawCursor[Any], ctx: ToolContext, kind: str, statement: str, prepared: Prepared) -> Any:
    """One framed transaction: read-only for a select (rolled back when the connection is handed back), else
    committed."""
    limit = ctx.cfg.db_tool_max_rows
    # standard_conforming_strings is forced on because sql.py reads literals the way a server with it on does.
    # The frame is one simple query; the statement goes with its parameters ($1...) bound on the server (extended
    # protocol: one statement, values never in the statement text).
    cur.execute(
        f"BEGIN {'READ ONLY' if kind == 'select' else 'READ WRITE'}; "
        f"SET LOCAL statement_timeout = {int(ctx.cfg.db_tool_timeout * 1000)}; "
        "SET LOCAL standard_conforming_strings = on; SET LOCAL TimeZone = 'UTC'"
    )
    params = [_adapt(v) for v in prepared.params]
    if kind == "select":
        cur.execute(statement, params)
        return _rows(cur, cur.fetchall(), limit)
    if prepared.returning:
        # A write's RETURNING set can be huge: rows are streamed and only the first ones kept (the statement still
        # runs to its end, within the statement timeout, so the write is whole).
        kept: list[dict[str, Any]] = []
        for row in cur.stream(statement, params):
            if len(kept) <= limit:
                kept.append(row)
        result = _rows(cur, kept, limit)
    else:
        cur.execute(statement, params)
        result = _rows(cur, [], limit)
    cur.execute("COMMIT")
    return result


def _failure(exc: psycopg.Error, ctx: ToolContext, elapsed: float) -> ToolFailure:
    """What the tool reports for a failed statement (transient ones may be retried)."""
    if isinstance(exc, psycopg.errors.QueryCanceled):
        if elapsed >= ctx.cfg.db_tool_timeout * 0.9:
            return ToolFailure(f"the query took longer than {ctx.cfg.db_tool_timeout:g}s and was cancelled")
        return ToolFailure(f"the query was cancelled after {elapsed:.1f}s (not by its timeout)")
    if isinstance(exc, _TRANSIENT):
        return ToolFailure(f"the query failed: {_pgerror(exc)}", transient=True)
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return ToolFailure(f"the database is unreachable: {_pgerror(exc)}", transient=True)
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return ToolFailure("this select tool may not modify data (read-only transaction)", errors.TOOL_DENIED)
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return ToolFailure(f"permission denied: {_pgerror(exc)}", errors.TOOL_DENIED)
    if isinstance(exc, psycopg.errors.FeatureNotSupported) and "data-modifying" in _pgerror(exc):
        return ToolFailure("this select tool may not modify data", errors.TOOL_DENIED)  # WITH ... DELETE, wrapped
    return ToolFailure(f"the query failed: {_pgerror(exc)}")


def _adapt(value: Any) -> Any:
    """A parameter as psycopg binds it: objects as jsonb (lists stay arrays, scalars stay scalars)."""
    return Jsonb(value) if isinstance(value, dict) else value


@contextmanager
def _connection(ctx: ToolContext, secret_id: Any) -> Iterator[psycopg.Connection[Any]]:
    """A connection in autocommit mode (our own BEGIN frames the statement): the store's tool connection to the
    platform database (DB_TOOL_URL's login when set), or one to the DSN a secret holds, closed after the call."""
    if not secret_id:
        with ctx.store.tool_connection() as conn:
            yield conn
        return
    if ctx.secrets is None:
        raise ToolFailure("secrets are not available here")
    conn = _connect_dsn(ctx, ctx.secrets.get(secret_id).value)
    try:
        yield conn
    finally:
        conn.close()


def _connect_dsn(ctx: ToolContext, dsn: str) -> psycopg.Connection[Any]:
    """Connect to a tool's own database with what its DSN says and nothing of the worker's: libpq would otherwise
    fill what the DSN leaves out from the worker's environment and files (PGPASSWORD, ~/.pgpass, a client
    certificate), sending the worker's credentials to the tool's server."""
    try:
        parsed = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise ToolFailure(
            "the secret's value is not a PostgreSQL connection string", errors.TOOL_INVALID_PARAMS
        ) from None
    assert ctx.secrets is not None
    ctx.secrets.remember(str(parsed.get("password") or ""))
    unknown = sorted(set(parsed) - _DSN_KEYS)
    if unknown:
        raise ToolFailure(
            f"the secret's connection string may not set {', '.join(unknown)}", errors.TOOL_INVALID_PARAMS
        )
    host = str(parsed.get("host") or "")
    if not host or "," in host:
        raise ToolFailure("the secret's connection string must name exactly one host", errors.TOOL_INVALID_PARAMS)
    try:
        port = int(parsed.get("port") or 5432)
        address = outbound.pin_dsn_host(outbound.OutboundPolicy(ctx.cfg.http_allowed_hosts), host, port)
    except outbound.OutboundDenied as exc:
        raise ToolFailure(f"database host {host} is not allowed: {exc}", errors.TOOL_DENIED) from None
    except (OSError, ValueError) as exc:
        raise ToolFailure(f"cannot resolve database host {host}: {exc}", transient=True) from None
    if _is_platform(ctx, address, port):
        raise ToolFailure(
            "a tool's connection string may not point at the platform database (use a tool without secretId)",
            errors.TOOL_DENIED,
        )
    args = {
        **parsed,
        "hostaddr": address,  # connect to the address the policy checked, not whatever the name resolves to next
        "port": port,
        "password": parsed.get("password") or "",  # set (if empty): PGPASSWORD must not fill it
        "passfile": "/dev/null",
        "sslcert": "/nonexistent/botworker-no-client-cert",
        "sslkey": "/nonexistent/botworker-no-client-key",
        "connect_timeout": ctx.cfg.db_connect_timeout,
        "application_name": "botworker-tool",
    }
    try:
        conn = psycopg.connect(autocommit=True, prepare_threshold=None, **args)
    except psycopg.OperationalError as exc:
        text = _pgerror(exc)
        # A refused login will be refused again: only network trouble is worth a retry.
        transient = not any(w in text for w in ("authentication", "password", "does not exist", "no pg_hba"))
        raise ToolFailure(f"cannot connect to the database at {host}: {text}", transient=transient) from None
    return conn


def _is_platform(ctx: ToolContext, address: str, port: int) -> bool:
    """Whether (address, port) is the platform database's server (DATABASE_URL or DB_TOOL_URL): reaching it
    through a DSN would bypass DB_TOOL_URL's restricted login. A local server on a unix socket also listens on
    loopback, so any loopback address on its port counts."""
    for url in (ctx.cfg.database_url, ctx.cfg.db_tool_url):
        if not url:
            continue
        try:
            info = conninfo_to_dict(url)
        except psycopg.ProgrammingError:
            continue
        host, their_port = str(info.get("host") or ""), int(info.get("port") or 5432)
        if their_port != port:
            continue
        if (not host or host.startswith("/")) and ipaddress.ip_address(address).is_loopback:
            return True  # the platform server is local (a unix socket): it listens on loopback too
        try:
            theirs = {ai[4][0] for ai in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except OSError:
            continue
        if address in theirs:
            return True
    return False


# What a tool's DSN may say. Everything else (service files, password files, client certificates, krb/gss
# settings, target_session_attrs...) would make libpq read the worker's own files or environment.
_DSN_KEYS = {"host", "port", "dbname", "user", "password", "sslmode", "application_name", "connect_timeout", "options"}


def _rows(cur: psycopg.Cursor[Any], rows: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    if cur.description is None:  # INSERT/UPDATE/DELETE without RETURNING
        return {"columns": [], "rows": [], "rowCount": cur.rowcount, "truncated": False}
    columns = [c.name for c in cur.description]
    truncated = len(rows) > limit
    rows = rows[:limit]
    return {
        "columns": columns,
        "rows": [jsonable(row) for row in rows],
        "rowCount": cur.rowcount if cur.rowcount >= 0 else len(rows),
        "truncated": truncated,
    }


def _pgerror(exc: psycopg.Error) -> str:
    """The server's own one-line message (not the LINE/HINT lines under it), or the client's."""
    return one_line(exc.diag.message_primary or str(exc).strip().split("\n", 1)[0] or type(exc).__name__)
