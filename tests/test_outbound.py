"""Outbound policy: which addresses are blocked, resolve-once checks, URL checks, and the pinned session.

Nothing here leaves 127.0.0.1: names other than ``localhost`` go through an injected fake resolver, and the
session tests talk to an HTTP(S) server the test starts on a loopback port.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import requests.utils

from botworker.tools.outbound import (
    OutboundDenied,
    OutboundPolicy,
    ResolveError,
    blocked_reason,
    denied_in,
    pin_dsn_host,
)
from botworker.tools.pinned import session

LOCAL = ("127.0.0.1/32",)
METADATA_URL = "http://169.254.169.254/latest/meta-data/"


# --- blocked_reason ---------------------------------------------------------------------------------------------

BLOCKED = [
    # address, a word the reason must contain
    ("127.0.0.1", "loopback"),
    ("127.1.2.3", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),  # AWS/GCP/Azure metadata
    ("100.100.100.200", "carrier-grade NAT"),  # Alibaba metadata; ipaddress calls it neither private nor global
    ("100.64.0.1", "carrier-grade NAT"),
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this network"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("240.0.0.1", "reserved"),
    ("198.18.0.1", "benchmarking"),
    ("192.0.2.1", "documentation"),
    ("203.0.113.7", "documentation"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fe80::1%1", "link-local"),  # with a scope id, as getaddrinfo may return it
    ("fd00:ec2::254", "unique local"),  # AWS IPv6 metadata
    ("fc00::1", "unique local"),
    ("fec0::1", "site-local"),  # deprecated; ipaddress calls it global
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("2001::1", "Teredo"),
    ("64:ff9b:1::1", "local-use NAT64"),
    ("::7f00:1", "reserved"),  # IPv4-compatible ::127.0.0.1 (deprecated)
    ("::ffff:127.0.0.1", "loopback address (IPv4-mapped 127.0.0.1)"),
    ("::ffff:169.254.169.254", "link-local address (IPv4-mapped 169.254.169.254)"),
    ("64:ff9b::a9fe:a9fe", "link-local address (NAT64 169.254.169.254)"),  # ipaddress calls this one global
    ("2002:7f00:1::1", "loopback address (6to4 127.0.0.1)"),  # and this one
    ("2002::1", "unspecified address (6to4 0.0.0.0)"),
]

ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",  # judged by the IPv4 address it carries
    "64:ff9b::808:808",
    "2002:808:808::1",
]


@pytest.mark.parametrize(("address", "word"), BLOCKED)
def test_blocked_addresses(address: str, word: str) -> None:
    reason = blocked_reason(ipaddress.ip_address(address))
    assert reason is not None and word in reason, (address, reason)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


# --- resolve ----------------------------------------------------------------------------------------------------


@dataclass
class FakeResolver:
    """``socket.getaddrinfo`` over a table: name -> addresses, or a list of answers given in turn."""

    table: dict[str, list[str] | list[list[str]]]
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def __call__(self, host: str, port: int, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> list:
        self.calls.append((host, port, type))
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answers = self.table[host]
        if answers and isinstance(answers[0], list):  # one answer per call, the last one repeats
            turn = sum(1 for c in self.calls if c[0] == host) - 1
            answers = answers[min(turn, len(answers) - 1)]
        out = []
        for ip in answers:
            assert isinstance(ip, str)
            if ":" in ip:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)))
        return out


def test_a_name_resolving_to_a_private_address_is_refused() -> None:
    policy = OutboundPolicy(resolver=FakeResolver({"internal.test": ["10.0.0.5"]}))
    with pytest.raises(OutboundDenied) as err:
        policy.resolve("internal.test", 80)
    assert str(err.value) == (
        "internal.test resolves to 10.0.0.5, which is a private address (set HTTP_ALLOWED_HOSTS to allow it)"
    )


def test_an_ip_literal_names_itself_in_the_reason() -> None:
    with pytest.raises(OutboundDenied) as err:
        OutboundPolicy().resolve("169.254.169.254", 80)
    assert str(err.value) == "169.254.169.254 is a link-local address (set HTTP_ALLOWED_HOSTS to allow it)"


def test_a_public_name_resolves_to_its_addresses_in_order() -> None:
    resolver = FakeResolver({"example.test": ["93.184.216.34", "2606:2800:220:1::1", "93.184.216.34"]})
    policy = OutboundPolicy(resolver=resolver)
    assert policy.resolve("example.test", 443) == [
        (socket.AF_INET, "93.184.216.34"),
        (socket.AF_INET6, "2606:2800:220:1::1"),
    ]
    assert resolver.calls == [("example.test", 443, socket.SOCK_STREAM)]


@pytest.mark.parametrize("answers", [["93.184.216.34", "10.0.0.5"], ["127.0.0.1", "93.184.216.34"]])
def test_a_name_with_public_and_private_addresses_is_refused(answers: list[str]) -> None:
    # Picking the public address would leave the next lookup (by anyone) free to choose the private one.
    policy = OutboundPolicy(resolver=FakeResolver({"mixed.test": answers}))
    with pytest.raises(OutboundDenied, match=r"^mixed\.test resolves to "):
        policy.resolve("mixed.test", 80)


@pytest.mark.parametrize(
    ("allowed", "host", "answers", "ok"),
    [
        (("10.0.0.0/8",), "db.test", ["10.0.0.5"], True),  # an allowed CIDR opens its addresses
        (("10.0.0.0/8",), "db.test", ["10.0.0.5", "192.168.0.5"], False),  # ... and only those
        (("10.0.0.0/8",), "10.2.3.4", ["10.2.3.4"], True),
        (("127.0.0.1/32",), "mapped.test", ["::ffff:127.0.0.1"], True),  # the v4 CIDR covers the mapped form
        (("127.0.0.1/32",), "other.test", ["127.0.0.2"], False),
        (("intranet.test",), "intranet.test", ["10.9.9.9", "fd00::9"], True),  # an allowed name opens all
        (("intranet.test",), "INTRANET.test.", ["10.9.9.9"], True),
        (("intranet.test",), "www.intranet.test", ["10.9.9.9"], False),
        (("*.corp.test",), "a.corp.test", ["172.16.0.9"], True),
        (("*.corp.test",), "a.b.corp.test", ["172.16.0.9"], True),
        (("*.corp.test",), "corp.test", ["172.16.0.9"], False),
        (("*.corp.test",), "evilcorp.test", ["172.16.0.9"], False),
        ((), "public.test", ["8.8.8.8"], True),
    ],
)
def test_the_allowlist(allowed: tuple[str, ...], host: str, answers: list[str], ok: bool) -> None:
    resolver = FakeResolver({host: answers})
    policy = OutboundPolicy(allowed=allowed, resolver=resolver)
    if ok:
        assert [ip for _, ip in policy.resolve(host, 80)] == list(dict.fromkeys(answers))
    else:
        with pytest.raises(OutboundDenied):
            policy.resolve(host, 80)
    assert len(resolver.calls) == 1  # resolved once, whatever the outcome


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("x.com", False),
        ("a.x.com", True),
        ("a.b.x.com", True),
        ("A.X.COM.", True),
        ("ax.com", False),
        ("exact.test", True),
        ("sub.exact.test", False),
        ("10.0.0.1", False),  # CIDR entries judge addresses, not names
        ("", False),
    ],
)
def test_host_allowed(host: str, allowed: bool) -> None:
    policy = OutboundPolicy(allowed=("*.x.com", "exact.test", "10.0.0.0/8"))
    assert policy.host_allowed(host) is allowed


@pytest.mark.parametrize(
    "host",
    ["0x7f000001", "2130706433", "127.1", "0177.0.0.1", "[::1]", "::1", "::ffff:127.0.0.1", "0.0.0.0", "localhost"],
)
def test_every_spelling_of_loopback_is_judged_by_the_address_it_means(host: str) -> None:
    # The real getaddrinfo: these are literals (or /etc/hosts), no DNS query is made.
    with pytest.raises(OutboundDenied, match=r"loopback|unspecified"):
        OutboundPolicy().resolve(host, 80)


def test_a_resolution_failure_is_not_a_denial() -> None:
    policy = OutboundPolicy(resolver=FakeResolver({"empty.test": []}))
    with pytest.raises(ResolveError, match=r"^cannot resolve host nx\.test: ") as err:
        policy.resolve("nx.test", 80)
    assert not isinstance(err.value, OutboundDenied)
    with pytest.raises(ResolveError, match="no addresses"):
        policy.resolve("empty.test", 80)


# --- check_url --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/file",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_INFO",
        "dict://127.0.0.1:11211/stat",
        "example.com/path",
        "http:///path",
        "http://:80/",
        "http://alice:s3cret@example.com/",
        "https://tok3n@example.com/",
        "http://example.com:99999/",
    ],
)
def test_check_url_refuses(url: str) -> None:
    with pytest.raises(OutboundDenied) as err:
        OutboundPolicy().check_url(url)
    assert "s3cret" not in str(err.value) and "tok3n" not in str(err.value)  # never echo credentials


@pytest.mark.parametrize(
    "url", ["http://example.com", "https://example.com:8443/a?b=c#d", "HTTPS://EXAMPLE.COM/", "http://[::1]:8080/"]
)
def test_check_url_accepts(url: str) -> None:
    OutboundPolicy().check_url(url)  # an internal host is not refused here: that is decided at connect time


# --- pin_dsn_host -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["", "/var/run/postgresql", "@abstract"])
def test_pin_dsn_host_refuses_unix_sockets(host: str) -> None:
    with pytest.raises(OutboundDenied, match="unix sockets are not allowed"):
        pin_dsn_host(OutboundPolicy(), host, 5432)


def test_pin_dsn_host_returns_the_checked_address() -> None:
    resolver = FakeResolver({"db.test": ["10.0.0.7"], "pub.test": ["2606:4700::1", "93.184.216.34"]})
    assert pin_dsn_host(OutboundPolicy(resolver=resolver), "pub.test", 5432) == "2606:4700::1"
    assert pin_dsn_host(OutboundPolicy(allowed=("10.0.0.0/8",), resolver=resolver), "db.test", 5432) == "10.0.0.7"
    with pytest.raises(OutboundDenied, match="private"):
        pin_dsn_host(OutboundPolicy(resolver=resolver), "db.test", 5432)
    with pytest.raises(OutboundDenied, match="multiple hosts"):
        pin_dsn_host(OutboundPolicy(resolver=resolver), "pub.test,db.test", 5432)


# --- denied_in --------------------------------------------------------------------------------------------------


def test_denied_in_walks_causes_args_and_reasons() -> None:
    denied = OutboundDenied("10.0.0.1 is a private address")
    assert denied_in(denied) is denied
    assert denied_in(ValueError("unrelated")) is None
    assert denied_in(requests.ConnectionError(RuntimeError(denied))) is denied

    class WithReason(Exception):
        reason = denied

    assert denied_in(requests.ConnectionError(WithReason("max retries"))) is denied
    try:
        try:
            raise denied
        except OutboundDenied as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        assert denied_in(outer) is denied
    loop = RuntimeError("a")
    loop.__context__ = RuntimeError("b", loop)
    assert denied_in(loop) is None  # cycles end


# --- the pinned session against a local server ------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse can be counted

    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", METADATA_URL)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    accepted = 0  # TCP connections accepted

    def get_request(self) -> tuple[socket.socket, Any]:
        request = super().get_request()
        self.accepted += 1
        return request


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _port(srv: _Server) -> int:
    return srv.server_address[1]


def _denial(call: Callable[[], object]) -> OutboundDenied:
    with pytest.raises(requests.ConnectionError) as err:
        call()
    denied = denied_in(err.value)
    assert denied is not None, repr(err.value)
    return denied


def test_a_loopback_address_is_refused_at_connect_time(server: _Server) -> None:
    with session(OutboundPolicy()) as s:
        denied = _denial(lambda: s.get(f"http://127.0.0.1:{_port(server)}/", timeout=5))
    assert str(denied).startswith("127.0.0.1 is a loopback address")
    assert server.accepted == 0


def test_a_name_resolving_to_loopback_is_refused(server: _Server) -> None:
    with session(OutboundPolicy()) as s:
        denied = _denial(lambda: s.get(f"http://localhost:{_port(server)}/", timeout=5))
    assert str(denied).startswith("localhost resolves to ")
    assert server.accepted == 0


def test_an_allowed_address_works_and_connections_are_reused(server: _Server) -> None:
    resolver = FakeResolver({"local.test": ["127.0.0.1"]})
    with session(OutboundPolicy(allowed=LOCAL, resolver=resolver)) as s:
        for _ in range(2):
            response = s.get(f"http://local.test:{_port(server)}/", timeout=5)
            assert response.status_code == 200 and response.text == "ok"
    assert server.accepted == 1  # two requests, one TCP connection
    assert len(resolver.calls) == 1  # resolved once per connection, not per request


def test_dns_rebinding_cannot_switch_a_checked_connection(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    # The attacker's name answers 127.0.0.1 (allowed here) to the policy's lookup and 10.0.0.1 afterwards.
    resolver = FakeResolver({"rebind.test": [["127.0.0.1"], ["10.0.0.1"]]})
    # A client that checks and then lets the socket layer resolve again would ask the system resolver: make
    # that answer the rebound address too, and record whether anybody asks.
    system_calls: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def system_resolver(host: Any, *args: Any, **kwargs: Any) -> Any:
        system_calls.append(str(host))
        if host == "rebind.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", args[0] if args else 80))]
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", system_resolver)
    url = f"http://rebind.test:{_port(server)}/"
    with session(OutboundPolicy(allowed=LOCAL, resolver=resolver)) as s:
        assert s.get(url, timeout=5).text == "ok"  # reached 127.0.0.1, the address the policy checked
        assert s.get(url, timeout=5).text == "ok"  # same connection: no new lookup
        assert server.accepted == 1 and len(resolver.calls) == 1
        assert "rebind.test" not in system_calls  # the socket connected to the checked IP, not to the name

        s.close()  # drop the pooled connection: the next request opens (and checks) a new one
        denied = _denial(lambda: s.get(url, timeout=5))
    assert str(denied).startswith("rebind.test resolves to 10.0.0.1, which is a private address")
    assert len(resolver.calls) == 2 and server.accepted == 1  # refused before any connect
    assert "rebind.test" not in system_calls


def test_a_redirect_into_metadata_is_refused_when_followed(server: _Server) -> None:
    base = f"http://127.0.0.1:{_port(server)}"
    policy = OutboundPolicy(allowed=LOCAL)
    with session(policy) as s:
        hop = s.get(f"{base}/redirect", timeout=5, allow_redirects=False)
        assert hop.status_code == 302 and hop.headers["Location"] == METADATA_URL
        policy.check_url(hop.headers["Location"])  # a well-formed http URL: only the connect check stops it
        denied = _denial(lambda: s.get(hop.headers["Location"], timeout=5, allow_redirects=False))
        assert str(denied).startswith("169.254.169.254 is a link-local address")
        # A caller that forgets allow_redirects=False is still covered: requests' own hop uses the same adapter.
        followed = _denial(lambda: s.get(f"{base}/redirect", timeout=5))
        assert str(followed).startswith("169.254.169.254 is a link-local address")


def test_proxies_from_the_environment_are_ignored(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = "http://127.0.0.1:9"  # nothing listens there: a request sent through it would fail
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, bogus)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    url = f"http://127.0.0.1:{_port(server)}/"
    assert requests.utils.get_environ_proxies(url)  # a default requests session would use the proxy
    with session(OutboundPolicy(allowed=LOCAL)) as s:
        assert s.get(url, timeout=5).text == "ok"
        # Nor may a caller pass one: the proxy, not the pinned socket, would choose where to connect.
        with pytest.raises(OutboundDenied, match="proxies are not allowed"):
            s.get(url, timeout=5, proxies={"http": bogus})
    assert server.accepted == 1


def test_a_connect_timeout_maps_to_requests_connect_timeout() -> None:
    # A listener whose accept queue is full drops new SYNs, so a connect to it times out, all on loopback.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.settimeout(0.2)
            fillers.append(filler)
            try:
                filler.connect(listener.getsockname())
            except TimeoutError:
                break
        else:
            pytest.skip("this kernel accepts connections past the listen backlog")
        with session(OutboundPolicy(allowed=LOCAL)) as s, pytest.raises(requests.exceptions.ConnectTimeout):
            s.get(f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout=(0.3, 1))
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


# --- HTTPS: the socket is pinned, the certificate is still checked for the name --------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[_Server, Path]]:
    """A local HTTPS server with a self-signed certificate for ``pinned.test``; yields it and the CA file."""
    pytest.importorskip("cryptography")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pinned.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("pinned.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv, cert_file
    srv.shutdown()
    srv.server_close()


def test_https_connects_to_the_checked_address_and_verifies_the_name(tls_server: tuple[_Server, Path]) -> None:
    srv, ca = tls_server
    resolver = FakeResolver({"pinned.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    with session(OutboundPolicy(allowed=LOCAL, resolver=resolver)) as s:
        response = s.get(f"https://pinned.test:{_port(srv)}/", timeout=5, verify=str(ca))
        assert response.text == "ok"
        # Same socket target, another name: the certificate does not match it, so TLS refuses.
        with pytest.raises(requests.exceptions.SSLError):
            s.get(f"https://other.test:{_port(srv)}/", timeout=5, verify=str(ca))
