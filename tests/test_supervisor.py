"""Process-level tests of the supervisor: real `python -m botworker` processes against real Redis and PostgreSQL.

Each test drives the fleet from the outside only (signals, Redis keys, the CLI, the log) and checks what the
platform can observe: events on `bot_responses`/`bot_errors`, rows in `chat_messages`, and the queue's lists.
A worker is held mid-message by holding the PostgreSQL advisory lock it takes before saving (`advisory_lock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
import redis

from botworker import errors
from botworker.config import Config
from botworker.devservers import free_port
from botworker.queue import ERRORS, MESSAGES, NODE_PREFIX, PROCESSING_PREFIX, PROCESSING_SET, RESPONSES, STATUS
from botworker.worker import Heartbeat, Worker

from conftest import ROOT, Bot, Fleet, Servers, advisory_lock, events, process_env, push, query, wait_for

# ---- helpers -----------------------------------------------------------------------------------------------


def cli(servers: Servers, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m botworker <args>` to completion (no .env file), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "botworker", *args, "--env-file", ""],
        env=process_env(servers, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
    )


def in_flight(r: redis.Redis, mid: str) -> tuple[str, int] | None:
    """(processing list, worker pid) of the worker currently holding the message with this id, if any."""
    for name in r.scan_iter(PROCESSING_PREFIX + "*"):
        if any(mid in raw for raw in r.lrange(name, 0, -1)):
            return name, int(name.split(":")[-2])  # (...:<wid>:<pid>:<thread>)
    return None


def answers(r: redis.Redis, mid: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(bot_responses events, bot_errors events) carrying this message id."""
    return (
        [e for e in events(r, RESPONSES) if e["messageId"] == mid],
        [e for e in events(r, ERRORS) if e["messageId"] == mid],
    )


def answered(r: redis.Redis, mid: str) -> bool:
    responses, errs = answers(r, mid)
    return bool(responses or errs)


def queued_ids(r: redis.Redis) -> list[str | None]:
    """messageIds waiting in bot_messages, head of the line (next to be taken) first."""
    return [json.loads(raw).get("messageId") for raw in reversed(r.lrange(MESSAGES, 0, -1))]


def chat_rows(db: psycopg.Connection[Any], mid: str) -> list[dict[str, Any]]:
    return query(db, """SELECT role, content FROM chat_messages WHERE metadata->>'messageId' = %s""", mid)


def processing_leftovers(r: redis.Redis) -> tuple[list[str], set[str]]:
    """Processing lists still in Redis, and names still registered in bot_worker:processing."""
    return sorted(r.scan_iter(PROCESSING_PREFIX + "*")), r.smembers(PROCESSING_SET)


def hold_worker(r: redis.Redis, mid: str) -> tuple[str, int]:
    """Wait until a worker has popped this message (and is blocked on its lock): its processing list and pid."""
    return wait_for(lambda: in_flight(r, mid), 20, f"a worker to take message {mid}")


