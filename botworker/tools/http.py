"""``http_request`` tools: one HTTP call built from the tool's config, through this worker's pinned session.

Config: ``{"url", "method"?: "GET", "headers"?: {}, "body"?: str | object, "timeout"?: s (ms when > 300),
"secretId"?, "secretHeader"?, "retry"?, "maxAttempts"?}``. ``{{name}}`` placeholders are filled from the call's
parameters, never spliced raw:
- in the URL: URL-encoded (a template that is exactly one placeholder takes a whole URL from it);
- in header values: as text, and a value with CR, LF or NUL is refused (no header injection);
- in a JSON body (an object, or a string that parses as JSON): a string that is exactly one placeholder becomes
  the parameter's JSON value, placeholders inside strings are filled as text, and the body is serialised by
  ``json``; in a non-JSON string body: JSON-escaped.
Every connection goes through ``outbound.py`` (no loopback, private, link-local or metadata addresses unless
HTTP_ALLOWED_HOSTS opens them); redirects are followed here, at most 5, each hop checked the same way, and a
secret header is dropped when a redirect leaves the origin. The response body is read up to
HTTP_MAX_RESPONSE_BYTES within the tool's total timeout.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus, urljoin, urlsplit
from xml.sax.saxutils import escape as xml_escape

import requests
import urllib3

from .. import errors
from ..message import ToolCall
from ..retry import retry_after
from . import ToolContext, ToolFailure, config_of, outbound, pinned, secret_id_of
from .params import PLACEHOLDER

TYPES = ("http_request",)
METHODS = ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE")
IDEMPOTENT = ("GET", "HEAD", "OPTIONS")
TRANSIENT_STATUS = (429, 502, 503, 504)
MAX_REDIRECTS = 5
SHOWN_HEADERS = ("content-type", "content-length", "etag", "last-modified", "location", "retry-after")
_BAD_HEADER_CHARS = ("\r", "\n", "\x00")


def retryable(tool: dict[str, Any]) -> bool:
    return str(config_of(tool).get("method") or "GET").upper() in IDEMPOTENT


def run(call: ToolCall, tool: dict[str, Any], ctx: ToolContext) -> Any:
    config = config_of(tool)
    if ctx.http is None:
        raise ToolFailure("this worker has no HTTP session")
    method = str(config.get("method") or "GET").upper()
    if method not in METHODS:
        raise ToolFailure(f"HTTP method {method!r} is not supported", errors.TOOL_INVALID_PARAMS)
    secret_id = secret_id_of(config)
    if secret_id and _origin_has_placeholder(config.get("url")):
        # The secret would go wherever the caller (a user, or a prompt-injected model) points the URL.
        raise ToolFailure(
            "a tool that sends a secret must have a fixed scheme and host in its URL", errors.TOOL_INVALID_PARAMS
        )
    url = fill_url(config.get("url"), call.params)
    headers = fill_headers(config.get("headers"), call.params)
    declared_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    body, content_type = fill_body(config.get("body"), call.params, declared_type)
    if content_type and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = content_type
    secret_header: str | None = None
    if secret_id:
        if ctx.secrets is None:
            raise ToolFailure("secrets are not available here")
        secret = ctx.secrets.get(secret_id)
        secret_header = str(config.get("secretHeader") or "Authorization")
        _check_header(secret_header, "")
        value = secret.value if config.get("secretHeader") else f"Bearer {secret.value}"
        if any(c in value for c in _BAD_HEADER_CHARS):
            raise ToolFailure("the secret's value cannot be sent in a header (it contains a line break)")
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise ToolFailure("the secret's value cannot be sent in a header (it is not Latin-1 text)") from None
        headers[secret_header] = value
    timeout = _timeout(config.get("timeout"), ctx)
    with pinned.Deadline(timeout) as guard:
        try:
            return _send(ctx, method, url, headers, body, timeout, secret_header)
        except ToolFailure:
            if guard.expired:  # a read cut short by the deadline surfaces as whatever error the cut caused
                raise ToolFailure(f"{method} {_shown(url)} timed out after {timeout:g}s", transient=True) from None
            raise


def fill_url(template: Any, values: Mapping[str, Any]) -> str:
    """The request URL: placeholders URL-encoded; a template that is one placeholder takes a whole URL."""
    if not isinstance(template, str) or not template.strip():
        raise ToolFailure("http_request tool has no `url` in its config")
    template = template.strip()
    whole = PLACEHOLDER.fullmatch(template)
    if whole:
        url = _text(_value(values, whole.group(1))).strip()
    else:
        url = PLACEHOLDER.sub(lambda m: quote(_text(_value(values, m.group(1))), safe=""), template)
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ToolFailure(f"{_shown(url)!r} is not an http(s) URL", errors.TOOL_INVALID_PARAMS)
    return url


def _origin_has_placeholder(template: Any) -> bool:
    """Whether ``{{...}}`` appears in the URL template before its path (scheme, credentials, host or port)."""
    if not isinstance(template, str):
        return False
    text = template.strip()
    scheme_end = text.find("://")
    if scheme_end < 0:
        return bool(PLACEHOLDER.search(text))
    rest = text[scheme_end + 3 :]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    return bool(PLACEHOLDER.search(text[: scheme_end + 3 + end]))


def fill_headers(template: Any, values: Mapping[str, Any]) -> dict[str, str]:
    if template is None:
        return {}
    if not isinstance(template, dict):
        raise ToolFailure("`headers` must be an object")
    out: dict[str, str] = {}
    for name, raw in template.items():
        value = PLACEHOLDER.sub(lambda m: _text(_value(values, m.group(1))), str(raw))
        _check_header(str(name), value)
        out[str(name)] = value
    return out


def _check_header(name: str, value: str) -> None:
    if not name or any(c in name for c in (*_BAD_HEADER_CHARS, ":", " ")):
        raise ToolFailure(f"header name {name[:60]!r} is invalid", errors.TOOL_INVALID_PARAMS)
    if any(c in value for c in _BAD_HEADER_CHARS):
        raise ToolFailure(
            f"header {name} would contain a line break or NUL: refused (header injection)", errors.TOOL_INVALID_PARAMS
        )
    try:
        (name + value).encode("latin-1")  # what HTTP/1.1 header bytes can carry; requests would fail later
    except UnicodeEncodeError:
        raise ToolFailure(f"header {name} must be Latin-1 text", errors.TOOL_INVALID_PARAMS) from None


def fill_body(template: Any, values: Mapping[str, Any], content_type: str = "") -> tuple[bytes | None, str | None]:
    """(body bytes, content type to set) from the config's body template. A text template is filled with the
    escaping its content type needs: form fields URL-encoded, XML/HTML escaped, anything else JSON-escaped."""
    if template is None or template == "":
        return None, None
    if isinstance(template, str):
        kind = content_type.lower()
        if "x-www-form-urlencoded" in kind:
            escape: Callable[[str], str] = lambda v: quote_plus(v)  # noqa: E731
        elif "xml" in kind or "html" in kind:
            escape = lambda v: xml_escape(v, {'"': "&quot;", "'": "&apos;"})  # noqa: E731
        else:
            try:
                template = json.loads(template)
            except ValueError:
                escape = lambda v: json.dumps(v)[1:-1]  # noqa: E731
        if isinstance(template, str):
            text = PLACEHOLDER.sub(lambda m: escape(_text(_value(values, m.group(1)))), template)
            return text.encode("utf-8"), None
    filled = _fill_json(template, values)
    return json.dumps(filled, ensure_ascii=False).encode("utf-8"), "application/json"


def _fill_json(node: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(node, str):
        whole = PLACEHOLDER.fullmatch(node.strip())
        if whole:
            return _value(values, whole.group(1))  # typed: a number stays a number
        return PLACEHOLDER.sub(lambda m: _text(_value(values, m.group(1))), node)
    if isinstance(node, dict):
        return {k: _fill_json(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill_json(v, values) for v in node]
    return node


def _value(values: Mapping[str, Any], name: str) -> Any:
    if name not in values or values[name] is None:
        raise ToolFailure(f"parameter {name!r} is missing", errors.TOOL_INVALID_PARAMS)
    return values[name]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _timeout(raw: Any, ctx: ToolContext) -> float:
    if raw is None:
        return min(ctx.cfg.http_timeout, ctx.cfg.http_max_timeout)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw <= 0:
        raise ToolFailure("`timeout` must be a positive number of seconds")
    seconds = raw / 1000 if raw > 300 else float(raw)  # the platform writes large timeouts in milliseconds
    return min(seconds, ctx.cfg.http_max_timeout)


def _send(
    ctx: ToolContext,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None,
    timeout: float,
    secret_header: str | None,
) -> dict[str, Any]:
    """One request and its redirects (each hop through the policy), then its response, within ``timeout``."""
    assert ctx.http is not None
    deadline = time.monotonic() + timeout
    origin = _origin(url)
    for _hop in range(MAX_REDIRECTS + 1):
        left = deadline - time.monotonic()
        if left <= 0:
            raise ToolFailure(f"{method} {_shown(url)} timed out after {timeout:g}s", transient=True)
        try:
            outbound.OutboundPolicy(ctx.cfg.http_allowed_hosts).check_url(url)
            resp = ctx.http.request(
                method, url, headers=headers, data=body, timeout=(min(left, 10.0), left), stream=True,
                allow_redirects=False,
            )  # fmt: skip
        except outbound.OutboundDenied as exc:
            raise ToolFailure(f"{_shown(url)} is not allowed: {exc}", errors.TOOL_DENIED) from None
        except requests.RequestException as exc:
            denied = outbound.denied_in(exc)
            if denied is not None:
                raise ToolFailure(f"{_shown(url)} is not allowed: {denied}", errors.TOOL_DENIED) from None
            kind = "timed out" if isinstance(exc, requests.Timeout) else "could not connect"
            raise ToolFailure(f"{method} {_shown(url)} {kind}: {_reason(exc)}", transient=True) from None
        with resp:
            if resp.is_redirect and resp.headers.get("location"):
                url = urljoin(url, resp.headers["location"])
                if resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST"):
                    method, body = "GET", None
                    headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
                if secret_header and _origin(url) != origin:
                    headers = {k: v for k, v in headers.items() if k.lower() != secret_header.lower()}
                continue
            return _response(resp, method, deadline, ctx.cfg.http_max_response_bytes, timeout)
    raise ToolFailure(f"more than {MAX_REDIRECTS} redirects from {_shown(url)}")


def _response(resp: requests.Response, method: str, deadline: float, max_bytes: int, timeout: float) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    truncated = False
    try:
        # read1: whatever has arrived, so the deadline is checked as bytes trickle in; a read blocked when it
        # passes is cut by pinned.Deadline.
        while not resp.raw.closed:
            if time.monotonic() > deadline:
                raise ToolFailure(f"{method} {_shown(resp.url)} timed out reading the response", transient=True)
            chunk = resp.raw.read1(65536, decode_content=True)
            if not chunk:
                break
            size += len(chunk)
            chunks.append(chunk)
            if size > max_bytes:
                truncated = True
                break
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise ToolFailure(f"{method} {_shown(resp.url)} failed while reading: {_reason(exc)}", transient=True) from None
    if time.monotonic() >= deadline:  # the end of the body may be the deadline's cut, not the server's
        raise ToolFailure(f"{method} {_shown(resp.url)} timed out reading the response", transient=True)
    raw = b"".join(chunks)[:max_bytes]
    status = resp.status_code
    if status in TRANSIENT_STATUS:
        raise ToolFailure(
            f"{method} {_shown(resp.url)} answered {status} {resp.reason or ''}".strip(),
            transient=True,
            retry_after=retry_after(resp.headers.get("retry-after")),
        )
    out: dict[str, Any] = {
        "status": status,
        "ok": status < 400,
        "headers": {k: resp.headers[k] for k in SHOWN_HEADERS if k in resp.headers},
    }
    try:
        text = raw.decode(resp.encoding or "utf-8", errors="replace")
    except (LookupError, UnicodeError):  # a charset Python does not know or cannot apply: still worth showing
        text = raw.decode("utf-8", errors="replace")
    if "json" in resp.headers.get("content-type", "").lower() and not truncated:
        try:
            out["json"] = json.loads(text)  # NaN/Infinity it may hold become text in budget.finite, for every family
        except ValueError:
            out["text"] = text
    else:
        out["text"] = text
    if truncated:
        out["truncated"] = True
        out["note"] = f"response cut at {max_bytes} bytes"
    if status >= 400:
        raise ToolFailure(f"{method} {_shown(resp.url)} answered {status}: {text[:300]}")
    return out


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _shown(url: str) -> str:
    """The URL without its query (parameters may carry personal data) for errors and logs."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # never the user:password@ part
    return f"{parts.scheme}://{host}{parts.path}"[:200]


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return (text[:200] + "…") if len(text) > 200 else text
