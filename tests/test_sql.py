"""SQL templates of database_query tools: table-driven cases for ``prepare``, then the real PostgreSQL proving
that injection attempts in values come back as plain data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extras
import pytest

from botworker.tools.sql import Prepared, SqlRefused, placeholders, prepare

from conftest import query


@pytest.mark.parametrize(
    ("template", "values", "sql", "params", "kind"),
    [
        ("select 1", {}, "select 1", {}, "select"),
        ("SELECT {{v}}::text AS v", {"v": "x"}, "SELECT %(p1)s::text AS v", {"p1": "x"}, "select"),
        (
            "select {{ v }}, {{v}}, {{w}}",
            {"v": 1, "w": 2},
            "select %(p1)s, %(p1)s, %(p2)s",
            {"p1": 1, "p2": 2},
            "select",
        ),
        (
            "select * from t where name = '{{n}}'",
            {"n": "a"},
            "select * from t where name = %(p1)s",
            {"p1": "a"},
            "select",
        ),
        (
            "select * from t where name like '%{{q}}%'",
            {"q": "a"},
            "select * from t where name like ('%%' || %(p1)s || '%%')",
            {"p1": "a"},
            "select",
        ),
        (
            "select 'a{{x}}b{{y}}'",
            {"x": 1, "y": 2},
            "select ('a' || %(p1)s || 'b' || %(p2)s)",
            {"p1": 1, "p2": 2},
            "select",
        ),
        ("select '{{x}}{{y}}'", {"x": 1, "y": 2}, "select (%(p1)s || %(p2)s)", {"p1": 1, "p2": 2}, "select"),
        ("select 'it''s {{x}}!'", {"x": 1}, "select ('it''s ' || %(p1)s || '!')", {"p1": 1}, "select"),
        ("select '{{not a placeholder}}'", {}, "select '{{not a placeholder}}'", {}, "select"),
        ("select {{a}}", {"a": 1, "unused": 2}, "select %(p1)s", {"p1": 1}, "select"),
        # every literal % is doubled: code, strings, comments, dollar quotes
        ("select 5 % 3, '100%' /* 50% */, $$%$$", {}, "select 5 %% 3, '100%%' /* 50%% */, $$%%$$", {}, "select"),
        # a trailing ; and whatever whitespace or comments follow it are dropped, as are leading ones
        ("select 1;", {}, "select 1", {}, "select"),
        ("  -- hello\n select 1 ;  -- bye\n /* end */  ", {}, "select 1", {}, "select"),
        ("select 1 -- ; drop table x", {}, "select 1", {}, "select"),
        ("select 1 /* ; */ + 1", {}, "select 1 /* ; */ + 1", {}, "select"),
        (
            "select /* a /* nested ; */ still comment ; */ 1",
            {},
            "select /* a /* nested ; */ still comment ; */ 1",
            {},
            "select",
        ),
        # ; inside strings, identifiers and dollar quotes is content
        ("select ';' as \"a;b\"", {}, "select ';' as \"a;b\"", {}, "select"),
        ("select 'x''; drop table t; --'", {}, "select 'x''; drop table t; --'", {}, "select"),
        ("select E'\\'; drop table t; --'", {}, "select E'\\'; drop table t; --'", {}, "select"),
        ("select e'a''b;'", {}, "select e'a''b;'", {}, "select"),
        ("select $$ ; {{ not bound }} $$", {}, "select $$ ; {{ not bound }} $$", {}, "select"),
        ("select $fn$ $$ ; $fn$", {}, "select $fn$ $$ ; $fn$", {}, "select"),
        ("select U&'d\\0061t;a' UESCAPE '\\'", {}, "select U&'d\\0061t;a' UESCAPE '\\'", {}, "select"),
        ('select "weird""; name" from t', {}, 'select "weird""; name" from t', {}, "select"),
        # '\' is a whole string (standard_conforming_strings), so the ; after it is code
        ("select '\\' as a, {{x}}", {"x": 1}, "select '\\' as a, %(p1)s", {"p1": 1}, "select"),
        # $1 is not a dollar quote; a$b$ is an identifier; xe'...' is an identifier and a plain literal
        ("select $1, a$b$ from t", {}, "select $1, a$b$ from t", {}, "select"),
        ("select xe'{{v}}'", {"v": 1}, "select xe%(p1)s", {"p1": 1}, "select"),
        # a value glued to another value or literal is kept apart: rendered as '...', they would merge into one literal
        ("select {{a}}{{b}}", {"a": 1, "b": 2}, "select %(p1)s %(p2)s", {"p1": 1, "p2": 2}, "select"),
        ("select 'x'{{a}}'{{b}}'", {"a": 1, "b": 2}, "select 'x' %(p1)s %(p2)s", {"p1": 1, "p2": 2}, "select"),
        ("select E'x'{{a}}", {"a": 1}, "select E'x' %(p1)s", {"p1": 1}, "select"),
        # kinds
        ("((select 1)) union select 2", {}, "((select 1)) union select 2", {}, "select"),
        (
            "/* c */ ( /* d */ WITH x AS (select 1) select * from x)",
            {},
            "( /* d */ WITH x AS (select 1) select * from x)",
            {},
            "with",
        ),
        ("insert into t values ({{a}})", {"a": 1}, "insert into t values (%(p1)s)", {"p1": 1}, "insert"),
        ("Update t set a = {{a}}", {"a": 1}, "Update t set a = %(p1)s", {"p1": 1}, "update"),
        ("delete from t", {}, "delete from t", {}, "delete"),
        ("values (1), (2)", {}, "values (1), (2)", {}, "values"),
        ("table t", {}, "table t", {}, "table"),
        ("drop table t", {}, "drop table t", {}, "drop"),
    ],
)
def test_prepare(template: str, values: dict[str, Any], sql: str, params: dict[str, Any], kind: str) -> None:
    prepared = prepare(template, values)
    assert (prepared.sql, prepared.params, prepared.kind) == (sql, params, kind)


@pytest.mark.parametrize(
    ("template", "values", "reason"),
    [
        ("select 1; drop table x", {}, "only one SQL statement is allowed"),
        ("select 1;;", {}, "only one SQL statement is allowed"),
        ("select 1 -- c\n; select 2", {}, "only one SQL statement is allowed"),
        ("select 1 /* c */; /* d */ select 2", {}, "only one SQL statement is allowed"),
        ("select ''; drop table x", {}, "only one SQL statement is allowed"),
        ("select '\\'; drop table x; --'", {}, "only one SQL statement is allowed"),
        ("select E'\\\\'; drop table x", {}, "only one SQL statement is allowed"),
        ("select $$ $$; drop table x", {}, "only one SQL statement is allowed"),
        ("select $a$ $b$ $a$; drop table x", {}, "only one SQL statement is allowed"),
        ("select /* /* */ */; drop table x", {}, "only one SQL statement is allowed"),
        ("select 1; {{x}}", {"x": 1}, "only one SQL statement is allowed"),
        ("", {}, "the query is empty"),
        ("  \n\t", {}, "the query is empty"),
        ("-- nothing\n/* at all */", {}, "the query is empty"),
        (";", {}, "the query is empty"),
        ("( (", {}, "must start with an SQL keyword"),
        ("{{x}} from t", {"x": "select *"}, "must start with an SQL keyword"),
        ("'select' 1", {}, "must start with an SQL keyword"),
        ('"select" 1', {}, "must start with an SQL keyword"),
        ("$$select$$", {}, "must start with an SQL keyword"),
        ("select 'abc", {}, "unterminated string"),
        ("select 'it''s", {}, "unterminated string"),
        ("select E'abc\\'", {}, "unterminated E'...' string"),
        ("select U&'abc", {}, "unterminated U&'...' string"),
        ('select "abc', {}, "unterminated quoted identifier"),
        ("select $$abc", {}, "unterminated dollar-quoted string"),
        ("select $tag$abc$tag", {}, "unterminated dollar-quoted string"),
        ("select /* abc", {}, "unterminated /* comment"),
        ("select /* /* */ abc", {}, "unterminated /* comment"),
        ("select {{x}}", {}, "parameter 'x' is missing"),
        ("select '%{{x}}'", {"y": 1}, "parameter 'x' is missing"),
        ("select 1 -- {{x}}", {"x": 1}, "placeholder {{x}} inside a comment is not allowed"),
        ("select 1 /* {{ x }} */", {"x": 1}, "placeholder {{x}} inside a comment is not allowed"),
        ("select 1; -- {{x}}", {"x": 1}, "placeholder {{x}} inside a comment is not allowed"),
        ("select E'{{x}}'", {"x": 1}, "placeholder {{x}} inside an E'...' string is not allowed"),
        ("select U&'{{x}}'", {"x": 1}, "placeholder {{x}} inside a U&'...' string is not allowed"),
        ("select B'{{x}}'", {"x": 1}, "placeholder {{x}} inside a B'...', X'...' or N'...' string is not allowed"),
        ("select $$;{{x}}$$", {"x": 1}, "placeholder {{x}} inside a dollar-quoted string is not allowed"),
        ("select $q${{x}}$q$", {"x": 1}, "placeholder {{x}} inside a dollar-quoted string is not allowed"),
        ('select "{{x}}" from t', {"x": 1}, "placeholder {{x}} inside a quoted identifier is not allowed"),
        ('select U&"{{x}}" from t', {"x": 1}, "placeholder {{x}} inside a quoted identifier is not allowed"),
        ("select {{1x}}", {}, "malformed placeholder '{{1x}}'"),
        ("select {{ a-b }}", {}, "malformed placeholder"),
        ("select 1\0", {}, "NUL character"),
    ],
)
def test_refused(template: str, values: dict[str, Any], reason: str) -> None:
    with pytest.raises(SqlRefused) as refused:
        prepare(template, values)
    assert reason in str(refused.value)
    assert isinstance(refused.value, ValueError)


def test_placeholders_and_names() -> None:
    template = "select {{b}}, '{{a}}' -- {{c}}\n, {{ b }}"
    assert placeholders(template) == ("b", "a", "c")
    assert placeholders("select 1") == ()
    assert prepare("select {{b}}, '%{{a}}', {{ b }}", {"a": 1, "b": 2}).names == ("b", "a")


def test_values_are_never_in_the_sql() -> None:
    prepared = prepare("select {{v}}, 'x{{v}}'", {"v": "'); drop table users; -- {{v}} 100%"})
    assert prepared == Prepared(
        "select %(p1)s, ('x' || %(p1)s)", {"p1": "'); drop table users; -- {{v}} 100%"}, "select", ("v",)
    )


# --- the real PostgreSQL: a value is only ever a value --------------------------------------------------------------

NASTY = [
    "x'); drop table users; --",
    "' or '1'='1",
    "it''s",
    "back\\slash\\'; select 1; --",
    "E'\\''",
    "100% %s %(p1)s %%",
    "$$; drop table users; $$",
    "$tag$ ; $tag$",
    "{{other}} {{ v }}",
    "/* unclosed comment",
    "-- line comment",
    'double "quote"',
    "ünïcødé ✓ 日本語 🙂",
    "",
    "line\nbreak\ttab",
]


def run(conn: psycopg2.extensions.connection, template: str, **values: Any) -> list[dict[str, Any]]:
    prepared = prepare(template, values)
    return query_dict(conn, prepared)


def query_dict(conn: psycopg2.extensions.connection, prepared: Prepared) -> list[dict[str, Any]]:
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(prepared.sql, prepared.params)
        return [dict(row) for row in cur.fetchall()] if cur.description else []


@pytest.fixture
def people(db: psycopg2.extensions.connection) -> Iterator[psycopg2.extensions.connection]:
    """A connection with a TEMP table ``people(name)`` holding every nasty value plus a few plain names."""
    query(db, "CREATE TEMP TABLE people (name text NOT NULL)")
    for name in [*NASTY, "alice", "bob", "carol"]:
        query(db, "INSERT INTO people (name) VALUES (%s)", name)
    yield db
    query(db, "DROP TABLE IF EXISTS people")


@pytest.mark.parametrize("value", NASTY)
def test_value_comes_back_verbatim(db: psycopg2.extensions.connection, value: str) -> None:
    assert run(db, "select {{v}}::text as v", v=value) == [{"v": value}]
    assert run(db, "select '{{v}}'::text as v, '<{{v}}>' as w", v=value) == [{"v": value, "w": f"<{value}>"}]


@pytest.mark.parametrize("value", NASTY)
def test_equality_in_a_literal_finds_exactly_that_row(people: psycopg2.extensions.connection, value: str) -> None:
    assert run(people, "select name from people where name = '{{n}}'", n=value) == [{"name": value}]


def test_like_pattern(people: psycopg2.extensions.connection) -> None:
    like = "select name from people where name like '%{{q}}%'"

    def names(rows: list[dict[str, Any]]) -> list[str]:
        return sorted(row["name"] for row in rows)

    assert names(run(people, like, q="o")) == sorted(n for n in [*NASTY, "alice", "bob", "carol"] if "o" in n)
    assert names(run(people, like, q="bo")) == ["bob"]
    assert names(run(people, like, q="日本")) == ["ünïcødé ✓ 日本語 🙂"]
    assert names(run(people, like, q="' or '1'='1")) == ["' or '1'='1"]
    assert names(run(people, like, q="'); drop table people; --")) == []
    assert names(run(people, like, q="{{q}}")) == []
    assert len(query(people, "select name from people")) == len(NASTY) + 3  # nothing was dropped or deleted


def test_injection_in_a_delete_touches_nothing_else(people: psycopg2.extensions.connection) -> None:
    before = len(query(people, "select name from people"))
    for value in ["x' or '1'='1", "x' or true; --", "x'); delete from people; --", "' or name <> '"]:
        prepared = prepare("delete from people where name = '{{n}}'", {"n": value})
        assert prepared.kind == "delete"
        query_dict(people, prepared)
    assert len(query(people, "select name from people")) == before
    query_dict(people, prepare("delete from people where name = {{n}}", {"n": "bob"}))
    assert len(query(people, "select name from people")) == before - 1


def test_percent_and_quoting_in_the_template_survive(db: psycopg2.extensions.connection) -> None:
    rows = run(db, "select '100%' as a, 5 % 3 as b, $$x;y%$$ as c, E'it\\'s' as d, 'it''s' as e /* 5% */")
    assert rows == [{"a": "100%", "b": 2, "c": "x;y%", "d": "it's", "e": "it's"}]
    rows = run(db, "select '%{{v}}%' as a, {{v}}::text || '%' as b", v="50%")
    assert rows == [{"a": "%50%%", "b": "50%%"}]


def test_numbers_and_null(db: psycopg2.extensions.connection) -> None:
    # psycopg2 renders a negative number with a leading space, so 1-{{x}} cannot become the comment 1--5
    assert run(db, "select 1-{{x}} as a, 2 - {{x}} as b", x=-5) == [{"a": 6, "b": 7}]
    assert run(db, "select 1-{{x}} as a", x=-1.5) == [{"a": 2.5}]
    assert run(db, "select {{x}}::int is null as a, 'n{{x}}' is null as b", x=None) == [{"a": True, "b": True}]


def test_glued_values_do_not_merge_into_one_literal(db: psycopg2.extensions.connection) -> None:
    # without the separating space psycopg2 would send 'p''q': the single value p'q
    with pytest.raises(psycopg2.errors.SyntaxError):
        run(db, "select {{a}}{{b}} as x", a="p", b="q")


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("select 1) as a, (select 2", "closes nothing"),
        ("select (1", "never closed"),
        ("select ((1)", "never closed"),
        ("select 1)", "closes nothing"),
    ],
)
def test_parentheses_must_balance(query: str, reason: str) -> None:
    with pytest.raises(SqlRefused, match=reason):
        prepare(query, {})


def test_parentheses_in_strings_comments_and_identifiers_do_not_count() -> None:
    assert prepare("select ')' as \")(\" /* ( */ from (select 1) q", {}).kind == "select"