def is_dead(pid: int) -> bool:
    """The process is gone or a zombie (not reaped yet): either way it runs no more code."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


# ---- life cycle and status ---------------------------------------------------------------------------------


def test_fleet_boots_reports_status_and_unregisters_on_stop(
    r: redis.Redis, servers: Servers, start_fleet: Callable[..., Fleet]
) -> None:
    """A 2-worker fleet publishes a short-lived status key and a node key, `botworker status` exits 0 and shows
    2 workers; after SIGTERM the supervisor exits 0, its node key and the status key are gone and `status` exits 5."""
    fleet = start_fleet(2)
    node = fleet.node()
    assert node is not None and len(node["workers"]) == 2 and node["state"] == "running"
    assert r.exists(STATUS)
    assert 0 < r.ttl(STATUS) <= 30

    status = cli(servers, "status")
    assert status.returncode == errors.EXIT_OK, status.stderr
    assert "fleet: alive" in status.stdout
    assert "2/2 workers" in status.stdout, status.stdout
    assert sum(line.lstrip().startswith("worker ") for line in status.stdout.splitlines()) == 2, status.stdout
    # The servers' health (this suite's Redis runs without its append-only file: status says what that costs),
    # and the host's thread use
    assert "AOF OFF: a restart loses the queue" in status.stdout and "ping " in status.stdout, status.stdout
    assert "postgres: " in status.stdout and "SELECT 1 in" in status.stdout and "threads busy, seen" in status.stdout
    report = json.loads(cli(servers, "status", "--json").stdout)
    assert report["redis"]["ok"] and report["redis"]["aof"] is False and report["redis"]["role"] == "master"
    assert report["postgres"]["ok"] and report["postgres"]["fleetConnections"] >= 2, report["postgres"]

    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == errors.EXIT_OK, fleet.log()
    assert not r.exists(NODE_PREFIX + node["node"])
    assert not r.exists(STATUS)
    after = cli(servers, "status")
    assert after.returncode == errors.EXIT_NO_WORKERS, after.stdout + after.stderr
    assert "NOT RUNNING" in after.stdout


def test_status_says_when_postgres_is_unreachable(servers: Servers) -> None:
    done = cli(servers, "status", "--database-url", f"postgresql://postgres@127.0.0.1:{free_port()}/botworker")
    assert "postgres: UNREACHABLE (" in done.stdout, done.stdout + done.stderr


# ---- dying workers -----------------------------------------------------------------------------------------


def test_sigkilled_worker_message_is_requeued_at_head_and_answered_once(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, start_fleet: Callable[..., Fleet]
) -> None:
    """A worker SIGKILLed mid-message: the supervisor logs the death, puts the message back at the head of the line
    (ahead of messages that were queued behind it), respawns a worker with a new pid, and once the message can
    proceed it is answered exactly once, with exactly its 2 rows. One worker of one thread taking one message at a
    time, so the line order is observable."""
    fleet = start_fleet(1, args=("--threads", "1"), WORKER_BATCH="1")
    first = bot.message("list my models")
    behind = [bot.message(f"hello {i}") for i in range(2)]
    mid = first["messageId"]
    with advisory_lock(db, mid):
        push(r, first)
        _, pid = hold_worker(r, mid)
        for msg in behind:
            push(r, msg)
        assert queued_ids(r) == [m["messageId"] for m in behind]

        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: f"(pid {pid}) killed by SIGKILL" in fleet.log(), 10, "the supervisor to log the death")
        # The respawned worker takes the requeued message first: it went back to the head of the line.
        _, new_pid = wait_for(
            lambda: (held := in_flight(r, mid)) and held[1] != pid and held, 20, "a new worker to take the message"
        )
        assert new_pid != pid
        assert fleet.wait_workers(1) == [new_pid]
        assert queued_ids(r) == [m["messageId"] for m in behind]
        assert not answered(r, mid)
    assert "requeued 1 in-flight message(s)" in fleet.log()

    ids = [mid] + [m["messageId"] for m in behind]
    wait_for(lambda: all(answered(r, i) for i in ids), 20, "all three answers")
    responses, errs = answers(r, mid)
    assert len(responses) == 1 and errs == []
    assert [e["messageId"] for e in events(r, RESPONSES)] == ids  # the requeued message was answered first
    assert sorted(row["role"] for row in chat_rows(db, mid)) == ["bot", "user"]
    assert "churn" in responses[0]["botResponse"]["content"]


@pytest.mark.parametrize("with_id", [True, False], ids=["messageId", "no-messageId"])
def test_worker_killed_between_commit_and_ack_is_replayed_once(
    r: redis.Redis,
    db: psycopg.Connection[Any],
    bot: Bot,
    servers: Servers,
    start_fleet: Callable[..., Fleet],
    with_id: bool,
) -> None:
    """A worker SIGKILLed after its rows are committed but before the ack reaches Redis: the retry finds the saved
    rows and replays them, so the message still has exactly 2 rows and one bot_responses event carrying them.
    Without a producer messageId, the id the first attempt assigned must survive the crash (else: new rows).

    The worker is frozen before the INSERT by a table lock, then Redis writes are paused (CLIENT PAUSE WRITE)
    while the lock is released: the commit goes through, the ack cannot."""
    fleet = start_fleet(2)
    text = f"list my models ({uuid.uuid4().hex})"
    msg = bot.message(text)
    if not with_id:
        del msg["messageId"]
    blocker = psycopg.connect(servers.database_url)
    paused = False
    try:
        with blocker.cursor() as cur:
            cur.execute("LOCK TABLE chat_messages IN EXCLUSIVE MODE")
        push(r, msg)
        _, pid = hold_worker(r, text)
        wait_for(
            lambda: query(db, "SELECT 1 FROM pg_locks WHERE relation = 'chat_messages'::regclass AND NOT granted"),
            20,
            "the worker to wait for the table lock (it is about to write its rows)",
        )
        copy = next(json.loads(raw) for name in [in_flight(r, text)[0]] for raw in r.lrange(name, 0, -1))
        mid = copy["messageId"]
        assert mid and (not with_id or mid == msg["messageId"])

        r.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
        paused = True
        blocker.commit()  # the worker inserts and commits, then blocks on the paused ack
        wait_for(lambda: len(chat_rows(db, mid)) == 2, 20, "the first attempt's commit")
        saved = {
            row["role"]: row for row in query(db, "SELECT * FROM chat_messages WHERE metadata->>'messageId' = %s", mid)
        }
        holder = in_flight(r, text)
        assert holder is not None
        ports = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.raddr}
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: is_dead(pid), 10, "the worker to die")
        # Its ack waits in Redis behind the pause; a dead client's command would still run at UNPAUSE if Redis has
        # not read the closed socket by then. Drop its connections first: the ack must never happen.
        for client in r.client_list():
            if int(client["addr"].rsplit(":", 1)[1]) in ports:
                with contextlib.suppress(redis.RedisError):
                    r.client_kill_filter(_id=client["id"])
    finally:
        if paused:
            r.execute_command("CLIENT", "UNPAUSE")
        blocker.rollback()
        blocker.close()

    wait_for(lambda: answered(r, mid), 20, "the answer")
    responses, errs = answers(r, mid)
    assert len(responses) == 1 and errs == []
    assert responses[0]["userMessage"]["id"] == str(saved["user"]["id"])
    assert responses[0]["botResponse"]["id"] == str(saved["bot"]["id"])
    assert len(chat_rows(db, mid)) == 2
    assert len(query(db, "SELECT id FROM chat_messages WHERE content = %s", text)) == 1
    # The ack never happened: the supervisor had to requeue the message (the retry replayed the saved rows).
    assert f"requeued 1 in-flight message(s) from {holder[0]}" in fleet.log()
    assert len(events(r, RESPONSES)) == 1


def test_sigterm_drains_the_message_in_flight(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, start_fleet: Callable[..., Fleet]
) -> None:
    """SIGTERM is a warm stop: the supervisor waits for a busy worker to finish its message (answered once),
    then exits 0 leaving no processing list behind and nothing queued."""
    fleet = start_fleet(2)
    msg = bot.message("list my models")
    mid = msg["messageId"]
    with advisory_lock(db, mid):
        push(r, msg)
        hold_worker(r, mid)
        fleet.signal(signal.SIGTERM)
        wait_for(lambda: "warm stop" in fleet.log(), 10, "the warm stop to begin")
        with pytest.raises(subprocess.TimeoutExpired):
            fleet.wait(timeout=1.0)  # still draining while the message is blocked
    assert fleet.wait() == errors.EXIT_OK, fleet.log()

    responses, errs = answers(r, mid)
    assert len(responses) == 1 and errs == []
    assert len(chat_rows(db, mid)) == 2
    assert r.llen(MESSAGES) == 0
    assert processing_leftovers(r) == ([], set())


def test_graceful_timeout_kills_busy_worker_and_requeues(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, start_fleet: Callable[..., Fleet]
) -> None:
    """With GRACEFUL_TIMEOUT=1 and a message that cannot finish, the warm stop turns into a kill after the timeout:
    the supervisor still exits 0, the message is back on bot_messages untouched, and no event exists. The killed
    worker's save statement may still complete on the server once the lock is free (its rows are then the
    message's rows): the next fleet answers the message exactly once, with exactly those two rows."""
    fleet = start_fleet(2, GRACEFUL_TIMEOUT="1")
    msg = bot.message("list my models")
    mid = msg["messageId"]
    with advisory_lock(db, mid):
        push(r, msg)
        hold_worker(r, mid)
        fleet.signal(signal.SIGTERM)
        assert fleet.wait(timeout=20) == errors.EXIT_OK, fleet.log()
        assert "graceful timeout" in fleet.log()
        assert queued_ids(r) == [mid]
        assert json.loads(r.lindex(MESSAGES, 0)) == msg
        assert answers(r, mid) == ([], [])
        assert processing_leftovers(r) == ([], set())
    start_fleet(1)
    wait_for(lambda: answered(r, mid), 20, "the requeued message's answer")
    responses, errs = answers(r, mid)
    assert len(responses) == 1 and errs == [] and len(chat_rows(db, mid)) == 2


