"""Configuration: one frozen ``Config``, built once by ``load_config`` and passed explicitly.

Precedence, lowest first: defaults < ``.env`` file < process environment < command-line flags. This is the only
module that reads ``os.environ``. Every setting is declared once in ``SETTINGS`` (variable name, type, default,
bounds, help), . An invalid value raises
``ConfigError`` with one line naming the variable.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from dotenv import dotenv_values

from .errors import ConfigError
from .parsers import addresses, boolean, choice, decimal, hosts, integer, level, readable_file, text, url


@dataclass(frozen=True)
class Setting:
    """One environment variable: how to parse it and what it means."""

    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str

    @property
    def default_text(self) -> str:
        """The default as the variable would be written ("" when there is none), for the docs and ``--help``."""
        value = self.default
        if isinstance(value, tuple):
            return ",".join(value)
        if isinstance(value, bool):
            return str(value).lower()
        return f"{value:g}" if isinstance(value, float) else str(value)


def setting(env: str, parse: Callable[[str], Any], default: Any, help: str) -> Any:
    """A ``Config`` field that is a setting: the one place its variable, parser, default and help are written."""
    return field(default=default, metadata={"setting": Setting(env, parse, default, help)})


@dataclass(frozen=True)
class Config:
    """Every setting of one run, each declared once, here: its variable, parser (with bounds), default and help.
    Built by ``load_config``; never mutated (SIGHUP builds a new one). The field order is the order of
    docs/configuration.md's table, which ``settings_table`` writes."""

    redis_url: str = setting(
        "REDIS_URL",
        url("redis", "rediss", "unix"),
        "",
        "full Redis URL (`rediss://`: TLS; `user:password@`: an ACL user); wins over "
        "REDIS_HOST/PORT/USERNAME/PASSWORD/DB",
    )
    redis_host: str = setting("REDIS_HOST", text, "localhost", "Redis host")
    redis_port: int = setting("REDIS_PORT", integer(1, 65535), 6379, "Redis port")
    redis_password: str = setting("REDIS_PASSWORD", text, "", "Redis password (never logged)")
    redis_db: int = setting("REDIS_DB", integer(0, 1023), 0, "Redis database number")
    redis_username: str = setting(
        "REDIS_USERNAME", text, "", "Redis ACL user (docs/operations.md has a least-privilege one); empty: `default`"
    )
    redis_tls: bool = setting("REDIS_TLS", boolean, False, "TLS to Redis (to its Sentinels too), as a rediss:// URL")
    redis_tls_ca_file: str = setting(
        "REDIS_TLS_CA",
        readable_file,
        "",
        "CA certificates (PEM) Redis's certificate must chain to; empty: the system's",
    )
    redis_tls_cert_file: str = setting(
        "REDIS_TLS_CERT", readable_file, "", "client certificate (PEM), for a Redis that asks for one"
    )
    redis_tls_key_file: str = setting(
        "REDIS_TLS_KEY", readable_file, "", "the client certificate's private key (PEM), if not in REDIS_TLS_CERT"
    )
    redis_tls_check_hostname: bool = setting(
        "REDIS_TLS_CHECK_HOSTNAME",
        boolean,
        True,
        "the certificate must name the host connected to (the chain is always verified)",
    )
    redis_sentinels: tuple[str, ...] = setting(
        "REDIS_SENTINELS",
        addresses(26379),
        (),
        "Sentinels, host:port,...: they name the master; REDIS_URL's host and port are then ignored",
    )
    redis_sentinel_master: str = setting(
        "REDIS_SENTINEL_MASTER", text, "mymaster", "the name the Sentinels monitor the master under"
    )
    redis_sentinel_username: str = setting(
        "REDIS_SENTINEL_USERNAME", text, "", "ACL user of the Sentinels, if they require one"
    )
    redis_sentinel_password: str = setting(
        "REDIS_SENTINEL_PASSWORD", text, "", "password of the Sentinels, if they require one (never logged)"
    )
    database_url: str = setting(
        "DATABASE_URL", url("postgres", "postgresql"), "", "full PostgreSQL URL; wins over DB_*"
    )
    db_host: str = setting("DB_HOST", text, "localhost", "PostgreSQL host")
    db_port: int = setting("DB_PORT", integer(1, 65535), 5432, "PostgreSQL port")
    db_user: str = setting("DB_USER", text, "postgres", "PostgreSQL user")
    db_password: str = setting("DB_PASSWORD", text, "", "PostgreSQL password (never logged)")
    db_name: str = setting("DB_NAME", text, "botplatform", "PostgreSQL database")
    gemini_key: str = setting("GEMINI_KEY", text, "", "Gemini API key; unset: the offline responder answers")
    gemini_base_url: str = setting(
        "GEMINI_BASE_URL", url("http", "https"), "", "Gemini API base URL (a proxy, a test server); empty: Google's"
    )
    gemini_timeout: float = setting("GEMINI_TIMEOUT", decimal(1, 600), 30.0, "timeout (s) of one Gemini request")
    gemini_model: str = setting(
        "GEMINI_MODEL", text, "", "model for every bot; empty: the bot's `model` column (default gemini-2.5-flash)"
    )
    llm_max_rounds: int = setting(
        "LLM_MAX_ROUNDS", integer(1, 20), 5, "function-calling rounds per reply, then it answers"
    )
    llm_max_tool_calls: int = setting(
        "LLM_MAX_TOOL_CALLS", integer(0, 1000), 10, "tool calls the model may make per reply (more are refused)"
    )
    llm_max_attempts: int = setting(
        "LLM_MAX_ATTEMPTS", integer(1, 10), 4, "attempts of one Gemini request on 429/5xx/timeouts (back-off, jitter)"
    )
    llm_retry_delay: float = setting(
        "LLM_RETRY_DELAY", decimal(0, 60), 1.0, "first back-off (s) of a retried Gemini request; doubles, with jitter"
    )
    llm_deadline: float = setting(
        "LLM_DEADLINE", decimal(1, 3600), 60.0, "total time (s) for one reply: all rounds and retries"
    )
    llm_history_tokens: int = setting(
        "LLM_HISTORY_TOKENS", integer(0, 10**6), 8000, "token budget of the conversation history sent (oldest out)"
    )
    encryption_key: str = setting(
        "ENCRYPTION_KEY", text, "", "the platform's key for `secrets.encryptedValue` (never logged); unset: no secrets"
    )
    http_allowed_hosts: tuple[str, ...] = setting(
        "HTTP_ALLOWED_HOSTS",
        hosts,
        (),
        "CIDRs and host names (`*.corp.example`) tools may reach although private/loopback/link-local",
    )
    http_timeout: float = setting("HTTP_TIMEOUT", decimal(0.1, 600), 10.0, "default timeout (s) of an HTTP tool call")
    http_max_timeout: float = setting(
        "HTTP_MAX_TIMEOUT", decimal(0.1, 600), 60.0, "cap on an HTTP tool's own `timeout`"
    )
    http_max_response_bytes: int = setting(
        "HTTP_MAX_RESPONSE_BYTES", integer(1024, 64 << 20), 1 << 20, "largest HTTP tool response body read"
    )
    db_tool_timeout: float = setting(
        "DB_TOOL_TIMEOUT", decimal(0.1, 600), 10.0, "statement timeout (s) of database tools"
    )
    db_tool_max_rows: int = setting("DB_TOOL_MAX_ROWS", integer(1, 100000), 100, "rows a database tool returns at most")
    db_tool_url: str = setting(
        "DB_TOOL_URL",
        url("postgres", "postgresql"),
        "",
        "PostgreSQL URL database tools use on the platform database (a restricted login); empty: DATABASE_URL",
    )
    tool_max_attempts: int = setting(
        "TOOL_MAX_ATTEMPTS", integer(1, 10), 3, "attempts of a retryable tool call (idempotent, or opted in)"
    )
    tool_retry_delay: float = setting("TOOL_RETRY_DELAY", decimal(0, 60), 0.5, "first tool retry back-off (s); doubles")
    tool_retry_after_max: float = setting(
        "TOOL_RETRY_AFTER_MAX",
        decimal(0, 600),
        30.0,
        "longest `Retry-After` (s) honoured, and the most one call waits in retries in all",
    )
    tool_result_budget: int = setting(
        "TOOL_RESULT_BUDGET", integer(256, 1 << 20), 4000, "bytes of one tool result the LLM sees (and metadata keeps)"
    )
    tool_results_budget: int = setting(
        "TOOL_RESULTS_BUDGET",
        integer(256, 4 << 20),
        12000,
        "bytes of all tool results of a message the LLM sees (and metadata keeps)",
    )
    procs: int = setting("WORKER_PROCS", integer(1, 256), 2, "worker processes (flag --procs): about one per core")
    worker_threads: int = setting(
        "WORKER_THREADS",
        integer(1, 1024),
        16,
        "consumer threads per worker process (flag --threads): replies in flight while waiting on the LLM or tools",
    )
    worker_batch: int = setting(
        "WORKER_BATCH",
        integer(1, 100),
        8,
        "messages a thread takes at once when a backlog builds, replies not waiting on a model (1: one at a time)",
    )
    cpu_slots: int = setting(
        "WORKER_CPU_SLOTS",
        integer(1, 64),
        1,
        "threads of a worker process that run the CPU-bound part of a message at once (the rest wait or queue)",
    )
    max_message_bytes: int = setting(
        "MAX_MESSAGE_BYTES", integer(1, 1 << 20), 16384, "longest accepted `message` (UTF-8 bytes)"
    )
    max_attempts: int = setting("MAX_ATTEMPTS", integer(1, 100), 3, "attempts before a message is dead-lettered")
    dead_letter_max: int = setting(
        "DEAD_LETTER_MAX", integer(0, 10**8), 10_000, "dead letters kept in bot_messages:dead, newest first (0: all)"
    )
    dead_letter_days: float = setting(
        "DEAD_LETTER_DAYS",
        decimal(0, 3650),
        30.0,
        "dead letters older than this are dropped by the supervisors (0: never)",
    )
    retry_delay: float = setting(
        "RETRY_DELAY", decimal(0, 300), 1.0, "first back-off (s) before retrying a transient failure; doubles"
    )
    history_limit: int = setting("HISTORY_LIMIT", integer(0, 1000), 10, "conversation messages loaded as history")
    pop_timeout: float = setting(
        "POP_TIMEOUT", decimal(0.1, 30), 1.0, "BLMOVE timeout (s): how often an idle worker checks for shutdown"
    )
    graceful_timeout: float = setting(
        "GRACEFUL_TIMEOUT",
        decimal(0, 3600),
        75.0,
        "warm shutdown: time (s) in-flight messages get to finish; keep it above LLM_DEADLINE",
    )
    worker_timeout: float = setting(
        "WORKER_TIMEOUT", decimal(2, 3600), 120.0, "a worker silent this long (s) is killed and replaced"
    )
    boot_timeout: float = setting(
        "BOOT_TIMEOUT",
        decimal(0, 3600),
        30.0,
        "how long (s) the node's first workers retry Redis/PostgreSQL at start (respawned ones wait as needed)",
    )
    node_ttl: float = setting(
        "NODE_TTL",
        decimal(3, 3600),
        20.0,
        "heartbeat key expiry (s): a dead host's messages are back in line within this plus half a second",
    )
    max_requests: int = setting(
        "MAX_REQUESTS", integer(0, 10**9), 0, "recycle a worker after this many messages (0: never)"
    )
    max_requests_jitter: int = setting(
        "MAX_REQUESTS_JITTER",
        integer(0, 10**9),
        0,
        "each worker recycles after MAX_REQUESTS plus a random 0..this many messages, so they do not restart together",
    )
    max_worker_memory: int = setting(
        "MAX_WORKER_MEMORY",
        integer(0, 1 << 20),
        0,
        "MiB of resident memory (the worker process's own) past which it recycles after its messages in hand; 0: never",
    )
    db_pool_size: int = setting(
        "DB_POOL_SIZE",
        integer(0, 64),
        0,
        "PostgreSQL connections of a worker process's pool; 0: WORKER_CPU_SLOTS + 1, at most WORKER_THREADS",
    )
    db_connect_timeout: int = setting(
        "DB_CONNECT_TIMEOUT", integer(1, 300), 5, "PostgreSQL connect timeout (s), and the wait for a pooled connection"
    )
    db_statement_timeout: float = setting(
        "DB_STATEMENT_TIMEOUT", decimal(0.1, 3600), 30.0, "PostgreSQL statement timeout (s), set in each transaction"
    )
    db_prepare: bool = setting(
        "DB_PREPARE",
        boolean,
        True,
        "prepare the per-message statements once per connection (set false behind PgBouncer in transaction mode)",
    )
    redis_timeout: float = setting(
        "REDIS_TIMEOUT", decimal(0.5, 300), 5.0, "Redis socket timeout (s), on top of the BLMOVE wait"
    )
    sandbox_root: str = setting(
        "SANDBOX_ROOT", text, "/var/lib/botworker/sandbox", "sandbox state: each bot's files (and weak-mode work dirs)"
    )
    sandbox_uid: int = setting(
        "SANDBOX_UID",
        integer(1, 2**31 - 1),
        100000,
        "first uid of sandboxed runs when run as root (worker N's runs: SANDBOX_UID + N * SANDBOX_CONCURRENCY + lane)",
    )
    sandbox_concurrency: int = setting(
        "SANDBOX_CONCURRENCY",
        integer(1, 64),
        4,
        "sandboxed runs a worker process runs at once (one bot's: one fewer); more wait in line",
    )
    sandbox_gid: int = setting("SANDBOX_GID", integer(1, 2**31 - 1), 100000, "gid of sandboxed runs when run as root")
    sandbox_allow_weak: bool = setting(
        "SANDBOX_ALLOW_WEAK",
        boolean,
        False,
        "DEVELOPMENT ONLY: run tools with weaker confinement when namespaces are unavailable",
    )
    node_name: str = setting("NODE_NAME", text, "", "this host's name in heartbeats and status (default: hostname)")
    log_level: str = setting("LOG_LEVEL", level, "INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = setting(
        "LOG_FORMAT", choice("text", "json"), "text", "text, or json: one object per line with messageId and botId"
    )
    metrics_port: int = setting(
        "METRICS_PORT",
        integer(0, 65535),
        0,
        "port of the supervisor's Prometheus endpoint, GET /metrics, for all its workers (0: no metrics)",
    )
    metrics_addr: str = setting(
        "METRICS_ADDR", text, "127.0.0.1", "address the metrics endpoint listens on (0.0.0.0: every interface)"
    )
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)  # name -> where it came from

    @property
    def pool_size(self) -> int:
        """PostgreSQL connections per worker process: DB_POOL_SIZE, or sized to the database work of the threads:
        loads and saves run in a CPU slot (one per slot), plus one for platform tools, which run outside them."""
        return self.db_pool_size or min(self.worker_threads, self.cpu_slots + 1)

    def warnings(self) -> list[str]:
        """Settings that are valid but work against each other: logged at start and on reload."""
        found = []
        if self.graceful_timeout < self.llm_deadline:
            found.append(
                f"GRACEFUL_TIMEOUT={self.graceful_timeout:g} is shorter than LLM_DEADLINE={self.llm_deadline:g}: a "
                "warm stop may kill replies in progress (their messages are requeued, and their tools run again)"
            )
        return found

    def redacted(self) -> dict[str, Any]:
        """The settings with passwords and keys hidden, for logs and `status`."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "sources":
                continue
            value = getattr(self, f.name)
            if f.name.endswith(("_key", "_password")):
                value = "set" if value else "unset"
            elif f.name.endswith("url"):
                value = redact_url(value)
            out[f.name] = value
        return out


# Field name -> setting, in declaration order.
SETTINGS: dict[str, Setting] = {f.name: f.metadata["setting"] for f in fields(Config) if "setting" in f.metadata}


def settings_table() -> str:
    """docs/configuration.md's table, from the declarations."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS.values():
        shown = f"`{s.default_text}` " if s.default_text else ""
        rows.append(f"| `{s.env}` | {shown}| {s.help} |")
    return "\n".join(rows) + "\n"


