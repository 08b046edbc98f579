"""How each setting's text becomes a value: the parsers ``config.py`` names in its declarations. Each raises
``ValueError`` with a short reason; the loader adds the variable and where its value came from."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from urllib.parse import urlsplit


def integer(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


def decimal(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw.strip())
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}")
        return value

    return parse


def text(raw: str) -> str:
    return raw.strip()


def level(raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
    return value


def choice(*values: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in values:
            raise ValueError(f"must be one of {', '.join(values)}")
        return value

    return parse


def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def hosts(raw: str) -> tuple[str, ...]:
    """Comma-separated CIDRs/addresses or host names (``*.example.com`` matches subdomains)."""
    out = []
    for item in (x.strip().lower().rstrip(".") for x in raw.split(",")):
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
            continue
        except ValueError:
            pass
        name = item[2:] if item.startswith("*.") else item
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?)*", name):
            raise ValueError(f"{item!r} is neither a CIDR nor a host name")
        out.append(item)
    return tuple(out)


def url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        if not value:
            return ""
        if urlsplit(value).scheme not in schemes:
            raise ValueError(f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}")
        if "postgres" in schemes:
            _check_conninfo(value)
        return value

    return parse


def _check_conninfo(url: str) -> None:
    """libpq must be able to read the URL (a stray '%' in a password is the usual mistake). Checked here, once,
    because libpq's complaint would quote the password later, wherever the connection is first opened."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except Exception:  # psycopg.ProgrammingError; its message quotes the offending part of the URL
        raise ValueError("libpq cannot read this URL (percent-encode special characters of the password)") from None


def addresses(default_port: int) -> Callable[[str], tuple[str, ...]]:
    """Comma-separated ``host:port`` (``[v6]:port``; a missing port is ``default_port``), as ``host:port`` strings."""

    def parse(raw: str) -> tuple[str, ...]:
        out = []
        for item in (x.strip() for x in raw.split(",")):
            if not item:
                continue
            try:
                parts = urlsplit("//" + item)
                host, port = parts.hostname, parts.port or default_port
            except ValueError:
                raise ValueError(f"{item!r} is not host:port") from None
            if not host or parts.path or parts.username or parts.password:
                raise ValueError(f"{item!r} is not host:port")
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return tuple(out)

    return parse


def readable_file(raw: str) -> str:
    """A path to a file this process can read, or "" (none); checked now, so a typo stops the start, not a
    connection much later."""
    value = raw.strip()
    if value and not (os.path.isfile(value) and os.access(value, os.R_OK)):
        raise ValueError("no readable file there")
    return value