def test_second_sigterm_is_a_cold_stop(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, start_fleet: Callable[..., Fleet]
) -> None:
    """A second SIGTERM during a warm stop kills the workers at once (long before GRACEFUL_TIMEOUT=60):
    the supervisor exits 0 and the in-flight message is back on bot_messages, unanswered."""
    fleet = start_fleet(2, GRACEFUL_TIMEOUT="60")
    msg = bot.message("list my models")
    mid = msg["messageId"]
    with advisory_lock(db, mid):
        push(r, msg)
        hold_worker(r, mid)
        fleet.signal(signal.SIGTERM)
        # Wait for the first one to be handled: two signals sent back to back may be merged into one.
        wait_for(lambda: "warm stop" in fleet.log(), 10, "the warm stop to begin")
        fleet.signal(signal.SIGTERM)
        assert fleet.wait(timeout=15) == errors.EXIT_OK, fleet.log()
        assert "cold stop" in fleet.log()
        assert queued_ids(r) == [mid]
        assert answers(r, mid) == ([], [])
        assert processing_leftovers(r) == ([], set())


# ---- signals that reshape the fleet ------------------------------------------------------------------------


def test_sighup_replaces_every_worker(r: redis.Redis, bot: Bot, start_fleet: Callable[..., Fleet]) -> None:
    """SIGHUP reloads and replaces all workers with new processes; messages sent afterwards are still answered."""
    fleet = start_fleet(2)
    old = set(fleet.worker_pids())
    fleet.signal(signal.SIGHUP)

    def replaced() -> bool:
        node = fleet.node()
        pids = {w["pid"] for w in node["workers"]} if node else set()
        return len(pids) == 2 and not pids & old

    wait_for(replaced, 20, "both workers replaced")
    new = set(fleet.wait_workers(2))
    assert not new & old
    assert "SIGHUP: configuration reloaded" in fleet.log()
    assert fleet.proc.poll() is None

    msgs = [bot.message(f"hello after reload {i}") for i in range(3)]
    for msg in msgs:
        push(r, msg)
    wait_for(lambda: all(answered(r, m["messageId"]) for m in msgs), 20, "answers after the reload")
    for msg in msgs:
        responses, errs = answers(r, msg["messageId"])
        assert len(responses) == 1 and errs == []


