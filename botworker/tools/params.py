"""Declared tool parameters: read a tool's ``config.parameters``, validate a call's values, describe them to an LLM.

A tool config may declare its parameters in either of two shapes (a JSON-Schema subset)::

    {"parameters": {"city": {"type": "string", "required": true}, "days": {"type": "integer", "minimum": 1}}}
    {"parameters": {"type": "object", "properties": {"city": {...}}, "required": ["city"]}}

Supported keywords: ``type`` (string, integer, number, boolean, array, object), ``required``, ``description``,
``enum``, ``default``, ``minimum``/``maximum``, ``minLength``/``maxLength``, ``pattern``, ``items`` (for arrays).
Values detected in message text arrive as strings, so numbers and booleans are coerced from their text; anything
that does not fit is refused with a reason naming the parameter, before the tool runs.

A tool that declares nothing takes the ``{{name}}`` placeholders of its config as optional string parameters
(validation then happens where they are filled). Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .platform import allowed_operations

TYPES = ("string", "integer", "number", "boolean", "array", "object")
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
MAX_STRING = 10_000  # characters of one string parameter, whatever the declaration says
_SCRIPT_PARAM = re.compile(r"""\bparams\s*(?:\.get\(\s*|\[\s*)["']([A-Za-z_][A-Za-z0-9_]*)["']""")
_TEMPLATE_KEYS = ("url", "headers", "body", "query", "command", "path", "content", "cwd")


class InvalidParams(ValueError):
    """A call's parameters do not fit the tool's declaration; ``str()`` names the parameter."""


def declared(tool: Mapping[str, Any]) -> dict[str, dict[str, Any]] | None:
    """name -> spec (with ``required`` folded in as a boolean), or None when the config declares nothing."""
    config = tool.get("config") if isinstance(tool.get("config"), dict) else {}
    raw = config.get("parameters")
    if not isinstance(raw, dict) or not raw:
        return None
    if raw.get("type") == "object" and isinstance(raw.get("properties"), dict):
        listed = raw.get("required")
        # An owner's config may say `"required": "city"` or something odd: read what can be read, never raise.
        required = (
            {listed}
            if isinstance(listed, str)
            else {str(n) for n in listed if isinstance(n, str)}
            if isinstance(listed, list)
            else set()
        )
        props = raw["properties"]
        return {
            str(k): {**_spec(v), "required": k in required or bool(_spec(v).get("required"))} for k, v in props.items()
        }
    return {str(k): {**_spec(v), "required": bool(_spec(v).get("required"))} for k, v in raw.items()}


def _spec(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value in TYPES:  # shorthand: {"city": "string"}
        return {"type": value}
    return {}


def names(tool: Mapping[str, Any]) -> list[str]:
    """The parameters a tool takes: declared ones (in declaration order), else its template placeholders."""
    specs = declared(tool)
    return list(specs) if specs is not None else template_names(tool)


def template_names(tool: Mapping[str, Any]) -> list[str]:
    """``{{name}}`` placeholders used anywhere in the config's templates, in order of first appearance."""
    config = tool.get("config") if isinstance(tool.get("config"), dict) else {}
    names: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            names.extend(n for n in PLACEHOLDER.findall(value) if n not in names)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for key in _TEMPLATE_KEYS:
        walk(config.get(key))
    if isinstance(config.get("script"), str):  # a custom script's parameters are the keys it reads from `params`
        names.extend(n for n in _SCRIPT_PARAM.findall(config["script"]) if n not in names)
    return names


def validate(tool: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The call's parameters checked and coerced against the declaration (defaults filled in). Parameters the
    declaration does not name are passed through untouched: detection adds ``url``, ``path``, ``param1``..."""
    specs = declared(tool)
    out = dict(params)
    if specs is None:
        return out
    for name, spec in specs.items():
        if name not in out or out[name] is None or out[name] == "":
            if "default" in spec:
                out[name] = spec["default"]
                continue
            if spec.get("required"):
                raise InvalidParams(f"parameter {name!r} is required" + _about(spec))
            out.pop(name, None)
            continue
        out[name] = _check(name, spec, out[name])
    return out


def _about(spec: Mapping[str, Any]) -> str:
    return f" ({spec['description']})" if isinstance(spec.get("description"), str) and spec["description"] else ""


def _check(name: str, spec: Mapping[str, Any], value: Any) -> Any:
    kind = spec.get("type", "string")
    value = _coerce(name, kind, value)
    if "enum" in spec and isinstance(spec["enum"], list) and value not in spec["enum"]:
        raise InvalidParams(f"parameter {name!r} must be one of {', '.join(map(str, spec['enum']))}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(spec.get("minimum"), (int, float)) and value < spec["minimum"]:
            raise InvalidParams(f"parameter {name!r} must be at least {spec['minimum']}")
        if isinstance(spec.get("maximum"), (int, float)) and value > spec["maximum"]:
            raise InvalidParams(f"parameter {name!r} must be at most {spec['maximum']}")
    if isinstance(value, str):
        limit = min(_count(spec.get("maxLength"), MAX_STRING), MAX_STRING)
        if len(value) > limit:
            raise InvalidParams(f"parameter {name!r} is longer than {limit} characters")
        if _count(spec.get("minLength"), 0) and len(value) < spec["minLength"]:
            raise InvalidParams(f"parameter {name!r} must be at least {spec['minLength']} characters")
        if isinstance(spec.get("pattern"), str):
            try:
                matched = re.fullmatch(spec["pattern"], value)
            except re.error:
                raise InvalidParams(f"parameter {name!r} has an invalid pattern in the tool's config") from None
            if not matched:
                raise InvalidParams(f"parameter {name!r} does not match the pattern {spec['pattern']}")
    if isinstance(value, list) and isinstance(spec.get("items"), dict):
        value = [_check(f"{name}[{i}]", spec["items"], item) for i, item in enumerate(value)]
    return value


def _count(value: Any, default: int) -> int:
    """A non-negative integer constraint from the config; anything else in its place is ignored."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _coerce(name: str, kind: Any, value: Any) -> Any:
    if kind == "string":
        if isinstance(value, (dict, list)):
            raise InvalidParams(f"parameter {name!r} must be a string")
        return value if isinstance(value, str) else _text(value)
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise InvalidParams(f"parameter {name!r} must be true or false")
    if kind in ("integer", "number"):
        if isinstance(value, (bool, dict, list)):
            raise InvalidParams(f"parameter {name!r} must be a{'n integer' if kind == 'integer' else ' number'}")
        if isinstance(value, int):
            return value  # exact, however large
        text = str(value).strip()
        if kind == "integer" and re.fullmatch(r"[+-]?[0-9]+", text):
            return int(text)  # exact: float() would round integers beyond 2**53
        try:
            number = float(text)
        except (TypeError, ValueError):
            raise InvalidParams(
                f"parameter {name!r} must be a{'n integer' if kind == 'integer' else ' number'}"
            ) from None
        if not math.isfinite(number):
            raise InvalidParams(f"parameter {name!r} must be a finite number")
        if kind == "integer":
            if number != int(number):
                raise InvalidParams(f"parameter {name!r} must be an integer")
            return int(number)
        return number
    if kind == "array":
        if not isinstance(value, list):
            raise InvalidParams(f"parameter {name!r} must be a list")
        return value
    if kind == "object":
        if not isinstance(value, dict):
            raise InvalidParams(f"parameter {name!r} must be an object")
        return value
    return value  # an unknown type in the config: no check (the config is the owner's, not the caller's)


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 3.0 from an LLM is the "3" a template expects
    return str(value)


# ---- what an LLM is told -----------------------------------------------------------------------------------


def function_name(tool: Mapping[str, Any]) -> str:
    """A function name Gemini accepts (``[A-Za-z_][A-Za-z0-9_.-]{0,63}``), derived from the tool's name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(tool.get("name") or "tool")).strip("_") or "tool"
    if not re.match(r"[A-Za-z_]", name):
        name = "t_" + name
    return name[:64]


def json_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The tool's parameters as a JSON-Schema object (declared ones, else its template placeholders)."""
    if tool.get("type") == "mcp_tool":
        ops = list(allowed_operations(dict(tool)))
        return {
            "type": "object",
            "properties": {
                "operation": {"type": "string", "enum": ops, "description": "the platform operation to run"},
                "query": {"type": "string", "description": "search text, for search_platform"},
            },
            "required": ["operation"],
        }
    specs = declared(tool)
    if specs is None:
        names = template_names(tool)
        return {"type": "object", "properties": {n: {"type": "string"} for n in names}, "required": []}
    props: dict[str, Any] = {}
    for name, spec in specs.items():
        props[name] = _schema_of(spec)
    return {"type": "object", "properties": props, "required": [n for n, s in specs.items() if s.get("required")]}


def _schema_of(spec: Any) -> dict[str, Any]:
    """A declared parameter as JSON Schema a model API accepts: known keys only, unknown types as strings."""
    spec = _spec(spec)
    prop = {k: v for k, v in spec.items() if k in _SCHEMA_KEYS}
    if prop.get("type") not in TYPES:
        prop["type"] = "string"
    if prop["type"] == "array":
        prop["items"] = _schema_of(prop.get("items"))
    else:
        prop.pop("items", None)
    if "enum" in prop and not (isinstance(prop["enum"], list) and prop["enum"]):
        del prop["enum"]
    return prop


_SCHEMA_KEYS = ("type", "description", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern", "items")


def declaration(tool: Mapping[str, Any]) -> dict[str, Any]:
    """``{"name", "description", "parameters"}``: one function declaration for function calling."""
    description = str(tool.get("description") or tool.get("displayName") or tool.get("name") or "")
    return {"name": function_name(tool), "description": description[:1000], "parameters": json_schema(tool)}
