"""Outbound network policy: where HTTP tools (and database tools connecting to a DSN) may connect.

It defends against server-side request forgery: a bot's tool, steered by a user or a prompt, asking the worker
to fetch ``http://127.0.0.1:6379/``, a private service, the cloud metadata endpoints (``169.254.169.254``,
``fd00:ec2::254``, ``100.100.100.200``) or anything else that is not on the public internet.

How:

* ``blocked_reason`` judges one IP address: loopback, private, link-local, carrier-grade NAT, multicast,
  reserved, documentation, benchmarking... or anything else Python's ``ipaddress`` does not call global.
  IPv6 forms that carry an IPv4 address (IPv4-mapped, NAT64, 6to4) are judged by the address they carry.
* ``OutboundPolicy.resolve`` resolves a host once and refuses it if *any* address is blocked, so a name that
  answers both public and private addresses is refused rather than half-trusted. IP literals in any spelling
  (``0x7f000001``, ``2130706433``, ``[::1]``) go through ``getaddrinfo`` too and are judged by what they mean.
* ``pinned.session`` returns a ``requests.Session`` whose connections are pinned: each new TCP connection resolves
  through the policy and connects to exactly the address it checked, so DNS rebinding (a safe answer for the
  check, an internal one for the connect) cannot switch it. TLS still verifies the certificate for the name.
  Redirects into internal addresses are refused because every hop opens its connection through the same
  pinned adapter; callers pass ``allow_redirects=False`` and follow (and count) redirects themselves.
* Proxies are refused and ``trust_env`` is off: ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY`` and ``.netrc``
  from the worker's environment are ignored, since a proxy would make the connection, not the pinned socket.
* ``check_url`` refuses early, with a readable reason, what is never allowed: schemes other than http/https,
  URLs without a host, and credentials in the URL. The connect-time check is the one that cannot be fooled
  by URL parser differences; ``check_url`` only gives a better error sooner.

The allowlist (``HTTP_ALLOWED_HOSTS``) opens what would be blocked: a CIDR entry (``10.0.0.0/8``) allows the
addresses inside it whatever name led there; a host name entry (``intranet.corp``, or ``*.corp.example`` for
any subdomain of corp.example) allows every address that name resolves to.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_HINT = "set HTTP_ALLOWED_HOSTS to allow it"


class OutboundDenied(OSError):
    """A destination the policy refuses; ``str()`` names the host and address and says why."""


class ResolveError(OSError):
    """The host name could not be resolved: a (possibly transient) failure, not a policy decision."""


# Checked before the generic ipaddress properties so the reason is specific (most of these are also
# ``is_private``). Ranges Python's ipaddress does not flag at all are the reason this table exists.
_V4_RANGES: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", "a 'this network' address"),  # connecting to 0.x reaches the local host on Linux
        ("100.64.0.0/10", "a carrier-grade NAT address"),  # also Alibaba Cloud's metadata, 100.100.100.200
        ("255.255.255.255/32", "the broadcast address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("192.0.2.0/24", "a documentation address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("192.0.0.0/24", "an IETF protocol assignment address"),
    )
)
_V6_RANGES: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), reason)
    for net, reason in (
        ("fc00::/7", "a unique local (private) address"),  # AWS's IPv6 metadata, fd00:ec2::254, lives here
        ("fec0::/10", "a site-local address"),  # deprecated, but ipaddress calls it global
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
        ("2001::/32", "a Teredo address"),
        ("2001:db8::/32", "a documentation address"),
        ("3fff::/20", "a documentation address"),
        ("100::/64", "a discard-only address"),
    )
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def blocked_reason(ip: IPAddress) -> str | None:
    """None if ``ip`` is publicly routable; otherwise why not, phrased to follow "<address> is"."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            kind, v4 = embedded
            inner = blocked_reason(v4)
            return None if inner is None else f"{inner} ({kind} {v4})"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"  # includes 169.254.169.254, the cloud metadata endpoint
    if ip.is_multicast:
        return "a multicast address"
    ranges: tuple[tuple[Any, str], ...] = _V4_RANGES if ip.version == 4 else _V6_RANGES
    for net, reason in ranges:
        if ip in net:
            return reason
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not globally routable"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, NAT64, 6to4), with the form's name."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped  # a dual-stack socket connects to the IPv4 address itself
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)  # the gateway forwards to it
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    return None


def _split_allowed(entries: tuple[str, ...]) -> tuple[tuple[IPNetwork, ...], tuple[str, ...]]:
    """HTTP_ALLOWED_HOSTS entries as (networks, normalised host names)."""
    networks: list[IPNetwork] = []
    names: list[str] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            names.append(_normal_host(entry))
    return tuple(networks), tuple(names)