def test_sighup_applies_a_changed_env_file(spawn: Callable[..., Fleet], tmp_path: Path) -> None:
    """SIGHUP re-reads the configuration: WORKER_PROCS changed from 2 to 3 in the env file gives 3 workers."""
    env_file = tmp_path / "botworker.env"
    env_file.write_text("WORKER_PROCS=2\n")
    fleet = spawn([sys.executable, "-m", "botworker", "run", "--env-file", str(env_file)])
    fleet.wait_workers(2)
    env_file.write_text("WORKER_PROCS=3\n")
    fleet.signal(signal.SIGHUP)
    fleet.wait_workers(3)
    assert wait_for(lambda: (n := fleet.node()) and n["target"] == 3, 10, "target 3")
    assert fleet.proc.poll() is None


def test_sighup_with_an_invalid_env_file_keeps_the_old_configuration(
    spawn: Callable[..., Fleet], tmp_path: Path
) -> None:
    """SIGHUP with an invalid value in the env file logs the variable and changes nothing: same workers, alive."""
    env_file = tmp_path / "botworker.env"
    env_file.write_text("WORKER_PROCS=2\n")
    fleet = spawn([sys.executable, "-m", "botworker", "run", "--env-file", str(env_file)])
    before = sorted(fleet.wait_workers(2))
    env_file.write_text("WORKER_PROCS=abc\n")
    fleet.signal(signal.SIGHUP)
    wait_for(lambda: "new configuration is invalid" in fleet.log(), 10, "the reload to be refused")
    assert "WORKER_PROCS" in fleet.log().split("new configuration is invalid", 1)[1].splitlines()[0]
    assert sorted(fleet.wait_workers(2)) == before
    assert fleet.proc.poll() is None


