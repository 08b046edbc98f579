"""The reliable queue: the only module that speaks Redis queue commands.

The pattern is Redis's documented reliable queue (as rq's intermediate queue)::

    bot_messages ──BLMOVE RIGHT→LEFT──▶ bot_messages:processing:<node>:<wid>:<pid>:<thread>   (one consumer's)
         ▲                                        │
         └──── requeue at the head (RPUSH side) ◀──┤ worker died / transient failure
                                                  ├──▶ finish: LREM + LPUSH/PUBLISH bot_responses|bot_errors
                                                  └──▶ dead-letter: LREM + LPUSH bot_messages:dead + bot_errors

Producers LPUSH and consumers pop from the right, so the right end is the head of the line.

Invariants:
- A message is always in exactly one list; every move is one atomic command or one Lua script.
- ``finish``, ``release`` and ``dead_letter`` first LREM the message from the caller's processing list and do
  nothing else if it is not there (someone recovered it meanwhile): re-running them never doubles an event.
- ``finish`` sets ``bot_messages:done:<messageId>`` (for DONE_TTL seconds) in the same script, so a copy that
  comes back later (crash between commit and ack, or a producer pushing the same id twice) is dropped silently;
  if the key is already there (two copies handled at once, by two threads), it only acks: one event per id.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)

MESSAGES = "bot_messages"
DEAD = "bot_messages:dead"
PROCESSING_PREFIX = "bot_messages:processing:"
ATTEMPTS = "bot_messages:attempts"
DONE_PREFIX = "bot_messages:done:"
RESPONSES = "bot_responses"
ERRORS = "bot_errors"
STATUS = "bot_worker:status"
NODE_PREFIX = "bot_worker:node:"
PROCESSING_SET = "bot_worker:processing"
STATS = "bot_worker:stats"

DONE_TTL = 24 * 3600  # how long a finished message id is remembered for de-duplication
STATUS_TTL = 30  # seconds `bot_worker:status` outlives the last supervisor refreshing it

# KEYS: processing list, attempts hash, done key, stats hash, then one list/channel per event.
# ARGV: raw message, message id, done ttl, stats field, then one payload per event.
_FINISH = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[2])
if not redis.call('SET', KEYS[3], '1', 'EX', tonumber(ARGV[3]), 'NX') then
  redis.call('HINCRBY', KEYS[4], 'duplicates', 1)
  return 2
end
redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
for i = 5, #KEYS do
  redis.call('LPUSH', KEYS[i], ARGV[i])
  redis.call('PUBLISH', KEYS[i], ARGV[i])
end
return 1
"""

# KEYS: processing list, queue. ARGV: raw message.
_RELEASE = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""

# KEYS: processing list, dead list, attempts hash, errors list, stats hash. ARGV: raw, id, dead entry, event,
# most dead letters kept (0: all; the oldest go).
_DEAD_LETTER = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[3])
if tonumber(ARGV[5]) > 0 then redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[5]) - 1) end
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('LPUSH', KEYS[4], ARGV[4])
redis.call('PUBLISH', KEYS[4], ARGV[4])
redis.call('HINCRBY', KEYS[5], 'dead', 1)
return 1
"""

# KEYS: queue, processing list. ARGV: how many. Moves up to that many messages from the head of the line into the
# processing list without waiting (a backlog taken at once); returns them, the head of the line first.
_TAKE = """
local taken = {}
for i = 1, tonumber(ARGV[1]) do
  local raw = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')
  if not raw then break end
  taken[i] = raw
end
return taken
"""

# KEYS: processing list. ARGV: old raw, new raw. Swaps the in-flight copy (to record an assigned messageId).
_REPLACE = """
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[2])
return 1
"""


def processing_key(node_id: str, wid: int, pid: int, thread: int) -> str:
    """The processing list of one consumer thread: ``bot_messages:processing:<node>:<wid>:<pid>:<thread>``."""
    return f"{PROCESSING_PREFIX}{node_id}:{wid}:{pid}:{thread}"


def node_of(processing: str) -> str:
    """The node id inside a processing list's name (node ids may not contain ':'; the rest is wid:pid:thread)."""
    return processing[len(PROCESSING_PREFIX) :].split(":", 1)[0]