def _normal_host(host: str) -> str:
    host = host.strip().strip("[]").rstrip(".").lower()
    try:
        # requests sends IDNs as punycode; an allowlist entry may be written either way.
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


@dataclass(frozen=True)
class OutboundPolicy:
    """Which destinations tools may connect to: public addresses, plus what ``allowed`` opens."""

    allowed: tuple[str, ...] = ()  # HTTP_ALLOWED_HOSTS: CIDRs, host names, '*.example.com'
    resolver: Callable[..., list[Any]] = socket.getaddrinfo  # same signature as socket.getaddrinfo
    _allowed_networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)
    _allowed_names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        networks, names = _split_allowed(self.allowed)
        object.__setattr__(self, "_allowed_networks", networks)
        object.__setattr__(self, "_allowed_names", names)

    def host_allowed(self, host: str) -> bool:
        """True if ``host`` is an allowed name ('*.x.com' matches a.x.com and a.b.x.com, not x.com)."""
        name = _normal_host(host)
        if not name:
            return False
        for entry in self._allowed_names:
            if entry.startswith("*."):
                if name.endswith(entry[1:]):
                    return True
            elif name == entry:
                return True
        return False

    def check_url(self, url: str) -> None:
        """Refuse URLs no connection may come from: other schemes, no host, credentials in the URL."""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - property access validates the port
        except ValueError as exc:
            raise OutboundDenied(f"invalid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise OutboundDenied(f"URL scheme {scheme or '(none)'!r} is not allowed (only http and https)")
        if "@" in parts.netloc:
            # Never echo the URL here: it holds the credentials.
            raise OutboundDenied("credentials in the URL (user:pass@) are not allowed: send them in headers")
        if not parts.hostname:
            raise OutboundDenied("the URL has no host")

    def resolve(self, host: str, port: int) -> list[tuple[int, str]]:
        """Resolve ``host`` once; the acceptable ``(family, ip)`` pairs in resolver order, or OutboundDenied."""
        name = host.strip().strip("[]")
        try:
            infos = self.resolver(name, port, type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:  # gaierror, and ValueError/UnicodeError for malformed names
            raise ResolveError(f"cannot resolve host {name}: {exc}") from exc
        if not infos:
            raise ResolveError(f"cannot resolve host {name}: no addresses")
        name_allowed = self.host_allowed(name)
        out: list[tuple[int, str]] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                raise OutboundDenied(f"{name} resolves to a non-IP address ({family!r})")
            ip_text = str(sockaddr[0])
            if not name_allowed:
                self._check_address(name, ip_text)
            if (family, ip_text) not in out:
                out.append((family, ip_text))
        return out

    def _check_address(self, host: str, ip_text: str) -> None:
        try:
            ip = ipaddress.ip_address(ip_text)
        except ValueError:
            raise OutboundDenied(f"{host} resolves to {ip_text!r}, which is not an IP address") from None
        if self._address_allowed(ip):
            return
        reason = blocked_reason(ip)
        if reason is None:
            return
        subject = ip_text if _same_address(host, ip) else f"{host} resolves to {ip_text}, which"
        raise OutboundDenied(f"{subject} is {reason} ({_HINT})")

    def _address_allowed(self, ip: IPAddress) -> bool:
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)  # an allowed 127.0.0.1/32 also covers ::ffff:127.0.0.1
        return any(c in net for c in candidates for net in self._allowed_networks)


def _same_address(host: str, ip: IPAddress) -> bool:
    try:
        return ipaddress.ip_address(host) == ip
    except ValueError:
        return False


def pin_dsn_host(policy: OutboundPolicy, host: str, port: int) -> str:
    """The checked IP to pass as libpq ``hostaddr`` (``host`` stays for TLS and .pgpass), or OutboundDenied."""
    if not host or host.startswith(("/", "@")):
        # libpq reads an empty host, a path or an abstract name as a unix socket: local by definition.
        raise OutboundDenied("unix sockets are not allowed")
    if "," in host:
        raise OutboundDenied("multiple hosts in one DSN are not supported")
    return policy.resolve(host, port)[0][1]


def denied_in(exc: BaseException) -> OutboundDenied | None:
    """The OutboundDenied behind ``exc`` (requests wraps urllib3 errors that wrap it), or None."""
    queue: deque[BaseException] = deque([exc])
    seen: set[int] = set()
    while queue:
        current = queue.popleft()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OutboundDenied):
            return current
        # MaxRetryError keeps its cause in .reason, not in args; exception groups in .exceptions.
        linked = (current.__cause__, current.__context__, getattr(current, "reason", None), *current.args)
        queue.extend(x for x in linked if isinstance(x, BaseException))
        queue.extend(x for x in getattr(current, "exceptions", ()) if isinstance(x, BaseException))
    return None