def test_sighup_keeps_the_redis_settings_until_a_restart(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, spawn: Callable[..., Fleet], tmp_path: Path
) -> None:
    """A reload that changes a REDIS_* setting says it takes effect at the next restart, and the message a retiring
    worker holds meanwhile is answered once: the node's lists are not recovered from under it."""
    env_file = tmp_path / "botworker.env"
    env_file.write_text("WORKER_PROCS=1\nREDIS_TIMEOUT=5\n")
    fleet = spawn([sys.executable, "-m", "botworker", "run", "--env-file", str(env_file)])
    fleet.wait_workers(1)
    msg = bot.message("hello while reloading")
    with advisory_lock(db, msg["messageId"]):
        push(r, msg)
        wait_for(lambda: in_flight(r, msg["messageId"]), 10, "the message in hand")
        env_file.write_text("WORKER_PROCS=1\nREDIS_TIMEOUT=6\n")
        fleet.signal(signal.SIGHUP)
        wait_for(lambda: "take effect at the next restart" in fleet.log(), 10, "the warning")
        time.sleep(2)  # several recovery scans (every 0.5 s) while the retiring worker holds the message
    wait_for(lambda: answered(r, msg["messageId"]), 20, "the answer")
    responses, errs = answers(r, msg["messageId"])
    assert len(responses) == 1 and errs == []
    assert "in-flight message" not in fleet.log()  # (what recover_orphans and requeue_list log)


def test_sigttin_and_sigttou_scale_the_fleet(start_fleet: Callable[..., Fleet]) -> None:
    """SIGTTIN adds a worker and SIGTTOU removes one again: 2 -> 3 -> 2 in the node key."""
    fleet = start_fleet(2)
    fleet.signal(signal.SIGTTIN)
    fleet.wait_workers(3)
    node = wait_for(lambda: (n := fleet.node()) and n["target"] == 3 and len(n["workers"]) == 3 and n, 10, "3 workers")
    assert len(node["workers"]) == 3

    fleet.signal(signal.SIGTTOU)
    node = wait_for(lambda: (n := fleet.node()) and n["target"] == 2 and len(n["workers"]) == 2 and n, 20, "2 workers")
    assert len(node["workers"]) == 2
    assert fleet.proc.poll() is None