def encode(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Settled:
    """A message ready to be finished: its events and the stats field it counts under."""

    raw: bytes | str
    message_id: str
    events: list[tuple[str, dict[str, Any]]]
    stat: str


class Connections:
    """Counts the connections a client makes: pass one to ``connect(..., redis_connect_func=...)``.

    redis-py replaces a broken pooled connection silently at its next use, so a thread may never see the error of
    an outage: a Redis restarted without its last second of writes (an ack among them, and the message is back in
    a processing list), or a failover to a replica that missed them. A count that moved says some connection was
    made anew, so Redis may have forgotten something: each consumer then reclaims its list before its next pop."""

    def __init__(self) -> None:
        self.made = 0

    def __call__(self, connection: Any) -> None:
        connection.on_connect()  # (what redis-py does when no function is given)
        self.made += 1


class ReliableQueue:
    """One worker's view of the queue: pops into its own processing list and acks out of it."""

    def __init__(
        self, client: redis.Redis, processing: str, dead_max: int = 10_000, connections: Connections | None = None
    ) -> None:
        self.client = client
        self.processing = processing
        self.dead_max = dead_max  # DEAD_LETTER_MAX
        self.connections = connections  # the client's, when counted: see ``Connections``
        self._finish = client.register_script(_FINISH)
        self._release = client.register_script(_RELEASE)
        self._dead = client.register_script(_DEAD_LETTER)
        self._replace = client.register_script(_REPLACE)
        self._take = client.register_script(_TAKE)

    def register(self) -> None:
        """Announce the processing list, so a live supervisor can find it if this whole node dies."""
        self.client.sadd(PROCESSING_SET, self.processing)

    def unregister(self) -> None:
        """On a clean exit: hand back anything left and forget the list."""
        requeue_list(self.client, self.processing)

    def connections_made(self) -> int:
        return self.connections.made if self.connections is not None else 0

    def reclaim(self) -> int:
        """Put back at the head of the line whatever our list holds while we hold nothing. Only a command that ran
        although its connection broke before the reply (a pop, a batch taken, a swap), or a failover to a replica
        that had not yet seen an ack, leaves a message there; without this it would wait for the worker's exit."""
        moved = 0
        while self.client.lmove(self.processing, MESSAGES, "LEFT", "RIGHT") is not None:
            moved += 1
        if moved:
            log.warning("requeued %d message(s) left in %s after a lost connection", moved, self.processing)
        return moved

    def pop(self, timeout: float) -> bytes | None:
        """Wait up to ``timeout`` seconds for the next message; it stays in our processing list until acked."""
        return self.client.blmove(MESSAGES, self.processing, timeout, "RIGHT", "LEFT")

    def take(self, n: int) -> list[bytes]:
        """Up to ``n`` more messages at once, without waiting (none when the line is empty); each stays in our
        processing list until it is settled, like a popped one."""
        return list(self._take(keys=[MESSAGES, self.processing], args=[n])) if n > 0 else []

    def replace(self, old: bytes | str, new: str) -> bool:
        """Swap the in-flight copy for ``new`` (same message with an assigned messageId)."""
        return bool(self._replace(keys=[self.processing], args=[old, new]))

    def begin(self, message_id: str) -> tuple[int, bool]:
        """Count one more attempt; also say whether this id was already finished (a duplicate)."""
        return self.begin_many([message_id])[0]

    def begin_many(self, message_ids: list[str]) -> list[tuple[int, bool]]:
        """``begin`` of several messages in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for message_id in message_ids:
            pipe.hincrby(ATTEMPTS, message_id, 1)
            pipe.exists(DONE_PREFIX + message_id)
        replies = pipe.execute()
        return [(int(replies[i]), bool(replies[i + 1])) for i in range(0, len(replies), 2)]

    def finish(
        self, raw: bytes | str, message_id: str, events: Iterable[tuple[str, dict[str, Any]]], stat: str
    ) -> bool:
        """Push the events (LPUSH + PUBLISH each) and ack the message, atomically. False: it was not ours any more."""
        return self.finish_many([Settled(raw, message_id, list(events), stat)])[0] is not None

    def finish_many(self, settled: list[Settled]) -> list[str | None]:
        """``finish`` of several messages in one round trip (each one's script atomic on its own): for each, the
        stats field it was counted under (its own, or "duplicates" when its id was finished meanwhile, its events
        dropped), or None when it was not in our list (recovered by someone else). EVALSHA by hand:
        a pipeline of registered scripts would ask SCRIPT EXISTS first, a round trip more; a script Redis forgot
        (a restart) is loaded, and the messages it failed are finished again."""
        calls = []
        for s in settled:
            keys = [self.processing, ATTEMPTS, DONE_PREFIX + s.message_id, STATS] + [channel for channel, _ in s.events]
            calls.append((keys, [s.raw, s.message_id, DONE_TTL, s.stat] + [encode(event) for _, event in s.events]))
        pipe = self.client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(self._finish.sha, len(keys), *keys, *args)
        replies = pipe.execute(raise_on_error=False)
        out = []
        for s, (keys, args), reply in zip(settled, calls, replies, strict=True):
            if isinstance(reply, redis.exceptions.NoScriptError):
                reply = self._finish(keys=keys, args=args)  # (loads it)
            elif isinstance(reply, Exception):
                raise reply
            out.append(None if not reply else "duplicates" if int(reply) == 2 else s.stat)
        return out

    def release(self, raw: bytes | str) -> bool:
        """Put the message back at the head of the line (it will be the next one taken); its attempt counts."""
        return bool(self._release(keys=[self.processing, MESSAGES], args=[raw]))

    def dead_letter(self, raw: bytes | str, message_id: str, entry: dict[str, Any], event: dict[str, Any]) -> bool:
        """Move the message to ``bot_messages:dead`` and push its bot_errors event, atomically."""
        keys = [self.processing, DEAD, ATTEMPTS, ERRORS, STATS]
        return bool(self._dead(keys=keys, args=[raw, message_id, encode(entry), encode(event), self.dead_max]))


def requeue_list(client: redis.Redis, processing: str) -> int:
    """Move every message of a dead owner's processing list back to the head of ``bot_messages``.

    Oldest in-flight message ends up first in line. Each LMOVE is atomic, so a crash part-way loses nothing.
    """
    moved = 0
    while client.lmove(processing, MESSAGES, "LEFT", "RIGHT") is not None:
        moved += 1
    client.srem(PROCESSING_SET, processing)
    if moved:
        log.warning("requeued %d in-flight message(s) from %s", moved, processing)
    return moved


def recover_orphans(client: redis.Redis) -> int:
    """Requeue the processing lists of nodes whose heartbeat key has expired (a whole host died)."""
    names = [n.decode() if isinstance(n, bytes) else n for n in client.smembers(PROCESSING_SET)]
    if not names:
        return 0
    nodes = sorted({node_of(n) for n in names})
    alive = dict(zip(nodes, client.mget([NODE_PREFIX + node for node in nodes]), strict=True))
    return sum(requeue_list(client, name) for name in names if alive[node_of(name)] is None)


# ---- dead letters: what `botworker dead` reads and changes ---------------------------------------------------

# KEYS: dead list, queue, attempts hash. ARGV: the dead entry as stored, its message, its id. Back in line (at the
# end, as a new message), with a fresh attempt count; nothing if someone else took the entry meanwhile.
_REQUEUE_DEAD = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[3])
return 1
"""

# KEYS: dead list. ARGV: a failedAt (ISO 8601, UTC). Drops the oldest entries (the list's end) failed before it.
_TRIM_DEAD = """
local dropped = 0
while true do
  local last = redis.call('LINDEX', KEYS[1], -1)
  if not last then break end
  local ok, entry = pcall(cjson.decode, last)
  if ok and type(entry) == 'table' and type(entry.failedAt) == 'string' and entry.failedAt >= ARGV[1] then break end
  redis.call('RPOP', KEYS[1])
  dropped = dropped + 1
end
return dropped
"""


def dead_letters(client: redis.Redis) -> list[tuple[str, dict[str, Any]]]:
    """Every dead letter, newest first: the entry as stored, and decoded (an undecodable one as ``{}``)."""
    found = []
    for raw in client.lrange(DEAD, 0, -1):
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        try:
            entry = json.loads(text)
        except ValueError:
            entry = {}
        found.append((text, entry if isinstance(entry, dict) else {}))
    return found


def requeue_dead(client: redis.Redis, stored: str, entry: dict[str, Any]) -> bool:
    """Put one dead letter's message back in line with a fresh attempt count, atomically."""
    script = client.register_script(_REQUEUE_DEAD)
    return bool(script(keys=[DEAD, MESSAGES, ATTEMPTS], args=[stored, entry["message"], entry.get("messageId", "")]))


def purge_dead(client: redis.Redis, stored: str) -> bool:
    return bool(client.lrem(DEAD, 1, stored))


def trim_dead_letters(client: redis.Redis, failed_before: str) -> int:
    """Drop dead letters that failed before ``failed_before`` (ISO 8601, UTC), oldest first: DEAD_LETTER_DAYS."""
    return int(client.register_script(_TRIM_DEAD)(keys=[DEAD], args=[failed_before]))


# ---- fleet keys: one host's heartbeat, the fleet's status, what `botworker status` reads ---------------------


def publish_node(client: redis.Redis, node: dict[str, Any], ttl: float) -> None:
    """This host's heartbeat (``bot_worker:node:<node>``, expiring after ``ttl``) and the fleet's status, in one
    round trip. ``node`` is the supervisor's report: node id, state, workers..."""
    status = {"status": "running", "node": node["node"], "workers": len(node["workers"]), "updatedAt": time.time()}
    pipe = client.pipeline(transaction=False)
    # (In milliseconds: whole seconds rounded up would keep a dead host looking alive past NODE_TTL.)
    pipe.set(NODE_PREFIX + node["node"], json.dumps(node), px=max(1, int(ttl * 1000)))
    pipe.set(STATUS, json.dumps(status), ex=STATUS_TTL)
    pipe.execute()


def withdraw_node(client: redis.Redis, node_id: str) -> None:
    """A host's last words: its heartbeat goes, and the fleet's status too when no other host is alive."""
    client.delete(NODE_PREFIX + node_id)
    if not any(True for _ in client.scan_iter(NODE_PREFIX + "*", count=100)):
        client.delete(STATUS)


def redis_health(client: redis.Redis) -> dict[str, Any]:
    """What an operator checks first: the server's version and role, whether it persists the queue (the append-only
    file), its memory, and one round trip's time."""
    started = time.monotonic()
    client.ping()
    took = (time.monotonic() - started) * 1000
    server, persistence, memory, replication = (client.info(s) for s in ("server", "persistence", "memory",
                                                                          "replication"))  # fmt: skip
    return {
        "ok": True,
        "version": server.get("redis_version"),
        "role": replication.get("role"),
        "aof": bool(int(persistence.get("aof_enabled", 0))),
        "usedMemory": memory.get("used_memory_human"),
        "pingMs": round(took, 2),
    }


def queue_depths(client: redis.Redis) -> tuple[int, int]:
    """Messages waiting in ``bot_messages``, and dead letters: one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.llen(MESSAGES)
    pipe.llen(DEAD)
    queued, dead = pipe.execute()
    return int(queued), int(dead)


def fleet_report(client: redis.Redis) -> dict[str, Any]:
    """The fleet as Redis holds it: status, queued, in flight, dead letters, totals, and every live host."""

    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    lists = sorted(client.smembers(PROCESSING_SET))
    pipe = client.pipeline(transaction=False)
    pipe.llen(MESSAGES)
    pipe.llen(DEAD)
    pipe.get(STATUS)
    pipe.hgetall(STATS)
    for name in lists:
        pipe.llen(name)
    queued, dead, fleet, stats, *in_flight = pipe.execute()
    nodes = [json.loads(v) for key in client.scan_iter(NODE_PREFIX + "*") if (v := client.get(key))]
    return {
        "fleet": json.loads(fleet) if fleet else None,
        "queued": queued,
        "inFlight": sum(in_flight),
        "dead": dead,
        "stats": {text(k): int(v) for k, v in stats.items()},
        "nodes": nodes,
    }


# ---- connecting: the one way to a client, from the settings ----------------------------------------------------

# The least-privilege ACL user for everything botworker does (workers, supervisors, `status`, `dead`, `send`): the
# commands this module sends, on the contract's keys and channels only. `ACL SETUSER botworker on >PASSWORD <this>`;
# docs/operations.md shows it, and tests/test_redis_ha.py runs a fleet and the commands as that user.
ACL_RULES = (
    "resetkeys ~bot_messages ~bot_messages:* ~bot_responses ~bot_errors ~bot_worker:* "
    "resetchannels &bot_responses &bot_errors -@all "
    "+ping +select +info +blmove +lmove +lrem +lpush +rpush +rpop +ltrim +lrange +llen +lindex +hincrby +hdel "
    "+hgetall +set +get +mget +del +exists +sadd +srem +smembers +scan +publish +subscribe +unsubscribe "
    "+evalsha +script|load"
)
# A sentinel that does not accept a TCP connection this fast is taken as down and the next one asked.
SENTINEL_CONNECT_TIMEOUT = 1.0


def connect(
    cfg: Config,
    *,
    decode_responses: bool = False,
    socket_timeout: float | None = None,
    retries: int | None = None,
    **options: Any,
) -> redis.Redis:
    """A Redis client as the settings say: REDIS_URL (or its parts), an ACL user, TLS (REDIS_TLS_*), and with
    REDIS_SENTINELS the master they name, asked again for every new connection. A failover then looks like a short
    outage: commands on the dead master raise ``ConnectionError`` (so does ``MasterNotFoundError`` while no master
    is elected, and a demoted master's READONLY reply), the callers' retry loops try again and reach the new one.

    ``retries``: how often redis-py silently re-sends a command whose connection broke (its default: up to 10
    times within a few seconds). 0 for the workers, whose loops retry themselves and then ``reclaim``: a re-sent pop
    may have been run once already, unseen. Other options (timeouts, health checks) go to every connection."""
    opts: dict[str, Any] = {"decode_responses": decode_responses, "socket_timeout": socket_timeout, **options}
    if retries is not None:
        opts["retry"] = Retry(ExponentialWithJitterBackoff(base=0.01, cap=1), retries)
    tls = urlsplit(cfg.redis_url).scheme == "rediss"
    tls_opts = (
        {
            "ssl_ca_certs": cfg.redis_tls_ca_file or None,  # None: the system's CAs
            "ssl_certfile": cfg.redis_tls_cert_file or None,
            "ssl_keyfile": cfg.redis_tls_key_file or None,
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": cfg.redis_tls_check_hostname,
        }
        if tls
        else {}
    )
    if not cfg.redis_sentinels:
        return redis.Redis.from_url(cfg.redis_url, **opts, **tls_opts)
    # The URL gives the user, password, db and query options; the master's address comes from the sentinels.
    url_opts = {k: v for k, v in parse_url(cfg.redis_url).items() if k not in ("host", "port", "connection_class")}
    tls_opts = {"ssl": True, **tls_opts} if tls else {}  # (no scheme to say it here: the connections are made by hand)
    sentinel_opts = {
        "socket_timeout": cfg.redis_timeout,
        "socket_connect_timeout": min(cfg.redis_timeout, SENTINEL_CONNECT_TIMEOUT),
        "username": cfg.redis_sentinel_username or None,
        "password": cfg.redis_sentinel_password or None,
        **tls_opts,
    }
    hosts = [(host.strip("[]"), int(port)) for host, port in (a.rsplit(":", 1) for a in cfg.redis_sentinels)]
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_opts)
    # (One dict: the URL's query options, e.g. ?socket_timeout=3, and the caller's may name the same keyword.)
    return sentinel.master_for(cfg.redis_sentinel_master, **{**url_opts, **opts, **tls_opts})


def certificate_refused(exc: BaseException) -> str | None:
    """Why a TLS handshake refused the server's certificate (unknown CA, wrong host name, expired), if that is what
    ``exc`` (a redis-py ``ConnectionError``) comes from: retrying will not change it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"Redis's TLS certificate was refused: {seen.verify_message or seen}"
        seen = seen.__cause__ or seen.__context__
    return None
