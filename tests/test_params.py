"""Unit tests (pure, no servers) of declared tool parameters (``tools/params.py``) and of tool detection and
parameter extraction from message text (``detect.py``)."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import pytest

from botworker.detect import detect, tool_params
from botworker.tools import params
from botworker.tools.params import MAX_STRING, InvalidParams
from botworker.tools.platform import OPERATIONS as PLATFORM_OPERATIONS

GEMINI_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


def tool_with(parameters: Any, **extra: Any) -> dict[str, Any]:
    return {"id": "t1", "name": "t", "type": "http_request", "config": {"parameters": parameters}, **extra}


# ---- declared --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "expected"),
    [
        pytest.param(
            tool_with({"city": {"type": "string", "required": True}, "days": {"type": "integer", "minimum": 1}}),
            {
                "city": {"type": "string", "required": True},
                "days": {"type": "integer", "minimum": 1, "required": False},
            },
            id="flat",
        ),
        pytest.param(
            tool_with(
                {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                    "required": ["city"],
                }
            ),
            {"city": {"type": "string", "required": True}, "days": {"type": "integer", "required": False}},
            id="json-schema-object",
        ),
        pytest.param(
            tool_with({"type": "object", "properties": {"city": {"type": "string", "required": True}}}),
            {"city": {"type": "string", "required": True}},
            id="object-with-required-on-property",
        ),
        pytest.param(
            tool_with({"city": "string", "n": "integer"}),
            {"city": {"type": "string", "required": False}, "n": {"type": "integer", "required": False}},
            id="shorthand",
        ),
        pytest.param(
            tool_with({"type": "object", "properties": {"city": "string"}, "required": ["city"]}),
            {"city": {"type": "string", "required": True}},
            id="shorthand-inside-properties",
        ),
        pytest.param(
            tool_with({"x": "not-a-type", "y": 42}),
            {"x": {"required": False}, "y": {"required": False}},
            id="unreadable-specs-are-empty",
        ),
        pytest.param({"parameters": {"city": "string"}}, None, id="parameters-outside-config"),
        pytest.param({"id": "t"}, None, id="no-config"),
        pytest.param({"config": "not a dict"}, None, id="config-not-dict"),
        pytest.param({"config": {}}, None, id="no-parameters"),
        pytest.param(tool_with({}), None, id="empty-parameters"),
        pytest.param(tool_with(["city"]), None, id="parameters-list"),
        pytest.param(tool_with("city"), None, id="parameters-string"),
    ],
)
def test_declared(tool: dict[str, Any], expected: Any) -> None:
    assert params.declared(tool) == expected


def test_declared_object_with_boolean_required_does_not_crash() -> None:
    # A malformed (owner-written) config must not raise out of declared(): detect() and ToolRunner.declarations()
    # call it outside the dispatch boundary, so a TypeError here takes the whole message down.
    tool = tool_with({"type": "object", "properties": {"city": {"type": "string"}}, "required": True})
    assert params.declared(tool) is not None


def test_detect_survives_malformed_required() -> None:
    tool = {
        "id": "1",
        "name": "weather_api",
        "type": "http_request",
        "config": {"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": True}},
    }
    assert [c.name for c in detect("call the weather api", [tool])] == ["weather_api"]


# ---- validate --------------------------------------------------------------------------------------------------

OK = object()  # marker: the row expects no error


VALIDATE_ROWS = [
    # (spec of parameter "p", value given (MISSING = not given), expected value or InvalidParams message fragment)
    ({"type": "integer"}, "3", 3),
    ({"type": "integer"}, " 42 ", 42),
    ({"type": "integer"}, "3.0", 3),
    ({"type": "integer"}, 7, 7),
    ({"type": "integer"}, 7.0, 7),
    ({"type": "integer"}, "-5", -5),
    ({"type": "integer"}, "1e3", 1000),
    ({"type": "integer"}, "3.5", InvalidParams("'p' must be an integer")),
    ({"type": "integer"}, 3.5, InvalidParams("'p' must be an integer")),
    ({"type": "integer"}, "abc", InvalidParams("'p' must be an integer")),
    ({"type": "integer"}, "", None),  # empty is missing: not required, no default -> dropped
    ({"type": "integer"}, "nan", InvalidParams("'p' must be a finite number")),
    ({"type": "integer"}, "inf", InvalidParams("'p' must be a finite number")),
    ({"type": "integer"}, True, InvalidParams("'p' must be an integer")),  # bool is not an integer
    ({"type": "integer"}, False, InvalidParams("'p' must be an integer")),
    ({"type": "integer"}, "true", InvalidParams("'p' must be an integer")),
    ({"type": "integer"}, [1], InvalidParams("'p' must be an integer")),
    ({"type": "integer"}, {"a": 1}, InvalidParams("'p' must be an integer")),
    ({"type": "number"}, "2.5", 2.5),
    ({"type": "number"}, "3", 3.0),
    ({"type": "number"}, 3, 3),
    ({"type": "number"}, -0.25, -0.25),
    ({"type": "number"}, True, InvalidParams("'p' must be a number")),
    ({"type": "number"}, "two", InvalidParams("'p' must be a number")),
    ({"type": "number"}, "-inf", InvalidParams("'p' must be a finite number")),
    ({"type": "boolean"}, "true", True),
    ({"type": "boolean"}, "Yes", True),
    ({"type": "boolean"}, " on ", True),
    ({"type": "boolean"}, "1", True),
    ({"type": "boolean"}, 1, True),
    ({"type": "boolean"}, "FALSE", False),
    ({"type": "boolean"}, "no", False),
    ({"type": "boolean"}, "off", False),
    ({"type": "boolean"}, "0", False),
    ({"type": "boolean"}, 0, False),
    ({"type": "boolean"}, True, True),
    ({"type": "boolean"}, False, False),
    ({"type": "boolean"}, "maybe", InvalidParams("'p' must be true or false")),
    ({"type": "boolean"}, 2, InvalidParams("'p' must be true or false")),
    ({"type": "string"}, "Paris", "Paris"),
    ({"type": "string"}, 42, "42"),
    ({"type": "string"}, 3.0, "3"),  # an LLM's 3.0 is the "3" a template expects
    ({"type": "string"}, 2.5, "2.5"),
    ({"type": "string"}, ["a"], InvalidParams("'p' must be a string")),
    ({"type": "string"}, {"a": 1}, InvalidParams("'p' must be a string")),
    ({}, 42, "42"),  # no type: a string
    ({"type": "date"}, {"any": "thing"}, {"any": "thing"}),  # unknown type in the config: not checked
    ({"type": "string", "enum": ["c", "f"]}, "c", "c"),
    ({"type": "string", "enum": ["c", "f"]}, "k", InvalidParams("'p' must be one of c, f")),
    ({"type": "integer", "enum": [1, 2]}, "2", 2),  # enum checked after coercion
    ({"type": "integer", "enum": [1, 2]}, "3", InvalidParams("must be one of 1, 2")),
    ({"type": "string", "enum": "not-a-list"}, "x", "x"),
    ({"type": "integer", "minimum": 1}, "1", 1),
    ({"type": "integer", "minimum": 1}, "0", InvalidParams("'p' must be at least 1")),
    ({"type": "integer", "maximum": 10}, "10", 10),
    ({"type": "integer", "maximum": 10}, "11", InvalidParams("'p' must be at most 10")),
    ({"type": "number", "minimum": 0.5, "maximum": 1.5}, "0.4", InvalidParams("at least 0.5")),
    ({"type": "number", "minimum": 0.5, "maximum": 1.5}, "1.6", InvalidParams("at most 1.5")),
    ({"type": "number", "minimum": "1"}, "0", 0.0),  # a non-numeric bound in the config is ignored
    ({"type": "string", "minLength": 3}, "abc", "abc"),
    ({"type": "string", "minLength": 3}, "ab", InvalidParams("'p' must be at least 3 characters")),
    ({"type": "string", "maxLength": 3}, "abc", "abc"),
    ({"type": "string", "maxLength": 3}, "abcd", InvalidParams("'p' is longer than 3 characters")),
    ({"type": "string", "maxLength": 3}, "ééé", "ééé"),  # characters, not bytes
    ({"type": "string"}, "x" * MAX_STRING, "x" * MAX_STRING),
    ({"type": "string"}, "x" * (MAX_STRING + 1), InvalidParams(f"longer than {MAX_STRING} characters")),
    (
        {"type": "string", "maxLength": MAX_STRING * 2},
        "x" * (MAX_STRING + 1),
        InvalidParams(f"longer than {MAX_STRING}"),
    ),
    ({"type": "string", "pattern": "[A-Z]{3}"}, "ABC", "ABC"),
    ({"type": "string", "pattern": "[A-Z]{3}"}, "ABCD", InvalidParams("does not match the pattern [A-Z]{3}")),
    ({"type": "string", "pattern": "[A-Z]{3}"}, "abc", InvalidParams("'p' does not match the pattern")),
    ({"type": "string", "pattern": "(["}, "abc", InvalidParams("'p' has an invalid pattern in the tool's config")),
    ({"type": "string", "pattern": 5}, "abc", "abc"),  # a non-string pattern is ignored
    ({"type": "array"}, ["a", 1], ["a", 1]),
    ({"type": "array"}, "a,b", InvalidParams("'p' must be a list")),
    ({"type": "array", "items": {"type": "integer"}}, ["1", 2, "3.0"], [1, 2, 3]),
    ({"type": "array", "items": {"type": "integer"}}, ["1", "x"], InvalidParams("'p[1]' must be an integer")),
    ({"type": "array", "items": {"type": "string", "maxLength": 2}}, ["ab", "abc"], InvalidParams("'p[1]' is longer")),
    ({"type": "array", "items": {"type": "string", "enum": ["a"]}}, ["a", "a"], ["a", "a"]),
    ({"type": "array", "items": "integer"}, ["x"], ["x"]),  # items not an object: elements unchecked
    ({"type": "object"}, {"a": 1}, {"a": 1}),
    ({"type": "object"}, "x", InvalidParams("'p' must be an object")),
    ({"type": "object"}, ["x"], InvalidParams("'p' must be an object")),
    ({"type": "integer", "default": 5}, None, 5),
    ({"type": "integer", "default": 5}, "", 5),
    ({"type": "integer", "default": 5}, "7", 7),
    ({"type": "string", "default": "metric", "required": True}, None, "metric"),  # a default satisfies required
    ({"type": "string", "required": True}, None, InvalidParams("parameter 'p' is required")),
    ({"type": "string", "required": True}, "", InvalidParams("parameter 'p' is required")),
    (
        {"type": "string", "required": True, "description": "the city name"},
        None,
        InvalidParams("parameter 'p' is required (the city name)"),
    ),
]


@pytest.mark.parametrize(("spec", "value", "expected"), VALIDATE_ROWS, ids=[str(i) for i in range(len(VALIDATE_ROWS))])
def test_validate(spec: dict[str, Any], value: Any, expected: Any) -> None:
    tool = tool_with({"p": spec})
    given = {} if value is None else {"p": value}
    if isinstance(expected, InvalidParams):
        with pytest.raises(InvalidParams) as info:
            params.validate(tool, given)
        assert str(expected) in str(info.value)
        assert "'p" in str(info.value)  # names the parameter
        return
    out = params.validate(tool, given)
    if expected is None:
        assert "p" not in out
    else:
        assert out["p"] == expected
        assert type(out["p"]) is type(expected)


def test_validate_required_missing_names_the_parameter_in_object_shape() -> None:
    tool = tool_with({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    with pytest.raises(InvalidParams, match=r"parameter 'city' is required"):
        params.validate(tool, {"days": "3"})


def test_validate_passes_unknown_params_through_and_keeps_input_intact() -> None:
    tool = tool_with({"days": "integer"})
    given = {"days": "3", "param1": "Paris", "url": "https://x.example/", "extra": [1]}
    out = params.validate(tool, given)
    assert out == {"days": 3, "param1": "Paris", "url": "https://x.example/", "extra": [1]}
    assert given["days"] == "3"  # not mutated


def test_validate_without_declaration_is_identity_copy() -> None:
    tool = {"config": {"url": "https://x/{{city}}"}}
    given = {"city": ["not", "a", "string"], "n": True}
    out = params.validate(tool, given)
    assert out == given and out is not given


def test_validate_string_parameter_named_by_object_shape_default() -> None:
    tool = tool_with({"type": "object", "properties": {"unit": {"type": "string", "default": "metric"}}})
    assert params.validate(tool, {}) == {"unit": "metric"}


@pytest.mark.parametrize("value", ["12345678901234567890", "9007199254740993", 2**63 + 1])
def test_validate_large_integer_is_exact(value: Any) -> None:
    out = params.validate(tool_with({"id": "integer"}), {"id": value})
    assert out["id"] == int(value)


def test_validate_max_length_zero() -> None:
    with pytest.raises(InvalidParams):
        params.validate(tool_with({"p": {"type": "string", "maxLength": 0}}), {"p": "x"})


@pytest.mark.parametrize("max_length", ["ten", [3]])
def test_validate_bad_max_length_in_config_is_not_a_crash(max_length: Any) -> None:
    # An invalid `pattern` becomes InvalidParams; an invalid `maxLength` should be ignored or refused the same way,
    # not escape as a plain ValueError/TypeError (dispatch would report "internal error").
    with contextlib.suppress(InvalidParams):
        params.validate(tool_with({"p": {"type": "string", "maxLength": max_length}}), {"p": "abc"})


# ---- template_names / names ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"url": "https://api.example/{{city}}/{{ days }}?u={{unit}}&c={{city}}"}, ["city", "days", "unit"]),
        ({"headers": {"X-Key": "{{key}}", "nested": {"deep": ["{{a}}", {"b": "{{b}}"}]}}}, ["key", "a", "b"]),
        ({"body": [{"q": "{{q}}"}, "{{r}}", 3, None, True]}, ["q", "r"]),
        ({"query": "select * from t where id = {{id}}", "command": "echo {{msg}}"}, ["id", "msg"]),
        ({"path": "/data/{{file}}", "content": "{{text}}", "cwd": "/w/{{dir}}"}, ["file", "text", "dir"]),
        ({"url": "{{a}}", "body": "{{b}}", "headers": {"h": "{{c}}"}}, ["a", "c", "b"]),  # url, headers, body order
        ({"other": "{{ignored}}", "url": "x"}, []),  # only template keys are read
        ({"url": "{{1bad}} {{ok_1}} {{bad-name}} {city} {{}}"}, ["ok_1"]),
        ({"headers": {"{{keyname}}": "v"}}, []),  # keys are not templates
        ({}, []),
    ],
)
def test_template_names(config: dict[str, Any], expected: list[str]) -> None:
    assert params.template_names({"config": config}) == expected


def test_template_names_without_config() -> None:
    assert params.template_names({}) == []
    assert params.template_names({"config": "x"}) == []


@pytest.mark.parametrize(
    ("tool", "expected"),
    [
        (tool_with({"b": "string", "a": "integer"}), ["b", "a"]),  # declaration order
        ({"config": {"url": "https://x/{{city}}?d={{days}}"}}, ["city", "days"]),
        (
            {"config": {"url": "https://x/{{city}}", "parameters": {"days": "integer"}}},
            ["days"],
        ),  # a declaration wins over placeholders
        (tool_with({"type": "object", "properties": {"z": {}, "y": {}}}), ["z", "y"]),
        ({"config": {}}, []),
    ],
)
def test_names(tool: dict[str, Any], expected: list[str]) -> None:
    assert params.names(tool) == expected


# ---- function_name -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("weather", "weather"),
        ("weather_api", "weather_api"),
        ("Weather API", "Weather_API"),
        ("a.b-c", "a.b-c"),
        ("a  b!!c", "a_b_c"),
        ("__init__", "init"),
        ("météo", "m_t_o"),
        ("Ünïcode", "n_code"),
        ("天气", "tool"),
        ("🔧 tool", "tool"),
        ("1abc", "t_1abc"),
        ("123", "t_123"),
        (".hidden", "t_.hidden"),
        ("-dash", "t_-dash"),
        ("", "tool"),
        (None, "tool"),
        ("___", "tool"),
        ("x" * 100, "x" * 64),
        ("9" * 100, "t_" + "9" * 62),
        ("é" * 100, "tool"),
        ("a" + "é" * 100 + "b", "a_b"),
        ("tab\tnew\nline", "tab_new_line"),
        ("dollar$sign", "dollar_sign"),
        (42, "t_42"),
    ],
)
def test_function_name(name: Any, expected: str) -> None:
    got = params.function_name({"name": name})
    assert got == expected
    assert GEMINI_NAME.match(got), got


def test_function_name_always_valid_for_many_odd_names() -> None:
    odd = ["", " ", "_", ".", "-", "0", "é", "a" * 65, "_" * 70 + "z", "." * 70, "-" * 3 + "x", "x" + "." * 100]
    odd += [chr(c) * n for c in (0x41, 0x5F, 0x2E, 0x30, 0xE9, 0x1F600, 0x3000) for n in (1, 63, 64, 65, 200)]
    for name in odd:
        got = params.function_name({"name": name})
        assert GEMINI_NAME.match(got), (name, got)


# ---- json_schema / declaration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operations", "expected"),
    [
        (None, list(PLATFORM_OPERATIONS)),
        ([], []),  # an empty list allows nothing (fail closed)
        (["list_models"], ["list_models"]),
        (["search_platform", "list_models", "bogus"], ["list_models", "search_platform"]),  # platform's order
        ("list_models", []),  # not a list: nothing (fail closed)
    ],
)
def test_json_schema_mcp_tool_operation_enum(operations: Any, expected: list[str]) -> None:
    config = {} if operations is None else {"operations": operations}
    schema = params.json_schema({"type": "mcp_tool", "name": "platform", "config": config})
    assert schema["type"] == "object"
    assert schema["required"] == ["operation"]
    assert schema["properties"]["operation"]["type"] == "string"
    assert schema["properties"]["operation"]["enum"] == expected
    assert schema["properties"]["query"]["type"] == "string"


def test_json_schema_declared() -> None:
    tool = tool_with(
        {
            "city": {"type": "string", "required": True, "description": "city", "pattern": "[A-Za-z ]+", "x-own": 1},
            "days": {"type": "integer", "minimum": 1, "maximum": 14, "default": 3},
            "unit": {"enum": ["c", "f"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxLength": 3, "minLength": 1},
            "short": "boolean",
        }
    )
    assert params.json_schema(tool) == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "city", "pattern": "[A-Za-z ]+"},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "unit": {"type": "string", "enum": ["c", "f"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxLength": 3, "minLength": 1},
            "short": {"type": "boolean"},
        },
        "required": ["city"],
    }


def test_json_schema_object_shape_required_list() -> None:
    tool = tool_with({"type": "object", "properties": {"a": "string", "b": "integer"}, "required": ["b"]})
    schema = params.json_schema(tool)
    assert schema["required"] == ["b"]
    assert schema["properties"] == {"a": {"type": "string"}, "b": {"type": "integer"}}


@pytest.mark.parametrize(
    ("config", "props"),
    [
        ({"url": "https://x/{{city}}?d={{days}}"}, {"city": {"type": "string"}, "days": {"type": "string"}}),
        ({"command": "wc -w {{file}}", "cwd": "/{{dir}}"}, {"file": {"type": "string"}, "dir": {"type": "string"}}),
        ({}, {}),
    ],
)
def test_json_schema_undeclared_uses_placeholders(config: dict[str, Any], props: dict[str, Any]) -> None:
    schema = params.json_schema({"type": "http_request", "config": config})
    assert schema == {"type": "object", "properties": props, "required": []}


@pytest.mark.parametrize(
    ("tool", "name", "description"),
    [
        ({"name": "weather api", "description": "Weather", "displayName": "W"}, "weather_api", "Weather"),
        ({"name": "w", "displayName": "Weather API"}, "w", "Weather API"),
        ({"name": "w"}, "w", "w"),
        ({}, "tool", ""),
        ({"name": "w", "description": "d" * 5000}, "w", "d" * 1000),
    ],
)
def test_declaration(tool: dict[str, Any], name: str, description: str) -> None:
    tool = {"type": "http_request", "config": {"url": "https://x/{{q}}"}, **tool}
    decl = params.declaration(tool)
    assert decl == {"name": name, "description": description, "parameters": params.json_schema(tool)}
    assert decl["parameters"]["properties"] == {"q": {"type": "string"}}


# ---- detect.tool_params ----------------------------------------------------------------------------------------

WEATHER = {
    "id": "w",
    "name": "weather",
    "type": "http_request",
    "config": {"parameters": {"city": "string", "days": "integer"}},
}
TEMPLATED = {"id": "t", "name": "t", "type": "http_request", "config": {"url": "https://x/{{city}}?d={{days}}"}}


@pytest.mark.parametrize(
    ("text", "tool", "expected"),
    [
        ("weather city=Paris", WEATHER, {"city": "Paris"}),
        ("weather city = Paris", WEATHER, {"city": "Paris"}),
        ("weather city: Paris", WEATHER, {"city": "Paris"}),
        ("weather city:Paris", WEATHER, {"city": "Paris"}),
        ("weather CITY=Paris", WEATHER, {"city": "Paris"}),
        ('weather city="New York"', WEATHER, {"city": "New York", "param1": "New York"}),
        ("weather city='New York'", WEATHER, {"city": "New York", "param1": "New York"}),
        ("weather city=Paris, days=3", WEATHER, {"city": "Paris", "days": "3"}),
        ("weather days: 3; city: Rome.", WEATHER, {"city": "Rome.", "days": "3"}),
        ("weather velocity=5", WEATHER, {}),  # not part of a longer word
        ("weather city_name=Paris", WEATHER, {}),
        ("weather my-city=Paris", WEATHER, {}),
        ("weather citydays=3", WEATHER, {}),
        ("weather for the city Paris", WEATHER, {}),  # no = or :
        ('weather "Paris" "3"', WEATHER, {"param1": "Paris", "param2": "3", "city": "Paris", "days": "3"}),
        ("weather 'Paris'", WEATHER, {"param1": "Paris", "city": "Paris"}),
        ("weather “Paris”", WEATHER, {"param1": "Paris", "city": "Paris"}),
        ('weather days=5 "Paris"', WEATHER, {"param1": "Paris", "days": "5", "city": "Paris"}),
        (
            'weather "Paris" "3" "extra"',
            WEATHER,
            {"param1": "Paris", "param2": "3", "param3": "extra", "city": "Paris", "days": "3"},
        ),
        ('"Rome" "7"', TEMPLATED, {"param1": "Rome", "param2": "7", "city": "Rome", "days": "7"}),
        ("days=2 'Oslo'", TEMPLATED, {"param1": "Oslo", "days": "2", "city": "Oslo"}),
        ("fetch https://x.example/a?b=1.", WEATHER, {"url": "https://x.example/a?b=1"}),
        ("read /etc/hosts now", WEATHER, {"path": "/etc/hosts"}),
        ("nothing here", WEATHER, {}),
        ('"a"', {"id": "n", "name": "n", "type": "custom_script", "config": {}}, {"param1": "a"}),
    ],
)
def test_tool_params(text: str, tool: dict[str, Any], expected: dict[str, Any]) -> None:
    assert tool_params(text, tool) == expected


def test_tool_params_named_quoted_value_is_not_reused_positionally() -> None:
    # city="Paris" takes param1; the next quoted string "3" should go to days, not "Paris" again.
    assert tool_params('weather city="Paris" "3"', WEATHER)["days"] == "3"


def test_tool_params_declared_parameter_already_extracted_is_kept() -> None:
    tool = {
        "id": "s",
        "name": "s",
        "type": "http_request",
        "config": {"parameters": {"query": "string", "n": "string"}},
    }
    # extract_params' search query (a quoted one wins) is kept for the declared "query"; the same quoted string
    # then also fills "n" positionally (current behaviour: the search query does not use the quoted string up).
    assert tool_params('search for cats "5"', tool) == {"param1": "5", "query": "5", "n": "5"}
    assert tool_params("search for cats n=2", tool) == {"query": "cats n=2", "n": "2"}


# ---- detect ----------------------------------------------------------------------------------------------------


def _tool(tid: str, name: str, kind: str, display: str | None = None, **config: Any) -> dict[str, Any]:
    return {"id": tid, "name": name, "displayName": display, "type": kind, "config": config}


WEATHER_API = _tool("1", "weather_api", "http_request", "Weather API")
WORD_COUNT = _tool("2", "word_count", "custom_script", "Word Count Script")
ORDERS_DB = _tool("3", "orders_db", "database_query", "Orders DB")
CLEANUP = _tool("4", "cleanup", "custom_script", "Cleanup Script")
USERS_DB = _tool("5", "users_db", "database_query", "Users DB")
STATUS_API = _tool("6", "status_api", "http_request")
SHELL = _tool("7", "disk_usage", "shell_command", "Disk Usage")
FILES = _tool("8", "notes", "file_operation", "Notes")
WEATHER_TOOL = _tool("9", "weather_tool", "http_request")
PLATFORM = _tool("p", "platform", "mcp_tool")

BOT = [WEATHER_API, WORD_COUNT, ORDERS_DB]
TWO_SCRIPTS = [*BOT, CLEANUP]
TWO_DBS = [ORDERS_DB, USERS_DB]
TWO_APIS = [WEATHER_API, STATUS_API]

DETECT_ROWS = [
    # by name / displayName as words
    ("call the weather api", BOT, ["weather_api"]),
    ("Call the Weather API, please!", BOT, ["weather_api"]),
    ("use weather_api for Paris", BOT, ["weather_api"]),
    ("weather api", BOT, ["weather_api"]),  # the whole name needs no verb
    ("run the word count script", BOT, ["word_count"]),
    ("get the word count", BOT, ["word_count"]),
    ("use the Orders DB", BOT, ["orders_db"]),
    ("run the word count script", TWO_SCRIPTS, ["word_count"]),
    ("run the cleanup script", TWO_SCRIPTS, ["cleanup"]),
    # distinctive words + a type word (+ a verb)
    ("query the orders database", BOT, ["orders_db"]),
    ("check the order database", BOT, ["orders_db"]),  # stems
    ("query the users database", TWO_DBS, ["users_db"]),
    ("fetch from the weather endpoint", [WEATHER_TOOL, STATUS_API], ["weather_tool"]),  # "tool" is generic
    ("check the status api", TWO_APIS, ["status_api"]),
    # type only: exactly one tool of the type and a verb
    ("run the script", BOT, ["word_count"]),
    ("query the database", BOT, ["orders_db"]),
    ("call the api", BOT, ["weather_api"]),
    ("run the shell command", [SHELL], ["disk_usage"]),
    ("read the file /notes/today.txt", [FILES], ["notes"]),
    ("run the script and query the orders database", BOT, ["word_count", "orders_db"]),  # tools' order
    # negative cases
    ("weather_apis are great", BOT, []),
    ("what is an api?", BOT, []),
    ("run the script", TWO_SCRIPTS, []),  # two scripts: which one?
    ("the database is down", BOT, []),
    ("the orders database is down", BOT, []),  # distinctive + type word but no verb
    ("query the database", TWO_DBS, []),
    ("call the api", TWO_APIS, []),
    ("fetch the weather", BOT, []),  # a distinctive word without a type word
    ("rerun the script", BOT, []),  # "rerun" is not the verb "run"
    ("run the scripting engine", BOT, []),
    ("call weatherapi", BOT, []),
    ("hello there", BOT, []),
    ("", BOT, []),
    ("run the script", [], []),
    ("list my models", [*BOT, PLATFORM], ["platform"]),  # only the platform tool: no type word for the others
]


@pytest.mark.parametrize(
    ("text", "tools", "expected"), DETECT_ROWS, ids=[f"{i}-{r[0][:30]}" for i, r in enumerate(DETECT_ROWS)]
)
def test_detect(text: str, tools: list[dict[str, Any]], expected: list[str]) -> None:
    assert [c.name for c in detect(text, tools)] == expected


def test_detect_call_fields_and_params() -> None:
    tool = _tool("42", "weather_api", "http_request", "Weather API", url="https://x/{{city}}")
    [call] = detect('call the weather api for "Paris"', [tool])
    assert (call.tool_id, call.name, call.type, call.operation) == ("42", "weather_api", "http_request", None)
    assert call.params == {"param1": "Paris", "city": "Paris"}


def test_detect_each_tool_at_most_once() -> None:
    calls = detect("run the word count script, the word count script!", BOT)
    assert [c.name for c in calls] == ["word_count"]


def test_detect_platform_operation_limited_by_config() -> None:
    limited = _tool("p", "platform", "mcp_tool", operations=["list_bots"])
    assert detect("list my models", [limited]) == []
    [call] = detect("list my bots", [limited])
    assert (call.operation, call.type) == ("list_bots", "mcp_tool")