def test_silent_worker_is_killed_and_its_message_answered_once(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, start_fleet: Callable[..., Fleet]
) -> None:
    """A worker whose heartbeat stops for WORKER_TIMEOUT (blocked mid-message) is SIGKILLed and replaced; the message
    goes to another worker and, once it can proceed, is answered exactly once with exactly 2 rows."""
    fleet = start_fleet(2, WORKER_TIMEOUT="2", HTTP_MAX_TIMEOUT="1", DB_TOOL_TIMEOUT="1", GEMINI_TIMEOUT="1")
    msg = bot.message("list my models")
    mid = msg["messageId"]
    with advisory_lock(db, mid):
        push(r, msg)
        _, pid = hold_worker(r, mid)
        wait_for(lambda: f"(pid {pid}) silent for" in fleet.log(), 20, "the supervisor to kill the silent worker")
        # Release as soon as it is taken again, before the next holder can be taken for a silent one as well.
        wait_for(lambda: (held := in_flight(r, mid)) and held[1] != pid, 20, "another worker to take the message")
    wait_for(lambda: answered(r, mid), 20, "the answer")
    responses, errs = answers(r, mid)
    assert len(responses) == 1 and errs == []
    assert len(chat_rows(db, mid)) == 2
    pids = fleet.wait_workers(2)
    assert pid not in pids
    assert f"(pid {pid}) killed by SIGKILL" in fleet.log()


def test_workers_of_a_sigkilled_supervisor_finish_their_message_and_exit(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, start_fleet: Callable[..., Fleet]
) -> None:
    """When the supervisor is SIGKILLed its workers do not live on: an idle one exits at once, a busy one finishes
    its message (answered once, 2 rows) and then exits, handing back nothing and unregistering its list."""
    fleet = start_fleet(2)
    pids = fleet.worker_pids()
    msg = bot.message("list my models")
    mid = msg["messageId"]
    try:
        with advisory_lock(db, mid):
            push(r, msg)
            _, busy = hold_worker(r, mid)
            fleet.proc.kill()
            fleet.proc.wait()
            idle = [pid for pid in pids if pid != busy]
            wait_for(lambda: all(is_dead(pid) for pid in idle), 10, "the idle worker to exit")
            assert not is_dead(busy)
        wait_for(lambda: is_dead(busy), 20, "the busy worker to exit after its message")
        responses, errs = answers(r, mid)
        assert len(responses) == 1 and errs == []
        assert len(chat_rows(db, mid)) == 2
        assert r.llen(MESSAGES) == 0
        assert processing_leftovers(r) == ([], set())
    finally:
        for pid in pids:
            if not is_dead(pid):
                os.kill(pid, signal.SIGKILL)


def _recycled(r: redis.Redis, bot: Bot, start_fleet: Callable[..., Fleet], n: int, **env: str) -> str:
    """n messages through one worker slot (one thread, one message at a time) that recycles as ``env`` says: each
    answered exactly once, no error, no crash back-off (a recycled worker is not a crashed one), and a new worker
    process at the end. Returns the fleet's log."""
    fleet = start_fleet(1, args=("--threads", "1"), WORKER_BATCH="1", **env)
    first = fleet.worker_pids()
    msgs = [bot.message(f"hello {i}") for i in range(n)]
    for msg in msgs:
        push(r, msg)
    wait_for(lambda: all(answered(r, m["messageId"]) for m in msgs), 30, "all answers")
    assert sorted(e["messageId"] for e in events(r, RESPONSES)) == sorted(m["messageId"] for m in msgs)
    assert events(r, ERRORS) == []
    log = fleet.log()
    assert "respawning worker" not in log
    assert fleet.wait_workers(1) != first
    return log


def test_max_requests_recycles_workers_without_losing_messages(
    r: redis.Redis, bot: Bot, start_fleet: Callable[..., Fleet]
) -> None:
    """MAX_REQUESTS=2: the worker exits cleanly after 2 messages and is replaced at once (no crash back-off);
    6 messages through one worker slot are all answered exactly once by 3 successive processes. (One thread, one
    message at a time: with T threads, or batches, a worker may take a few more while its last ones finish.)"""
    log = _recycled(r, bot, start_fleet, 6, MAX_REQUESTS="2")
    assert log.count("recycling after 2 messages") == 3


