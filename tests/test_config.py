"""Configuration: precedence (defaults < .env < environment < flags), seed variable names, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from botworker.config import SETTINGS, load_config, redact_url, settings_table
from botworker.errors import ConfigError


def test_defaults_build_urls_from_seed_variables() -> None:
    cfg = load_config(environ={}, env_file=None)
    assert cfg.redis_url == "redis://localhost:6379/0"
    assert cfg.database_url == "postgresql://postgres@localhost:5432/botplatform"
    assert cfg.procs == 2 and cfg.max_attempts == 3 and cfg.max_message_bytes == 16384 and cfg.history_limit == 10


def test_seed_variable_names_work_and_passwords_are_quoted() -> None:
    env = {
        "DB_HOST": "db.internal",
        "DB_PORT": "6543",
        "DB_USER": "bot",
        "DB_PASSWORD": "p@ss:w/rd",
        "DB_NAME": "platform",
        "REDIS_HOST": "cache",
        "REDIS_PORT": "6380",
        "REDIS_PASSWORD": "s3cr@t",
        "REDIS_DB": "4",
        "GEMINI_KEY": "k",
    }
    cfg = load_config(environ=env, env_file=None)
    assert cfg.database_url == "postgresql://bot:p%40ss%3Aw%2Frd@db.internal:6543/platform"
    assert cfg.redis_url == "redis://:s3cr%40t@cache:6380/4"
    assert cfg.gemini_key == "k"
    assert "s3cr" not in str(cfg.redacted()) and "p%40ss" not in str(cfg.redacted())


def test_full_urls_win_over_parts() -> None:
    env = {"REDIS_URL": "redis://r:1/2", "REDIS_HOST": "ignored", "DATABASE_URL": "postgresql://u@h/d", "DB_HOST": "x"}
    cfg = load_config(environ=env, env_file=None)
    assert (cfg.redis_url, cfg.database_url) == ("redis://r:1/2", "postgresql://u@h/d")


def test_precedence_defaults_dotenv_environment_flags(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("WORKER_PROCS=3\nMAX_ATTEMPTS=7\nHISTORY_LIMIT=4\n")
    cfg = load_config(environ={"MAX_ATTEMPTS": "5"}, env_file=env_file)
    assert (cfg.procs, cfg.max_attempts, cfg.history_limit) == (3, 5, 4)
    assert cfg.sources["procs"].startswith("file") and cfg.sources["max_attempts"] == "environment"
    cfg = load_config({"procs": 9}, environ={"WORKER_PROCS": "5"}, env_file=env_file)
    assert cfg.procs == 9 and cfg.sources["procs"] == "command line"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("WORKER_PROCS", "abc"),
        ("WORKER_PROCS", "0"),
        ("MAX_ATTEMPTS", "-1"),
        ("REDIS_PORT", "70000"),
        ("REDIS_URL", "http://x"),
        ("DATABASE_URL", "mysql://x"),
        ("LOG_LEVEL", "LOUD"),
        ("POP_TIMEOUT", "nan"),
    ],
)
def test_invalid_value_names_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(environ={var: value}, env_file=None)
    assert var in str(err.value) and "\n" not in str(err.value)


def test_worker_timeout_must_outlast_an_idle_wait() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(environ={"POP_TIMEOUT": "3", "WORKER_TIMEOUT": "2"}, env_file=None)
    assert "WORKER_TIMEOUT" in str(err.value) and "POP_TIMEOUT" in str(err.value)


def test_config_is_frozen() -> None:
    cfg = load_config(environ={}, env_file=None)
    with pytest.raises(AttributeError):
        cfg.procs = 5  # type: ignore[misc]


def test_the_documented_settings_are_the_declared_ones() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert settings_table() in docs, "docs/configuration.md's table is out of date: run ./dev docs"
    assert all(f"| `{s.env}` |" in settings_table() for s in SETTINGS.values())


def test_flags_are_validated_like_the_environment() -> None:
    with pytest.raises(ConfigError, match=r"--procs='0' .* must be between 1 and 256"):
        load_config({"procs": 0}, environ={}, env_file=None)
    assert load_config({"procs": "7"}, environ={}, env_file=None).procs == 7


def test_redact_url() -> None:
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("postgresql://u@h/d") == "postgresql://u@h/d"


def test_a_single_blocking_call_must_fit_in_the_worker_timeout() -> None:
    with pytest.raises(ConfigError, match=r"HTTP_MAX_TIMEOUT=200.*WORKER_TIMEOUT=120"):
        load_config(environ={"HTTP_MAX_TIMEOUT": "200"}, env_file=None)
    assert (
        load_config(environ={"HTTP_MAX_TIMEOUT": "200", "WORKER_TIMEOUT": "300"}, env_file=None).http_max_timeout == 200
    )


def test_a_named_settings_file_must_exist_and_be_readable(tmp_path: Path) -> None:
    assert load_config(environ={}, env_file=tmp_path / "absent.env").procs == 2  # the default .env may be absent
    with pytest.raises(ConfigError, match=r"absent\.env: No such file"):
        load_config(environ={}, env_file=tmp_path / "absent.env", env_file_required=True)
    with pytest.raises(ConfigError, match="Is a directory"):
        load_config(environ={}, env_file=tmp_path)


def test_settings_options_count_before_and_after_the_verb(tmp_path: Path) -> None:
    from botworker.__main__ import _parser, main

    before = _parser().parse_args(["--env-file", "x.env", "--log-level", "debug", "status"])
    after = _parser().parse_args(["dead", "list", "--env-file", "y.env"])
    assert (before.env_file, before.log_level, after.env_file, after.log_level) == ("x.env", "DEBUG", "y.env", None)
    assert main(["--env-file", str(tmp_path / "typo.env"), "status"]) == 3  # EXIT_CONFIG, not a run on defaults


def test_redis_user_and_tls_build_the_url_and_the_url_wins() -> None:
    env = {"REDIS_USERNAME": "bot worker", "REDIS_PASSWORD": "p@ss", "REDIS_HOST": "cache", "REDIS_TLS": "yes"}
    cfg = load_config(environ=env, env_file=None)
    assert cfg.redis_url == "rediss://bot%20worker:p%40ss@cache:6379/0"
    assert "p%40ss" not in str(cfg.redacted())
    assert load_config(environ={"REDIS_USERNAME": "u"}, env_file=None).redis_url == "redis://u@localhost:6379/0"
    cfg = load_config(environ={"REDIS_URL": "redis://app:pw@r:1/2", "REDIS_USERNAME": "ignored"}, env_file=None)
    assert cfg.redis_url == "redis://app:pw@r:1/2"


def test_sentinels_are_host_port_pairs() -> None:
    env = {"REDIS_SENTINELS": " 10.0.0.1:26380, sentinel-b ,[::1]:5000,", "REDIS_SENTINEL_PASSWORD": "sp"}
    cfg = load_config(environ=env, env_file=None)
    assert cfg.redis_sentinels == ("10.0.0.1:26380", "sentinel-b:26379", "[::1]:5000")
    assert cfg.redis_sentinel_master == "mymaster" and cfg.redacted()["redis_sentinel_password"] == "set"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"REDIS_SENTINELS": "a:b"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "user@host:1"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "h:1", "REDIS_URL": "unix:///run/redis.sock"}, "REDIS_SENTINELS"),
        ({"REDIS_SENTINELS": "h:1", "REDIS_SENTINEL_MASTER": " "}, "REDIS_SENTINEL_MASTER"),
        ({"REDIS_TLS_CA": "/no/such/ca.pem", "REDIS_TLS": "true"}, "REDIS_TLS_CA"),
        ({"REDIS_TLS_CA": __file__}, "REDIS_TLS_CA"),  # a CA, but no TLS: it would be silently ignored
        ({"REDIS_URL": "rediss://h:1/0", "REDIS_TLS_KEY": __file__}, "REDIS_TLS_KEY"),
        ({"REDIS_URL": "redis://h:1/0", "REDIS_TLS": "true"}, "REDIS_TLS"),
    ],
)
def test_contradictory_redis_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(environ=env, env_file=None)
    assert str(err.value).startswith(named) and "\n" not in str(err.value)


def test_connect_asks_the_sentinels_and_keeps_the_urls_user_db_and_tls(tmp_path: Path) -> None:
    """What the client will do, read off it before any connection is made (redis-py connects lazily)."""
    from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

    from botworker.queue import connect

    ca = tmp_path / "ca.pem"
    ca.write_text("(read when connecting)")
    env = {"REDIS_URL": "rediss://app:pw@ignored:1/3", "REDIS_TLS_CA": str(ca), "REDIS_SENTINELS": "s1:1,s2:2",
           "REDIS_SENTINEL_MASTER": "queue", "REDIS_SENTINEL_PASSWORD": "sp"}  # fmt: skip
    client = connect(load_config(environ=env, env_file=None), socket_timeout=7, retries=0)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "queue"
    assert pool.connection_class is SentinelManagedSSLConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"], kwargs["socket_timeout"]) == ("app", "pw", 3, 7)
    assert kwargs["ssl_ca_certs"] == str(ca) and kwargs["ssl_check_hostname"] and "host" not in kwargs
    assert kwargs["retry"].get_retries() == 0
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["host"] for s in sentinels] == ["s1", "s2"]
    assert all(s.connection_pool.connection_kwargs["password"] == "sp" for s in sentinels)
