"""HTTP connections pinned to the addresses the outbound policy checked (``outbound.py`` says what it defends
against): a ``requests.Session`` whose every new TCP connection resolves through the policy and connects to exactly
the address it accepted, with no proxies, no cookies and no environment; and ``Deadline``, one time limit over a
whole call (every connection it made is shut down when it passes)."""

from __future__ import annotations

import contextlib
import http.cookiejar
import socket
import sys
import threading
from typing import Any, ClassVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from .outbound import OutboundDenied, OutboundPolicy, ResolveError


def _connect_pinned(conn: HTTPConnection, policy: OutboundPolicy) -> socket.socket:
    """``_new_conn`` of the pinned connections: resolve through the policy, connect to what it accepted."""
    host = getattr(conn, "_dns_host", conn.host)  # keeps a trailing dot, which matters to DNS
    try:
        addresses = policy.resolve(host, conn.port)
    except OutboundDenied as exc:
        raise NewConnectionError(conn, f"Failed to establish a new connection: {exc}") from exc
    except ResolveError as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc  # type: ignore[arg-type]
    error: OSError | None = None
    for family, ip in addresses:
        try:
            sock = _open_socket(family, ip, conn)
        except OSError as exc:
            error = exc  # try the next checked address, as urllib3's create_connection does
            continue
        sys.audit("http.client.connect", conn, conn.host, conn.port)
        return sock
    assert error is not None  # resolve never returns an empty list
    if isinstance(error, TimeoutError):
        raise ConnectTimeoutError(
            conn, f"Connection to {conn.host} timed out. (connect timeout={conn.timeout})"
        ) from error
    raise NewConnectionError(conn, f"Failed to establish a new connection: {error}") from error


def _open_socket(family: int, ip: str, conn: HTTPConnection) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        for option in conn.socket_options or ():
            sock.setsockopt(*option)
        # urllib3 passes a sentinel object for "the default timeout": leave the socket's default then.
        if conn.timeout is None or isinstance(conn.timeout, int | float):
            sock.settimeout(conn.timeout)
        if conn.source_address:
            sock.bind(conn.source_address)
        sock.connect((ip, conn.port))
    except BaseException:
        sock.close()
        raise
    return sock


class Deadline:
    """``with Deadline(seconds):`` bounds a whole call, not each socket wait: when the time is up, the sockets of
    the connections the call took from its pools are shut down, so a peer trickling a byte at a time (headers,
    chunk sizes, body) cannot hold a blocking read past it. ``expired`` tells the caller why its read failed."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        _current.deadline = None

    def track(self, conn: Any) -> None:
        with self._lock:
            self._conns.append(conn)
            if self.expired:
                _shutdown(conn)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for conn in self._conns:
                _shutdown(conn)


_current = threading.local()  # .deadline: the calling thread's call in progress (a thread makes one at a time)


def _track(conn: Any) -> Any:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.track(conn)
    return conn


def _shutdown(conn: Any) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # the blocked recv returns at once; the connection is not reused


def _pool_classes(policy: OutboundPolicy) -> dict[str, type[HTTPConnectionPool]]:
    """Pool classes bound to ``policy``: urllib3 builds connections itself and passes no extra arguments."""

    class PinnedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return _connect_pinned(self, policy)

    class PinnedHTTPSConnection(HTTPSConnection):
        # Only the TCP socket is pinned; connect() still wraps it with TLS for self.host (SNI, verification).
        def _new_conn(self) -> socket.socket:
            return _connect_pinned(self, policy)

    class PinnedHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = PinnedHTTPConnection

        def _get_conn(self, timeout: float | None = None) -> Any:
            return _track(super()._get_conn(timeout))

    class PinnedHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = PinnedHTTPSConnection

        def _get_conn(self, timeout: float | None = None) -> Any:
            return _track(super()._get_conn(timeout))

    return {"http": PinnedHTTPConnectionPool, "https": PinnedHTTPSConnectionPool}


class PinnedAdapter(HTTPAdapter):
    """A requests adapter whose every connection goes through ``policy``; proxies are refused."""

    __attrs__: ClassVar[list[str]] = [
        *HTTPAdapter.__attrs__,
        "policy",
    ]  # pickling rebuilds the pool manager, which needs it

    def __init__(self, policy: OutboundPolicy, **kwargs: Any) -> None:
        self.policy = policy  # before super().__init__, which calls init_poolmanager
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self.policy)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        # The proxy would resolve and connect, bypassing the pinned socket (and it is a destination itself).
        raise OutboundDenied("proxies are not allowed for tool requests")


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """One session serves every user's tools: a cookie one call receives must never ride along with another's."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False

    def return_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


def session(policy: OutboundPolicy, pool_size: int = 4) -> requests.Session:
    """A ``requests.Session`` whose connections are pinned to addresses ``policy`` checked; it keeps no cookies."""
    s = requests.Session()
    s.trust_env = False  # no proxies, netrc credentials or CA bundle overrides from the environment
    s.cookies.set_policy(_NoCookies())
    adapter = PinnedAdapter(policy, pool_connections=pool_size, pool_maxsize=pool_size)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s