def _shown(name: str, raw: str) -> str:
    """A value as an error message may quote it: URLs without their password, secrets not at all."""
    if name.endswith(("_password", "_key")):
        return "***"
    if name.endswith("url"):
        try:
            return redact_url(raw)
        except ValueError:
            return "***"
    return raw


def redact_url(url: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://user:***@host``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = ".env",
    env_file_required: bool = False,
) -> Config:
    """Build the Config: defaults < .env < environment < flags (flags use field names, None means unset).
    ``env_file`` is skipped when it does not exist, unless ``env_file_required`` (a file the operator named: a typo
    must not start a worker on defaults); one that exists but cannot be read is a ConfigError either way."""
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if env_file and (env_file_required or Path(env_file).exists()):
        try:
            with open(env_file, encoding="utf-8") as stream:
                found = dotenv_values(stream=stream)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"settings file {env_file}: {reason}") from None
        layers.append((f"file {env_file}", {k: v for k, v in found.items() if v is not None}))
    layers.append(("environment", os.environ if environ is None else environ))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, setting in SETTINGS.items():
        values[name], sources[name] = setting.default, "default"
        for source, layer in layers:
            raw = layer.get(setting.env)
            if raw is None or (raw == "" and setting.default not in ("", None)):
                continue
            try:
                values[name] = setting.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{setting.env}={_shown(name, raw)!r} (from {source}) is invalid: {exc}") from None
            sources[name] = source
    for name, value in (flags or {}).items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        try:
            values[name], sources[name] = SETTINGS[name].parse(str(value)), "command line"
        except ValueError as exc:
            raise ConfigError(
                f"{flag}={_shown(name, str(value))!r} (from the command line) is invalid: {exc}"
            ) from None

    if values["worker_timeout"] <= values["pop_timeout"] + 1:
        # An idle worker beats once per BLMOVE wait; a shorter timeout would kill idle workers in a loop.
        raise ConfigError(
            f"WORKER_TIMEOUT={values['worker_timeout']:g} (from {sources['worker_timeout']}) is invalid: it must be "
            f"longer than POP_TIMEOUT + 1 = {values['pop_timeout'] + 1:g} seconds"
        )
    # One blocking call must fit in a heartbeat interval, or the supervisor would kill a worker that is only waiting.
    for name in ("http_max_timeout", "db_tool_timeout", "gemini_timeout"):
        if values[name] >= values["worker_timeout"]:
            raise ConfigError(
                f"{SETTINGS[name].env}={values[name]:g} (from {sources[name]}) is invalid: it must be shorter than "
                f"WORKER_TIMEOUT={values['worker_timeout']:g}"
            )
    _check_redis(values, sources)
    return Config(
        **{
            **values,
            "redis_url": values["redis_url"] or _redis_url(values),
            "database_url": values["database_url"] or _database_url(values),
            "node_name": values["node_name"] or socket.gethostname(),
        },
        sources=sources,
    )