def test_max_worker_memory_recycles_a_worker_after_its_message(
    r: redis.Redis, bot: Bot, start_fleet: Callable[..., Fleet]
) -> None:
    """MAX_WORKER_MEMORY=1 (MiB: every worker is over it): each worker finishes the message it took, then exits
    cleanly and is replaced at once; every message is answered exactly once."""
    log = _recycled(r, bot, start_fleet, 3, MAX_WORKER_MEMORY="1")
    assert log.count("over MAX_WORKER_MEMORY=1") >= 3


def test_max_requests_jitter_spreads_the_workers_recycling(make_cfg: Callable[..., Config]) -> None:
    """Each worker draws its own limit in MAX_REQUESTS .. MAX_REQUESTS + MAX_REQUESTS_JITTER: workers started
    together do not all restart together."""
    cfg = make_cfg(MAX_REQUESTS="1000", MAX_REQUESTS_JITTER="500")
    limits = [Worker(cfg, wid, "jitter-node", Heartbeat()).request_limit for wid in range(8)]
    assert all(1000 <= limit <= 1500 for limit in limits) and len(set(limits)) > 1, limits
    assert Worker(make_cfg(MAX_REQUESTS_JITTER="500"), 0, "jitter-node", Heartbeat()).request_limit == 0


def test_idle_workers_are_not_taken_for_hung_ones(start_fleet: Callable[..., Fleet]) -> None:
    """POP_TIMEOUT=3 with WORKER_TIMEOUT=2 must either be refused (exit 3) or leave idle workers alone; it must not
    make the supervisor SIGKILL its idle workers over and over."""
    fleet = start_fleet(2, wait=False, POP_TIMEOUT="3", WORKER_TIMEOUT="2")
    try:
        code = fleet.wait(timeout=3)
    except subprocess.TimeoutExpired:
        pass
    else:
        assert code == errors.EXIT_CONFIG, fleet.log()
        return
    before = sorted(fleet.wait_workers(2))
    time.sleep(6)  # idle for twice POP_TIMEOUT: nothing to wait_for, the point is that nothing happens
    assert "silent for" not in fleet.log()
    assert sorted(fleet.worker_pids()) == before


# ---- failures at start -------------------------------------------------------------------------------------


def test_unreachable_database_at_boot_exits_4(start_fleet: Callable[..., Fleet]) -> None:
    """Workers that cannot reach PostgreSQL within BOOT_TIMEOUT make the supervisor stop with EXIT_BOOT (4)
    instead of respawning them forever."""
    port = free_port()
    fleet = start_fleet(
        2, wait=False, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/botworker", BOOT_TIMEOUT="1"
    )
    assert fleet.wait(timeout=30) == errors.EXIT_BOOT, fleet.log()
    log = fleet.log()
    assert "could not boot" in log
    assert log.count("spawned worker") <= 2


def test_unreachable_redis_at_boot_exits_4_without_waiting_out_the_grace_period(
    start_fleet: Callable[..., Fleet],
) -> None:
    """With Redis down too, the supervisor cannot confirm its workers' lists are empty; workers that never booted
    took nothing, so the stop does not wait for Redis through GRACEFUL_TIMEOUT (600 s here) before exiting 4."""
    fleet = start_fleet(
        1, wait=False, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", BOOT_TIMEOUT="1", GRACEFUL_TIMEOUT="600"
    )
    assert fleet.wait(timeout=60) == errors.EXIT_BOOT, fleet.log()
    assert "could not boot" in fleet.log()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WORKER_PROCS", "abc"),
        ("MAX_ATTEMPTS", "0"),
        ("GRACEFUL_TIMEOUT", "-1"),
        ("REDIS_URL", "http://localhost:6379"),
    ],
)
def test_invalid_configuration_exits_3_naming_the_variable(servers: Servers, variable: str, value: str) -> None:
    """An invalid setting stops `botworker run` before anything starts: exit 3, one stderr line naming it."""
    done = cli(servers, "run", timeout=30, **{variable: value})
    assert done.returncode == errors.EXIT_CONFIG, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert variable in lines[0]