def _check_redis(v: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """Redis settings that contradict each other: each would otherwise be silently ignored (a CA file with a
    plain-text connection, a Sentinel with a socket path)."""

    def invalid(name: str, why: str) -> ConfigError:
        return ConfigError(f"{SETTINGS[name].env} (from {sources[name]}) is invalid: {why}")

    scheme = urlsplit(v["redis_url"]).scheme if v["redis_url"] else ""
    if v["redis_tls"] and scheme in ("redis", "unix"):
        raise invalid("redis_tls", f"REDIS_URL is {scheme}://, not rediss://")
    tls = v["redis_tls"] or scheme == "rediss"
    for name in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file"):
        if v[name] and not tls:
            raise invalid(name, "set, but Redis is not reached over TLS (REDIS_URL=rediss://... or REDIS_TLS=true)")
    if v["redis_tls_key_file"] and not v["redis_tls_cert_file"]:
        raise invalid("redis_tls_key_file", "set without REDIS_TLS_CERT")
    if v["redis_sentinels"] and scheme == "unix":
        raise invalid("redis_sentinels", "Sentinels name a TCP master; REDIS_URL is a unix:// socket")
    if v["redis_sentinels"] and not v["redis_sentinel_master"]:
        raise invalid("redis_sentinel_master", "empty, with REDIS_SENTINELS set")


def _redis_url(v: Mapping[str, Any]) -> str:
    user, password = quote(v["redis_username"], safe=""), quote(v["redis_password"], safe="")
    auth = f"{user}:{password}@" if password else f"{user}@" if user else ""
    scheme = "rediss" if v["redis_tls"] else "redis"
    return f"{scheme}://{auth}{v['redis_host']}:{v['redis_port']}/{v['redis_db']}"


def _database_url(v: Mapping[str, Any]) -> str:
    password = f":{quote(v['db_password'], safe='')}" if v["db_password"] else ""
    user = quote(v["db_user"], safe="")
    return f"postgresql://{user}{password}@{v['db_host']}:{v['db_port']}/{quote(v['db_name'], safe='')}"