def test_top_level_worker_py_runs_the_same_program(
    r: redis.Redis, bot: Bot, spawn: Callable[..., Fleet], servers: Servers
) -> None:
    """`python worker.py --procs 1` boots a fleet that answers messages and stops with 0 on SIGTERM."""
    fleet = spawn([sys.executable, "worker.py", "--procs", "1", "--env-file", ""])
    fleet.wait_workers(1)
    msg = bot.message("list my models")
    push(r, msg)
    wait_for(lambda: answered(r, msg["messageId"]), 20, "the answer")
    responses, errs = answers(r, msg["messageId"])
    assert len(responses) == 1 and errs == []
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == errors.EXIT_OK, fleet.log()


# ---- recovery ----------------------------------------------------------------------------------------------


def test_orphaned_processing_list_of_dead_node_is_recovered(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, start_fleet: Callable[..., Fleet]
) -> None:
    """A processing list left by a node whose key expired is requeued by a starting fleet and its message answered
    once; a processing list of a node that is still alive is left alone."""
    orphan = PROCESSING_PREFIX + "deadnode-1:0:12345:3"
    live = PROCESSING_PREFIX + "livenode-1:0:999:0"
    lost, busy = bot.message("list my models"), bot.message("hello from a live node")
    r.lpush(orphan, json.dumps(lost))
    r.lpush(live, json.dumps(busy))
    r.sadd(PROCESSING_SET, orphan, live)
    r.set(NODE_PREFIX + "livenode-1", json.dumps({"node": "livenode-1", "pid": 1, "workers": []}), ex=120)
    assert not r.exists(NODE_PREFIX + "deadnode-1")

    fleet = start_fleet(2)
    wait_for(lambda: answered(r, lost["messageId"]), 20, "the orphaned message's answer")
    responses, errs = answers(r, lost["messageId"])
    assert len(responses) == 1 and errs == []
    assert len(chat_rows(db, lost["messageId"])) == 2
    assert orphan not in r.smembers(PROCESSING_SET)
    assert not r.exists(orphan)
    assert f"from {orphan}" in fleet.log()
    # The live node's in-flight message is not stolen.
    assert live in r.smembers(PROCESSING_SET)
    assert [json.loads(x)["messageId"] for x in r.lrange(live, 0, -1)] == [busy["messageId"]]
    assert not answered(r, busy["messageId"])


# ---- the send command --------------------------------------------------------------------------------------


def test_send_command_prints_the_reply(servers: Servers, bot: Bot, start_fleet: Callable[..., Fleet]) -> None:
    """`botworker send` against a running fleet prints the bot's reply (the user's model names) and exits 0."""
    start_fleet(2)
    done = cli(servers, "send", "--bot", bot.bot_id, "--user", bot.user_id, "--timeout", "20", "list my models")
    assert done.returncode == errors.EXIT_OK, done.stderr
    for name in ("churn", "sentiment", "vision"):
        assert name in done.stdout


def test_send_command_with_unknown_bot_exits_6(servers: Servers, bot: Bot, start_fleet: Callable[..., Fleet]) -> None:
    """`botworker send` to a bot that does not exist gets the bot_errors event: exit 6, the code on stderr."""
    start_fleet(2)
    done = cli(servers, "send", "--bot", str(uuid.uuid4()), "--user", bot.user_id, "--timeout", "20", "hello")
    assert done.returncode == errors.EXIT_SEND_FAILED, done.stdout + done.stderr
    assert errors.BOT_NOT_FOUND in done.stderr
    assert done.stdout == ""
