"""SQL templates of database_query tools: table-driven cases for ``prepare`` (PostgreSQL's own lexer and parser,
through pglast), then the real PostgreSQL proving that injection attempts in values come back as plain data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from botworker.tools.sql import Prepared, SqlRefused, placeholders, prepare

from conftest import query


@pytest.mark.parametrize(
    ("template", "values", "sql", "params", "kind"),
    [
        ("select 1", {}, "select 1", (), "select"),
        ("SELECT {{v}}::text AS v", {"v": "x"}, "SELECT  $1 ::text AS v", ("x",), "select"),
        ("select {{ v }}, {{v}}, {{w}}", {"v": 1, "w": 2}, "select  $1 ,  $1 ,  $2", (1, 2), "select"),
        ("select * from t where name = '{{n}}'", {"n": "a"}, "select * from t where name =  $1", ("a",), "select"),
        (
            "select * from t where name like '%{{q}}%'",
            {"q": "a"},
            "select * from t where name like  ('%' || $1 || '%')",
            ("a",),
            "select",
        ),
        ("select 'a{{x}}b{{y}}'", {"x": 1, "y": 2}, "select  ('a' || $1 || 'b' || $2)", (1, 2), "select"),
        ("select '{{x}}{{y}}'", {"x": 1, "y": 2}, "select  ($1 || $2)", (1, 2), "select"),
        ("select 'it''s {{x}}!'", {"x": 1}, "select  ('it''s ' || $1 || '!')", (1,), "select"),
        ("select '{{not a placeholder}}'", {}, "select '{{not a placeholder}}'", (), "select"),
        ("select {{a}}", {"a": 1, "unused": 2}, "select  $1", (1,), "select"),
        # % is only an operator or a character: nothing is doubled (PostgreSQL's own placeholders)
        ("select 5 % 3, '100%' /* 50% */, $$%$$", {}, "select 5 % 3, '100%' /* 50% */, $$%$$", (), "select"),
        # a trailing ; and whatever whitespace or comments follow it are dropped, as are leading ones
        ("select 1;", {}, "select 1", (), "select"),
        ("select 1;;", {}, "select 1", (), "select"),
        ("  -- hello\n select 1 ;  -- bye\n /* end */  ", {}, "select 1", (), "select"),
        ("/* é */ select 'ü' ; ", {}, "select 'ü'", (), "select"),
        ("select 1 -- ; drop table x", {}, "select 1 -- ; drop table x", (), "select"),
        ("select 1 /* ; */ + 1", {}, "select 1 /* ; */ + 1", (), "select"),
        ("select /* a /* nested ; */ still ; */ 1", {}, "select /* a /* nested ; */ still ; */ 1", (), "select"),
        # ; inside strings, identifiers and dollar quotes is content
        ("select ';' as \"a;b\"", {}, "select ';' as \"a;b\"", (), "select"),
        ("select 'x''; drop table t; --'", {}, "select 'x''; drop table t; --'", (), "select"),
        ("select E'\\'; drop table t; --'", {}, "select E'\\'; drop table t; --'", (), "select"),
        ("select $$ ; {{ not bound }} $$", {}, "select $$ ; {{ not bound }} $$", (), "select"),
        ("select $fn$ $$ ; $fn$", {}, "select $fn$ $$ ; $fn$", (), "select"),
        ('select "weird""; name" from t', {}, 'select "weird""; name" from t', (), "select"),
        # '\' is a whole string (standard_conforming_strings), so what follows it is code
        ("select '\\' as a, {{x}}", {"x": 1}, "select '\\' as a,  $1", (1,), "select"),
        # values never glue to each other or to a literal
        ("select {{a}}||{{b}}", {"a": 1, "b": 2}, "select  $1 || $2", (1, 2), "select"),
        ("select 'x'||{{a}}", {"a": 1}, "select 'x'|| $1", (1,), "select"),
        # kinds come from the parse tree
        ("((select 1)) union select 2", {}, "((select 1)) union select 2", (), "select"),
        (
            "/* c */ ( WITH x AS (select 1) select * from x)",
            {},
            "( WITH x AS (select 1) select * from x)",
            (),
            "select",
        ),
        ("values (1), (2)", {}, "values (1), (2)", (), "select"),
        ("table t", {}, "table t", (), "select"),
        ("insert into t values ({{a}})", {"a": 1}, "insert into t values ( $1 )", (1,), "insert"),
        (
            "with v as (select 1) insert into t select * from v",
            {},
            "with v as (select 1) insert into t select * from v",
            (),
            "insert",
        ),
        ("Update t set a = {{a}}", {"a": 1}, "Update t set a =  $1", (1,), "update"),
        ("delete from t", {}, "delete from t", (), "delete"),
        ("drop table t", {}, "drop table t", (), "drop"),
        ("set role none", {}, "set role none", (), "variableset"),
    ],
)
def test_prepare(template: str, values: dict[str, Any], sql: str, params: tuple[Any, ...], kind: str) -> None:
    prepared = prepare(template, values)
    assert (prepared.sql, prepared.params, prepared.kind) == (sql, params, kind)


@pytest.mark.parametrize(
    ("template", "values", "reason"),
    [
        ("select 1; drop table x", {}, "only one SQL statement is allowed"),
        ("select 1 -- c\n; select 2", {}, "only one SQL statement is allowed"),
        ("select 1 /* c */; /* d */ select 2", {}, "only one SQL statement is allowed"),
        ("select ''; drop table x", {}, "only one SQL statement is allowed"),
        ("select '\\'; drop table x; --'", {}, "only one SQL statement is allowed"),
        ("select E'\\\\'; drop table x", {}, "only one SQL statement is allowed"),
        ("select $$ $$; drop table x", {}, "only one SQL statement is allowed"),
        ("select $a$ $b$ $a$; drop table x", {}, "only one SQL statement is allowed"),
        ("select /* /* */ */ 1; drop table x", {}, "only one SQL statement is allowed"),
        ("", {}, "the query is empty"),
        ("  \n\t", {}, "the query is empty"),
        ("-- nothing\n/* at all */", {}, "the query is empty"),
        (";", {}, "the query is empty"),
        ("( (", {}, "not valid SQL"),
        ("select 1; {{x}}", {"x": 1}, "not valid SQL"),
        ("{{x}} from t", {"x": "select *"}, "not valid SQL"),
        ("'select' 1", {}, "not valid SQL"),
        ("select 'abc", {}, "unterminated quoted string"),
        ("select 'it''s", {}, "unterminated quoted string"),
        ("select E'abc\\'", {}, "unterminated quoted string"),
        ('select "abc', {}, "unterminated quoted identifier"),
        ("select $$abc", {}, "unterminated dollar-quoted string"),
        ("select /* abc", {}, "unterminated /* comment"),
        ("select /* /* */ abc", {}, "unterminated /* comment"),
        ("select 1) as a, (select 2", {}, "not valid SQL"),
        ("select (1", {}, "not valid SQL"),
        ("select {{x}}", {}, "parameter 'x' is missing"),
        ("select '%{{x}}'", {"y": 1}, "parameter 'x' is missing"),
        ("select $1", {}, "'$1' is not allowed: values go in as {{name}} placeholders"),
        ("select {{x}}, $2", {"x": 1}, "'$2' is not allowed"),
        ("select 1 -- {{x}}", {"x": 1}, "placeholder {{x}} inside a comment is not allowed"),
        ("select 1 /* {{ x }} */", {"x": 1}, "placeholder {{x}} inside a comment is not allowed"),
        ("select 1; -- {{x}}", {"x": 1}, "placeholder {{x}} inside a comment is not allowed"),
        ("select E'{{x}}'", {"x": 1}, "placeholder {{x}} inside an E'...' string is not allowed"),
        ("select U&'{{x}}'", {"x": 1}, "placeholder {{x}} inside a U&'...' string is not allowed"),
        ("select B'{{x}}'", {"x": 1}, "placeholder {{x}} inside a B'...', X'...' or N'...' string is not allowed"),
        ("select N'{{x}}'", {"x": 1}, "placeholder {{x}} inside a B'...', X'...' or N'...' string is not allowed"),
        ("select $$;{{x}}$$", {"x": 1}, "placeholder {{x}} inside a dollar-quoted string is not allowed"),
        ("select $q${{x}}$q$", {"x": 1}, "placeholder {{x}} inside a dollar-quoted string is not allowed"),
        ('select "{{x}}" from t', {"x": 1}, "placeholder {{x}} inside a quoted identifier is not allowed"),
        ('select U&"{{x}}" from t', {"x": 1}, "placeholder {{x}} inside a quoted identifier is not allowed"),
        ("select interval '{{n}} days'", {"n": 1}, "not valid SQL"),
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
    assert prepared == Prepared("select  $1 ,  ('x' || $1)", ("'); drop table users; -- {{v}} 100%",), "select", ("v",))


def test_returning_is_read_from_the_tree() -> None:
    assert prepare("insert into t values (1) returning *", {}).returning
    assert prepare("update t set a = 1 returning a", {}).returning
    assert not prepare("delete from t where note = 'returning'", {}).returning


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


def run(conn: psycopg.Connection[Any], template: str, **values: Any) -> list[dict[str, Any]]:
    prepared = prepare(template, values)
    return query_dict(conn, prepared)


def query_dict(conn: psycopg.Connection[Any], prepared: Prepared) -> list[dict[str, Any]]:
    with psycopg.RawCursor(conn, row_factory=dict_row) as cur:
        cur.execute(prepared.sql, prepared.params)
        return [dict(row) for row in cur.fetchall()] if cur.description else []


@pytest.fixture
def people(db: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """A connection with a TEMP table ``people(name)`` holding every nasty value plus a few plain names."""
    query(db, "CREATE TEMP TABLE people (name text NOT NULL)")
    for name in [*NASTY, "alice", "bob", "carol"]:
        query(db, "INSERT INTO people (name) VALUES (%s)", name)
    yield db
    query(db, "DROP TABLE IF EXISTS people")


@pytest.mark.parametrize("value", NASTY)
def test_value_comes_back_verbatim(db: psycopg.Connection[Any], value: str) -> None:
    assert run(db, "select {{v}}::text as v", v=value) == [{"v": value}]
    assert run(db, "select '{{v}}'::text as v, '<{{v}}>' as w", v=value) == [{"v": value, "w": f"<{value}>"}]


@pytest.mark.parametrize("value", NASTY)
def test_equality_in_a_literal_finds_exactly_that_row(people: psycopg.Connection[Any], value: str) -> None:
    assert run(people, "select name from people where name = '{{n}}'", n=value) == [{"name": value}]


def test_like_pattern(people: psycopg.Connection[Any]) -> None:
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


def test_injection_in_a_delete_touches_nothing_else(people: psycopg.Connection[Any]) -> None:
    before = len(query(people, "select name from people"))
    for value in ["x' or '1'='1", "x' or true; --", "x'); delete from people; --", "' or name <> '"]:
        prepared = prepare("delete from people where name = '{{n}}'", {"n": value})
        assert prepared.kind == "delete"
        query_dict(people, prepared)
    assert len(query(people, "select name from people")) == before
    query_dict(people, prepare("delete from people where name = {{n}}", {"n": "bob"}))
    assert len(query(people, "select name from people")) == before - 1


def test_percent_and_quoting_in_the_template_survive(db: psycopg.Connection[Any]) -> None:
    rows = run(db, "select '100%' as a, 5 % 3 as b, $$x;y%$$ as c, E'it\\'s' as d, 'it''s' as e /* 5% */")
    assert rows == [{"a": "100%", "b": 2, "c": "x;y%", "d": "it's", "e": "it's"}]
    rows = run(db, "select '%{{v}}%' as a, {{v}}::text || '%' as b", v="50%")
    assert rows == [{"a": "%50%%", "b": "50%%"}]
    assert run(db, "select {{v}}::text as v", v="%s %(p1)s $1 %%") == [{"v": "%s %(p1)s $1 %%"}]


def test_numbers_and_null(db: psycopg.Connection[Any]) -> None:
    # a placeholder stands apart from its neighbours, so 1-{{x}} with -5 cannot become the comment 1--5
    assert run(db, "select 1-{{x}} as a, 2 - {{x}} as b", x=-5) == [{"a": 6, "b": 7}]
    assert run(db, "select 1-{{x}} as a", x=-1.5) == [{"a": 2.5}]
    assert run(db, "select {{x}}::int is null as a, 'n{{x}}' is null as b", x=None) == [{"a": True, "b": True}]


def test_glued_placeholders_are_two_values_not_one(db: psycopg.Connection[Any]) -> None:
    with pytest.raises(SqlRefused, match="not valid SQL"):
        prepare("select {{a}}{{b}} as x", {"a": "p", "b": "q"})
    assert run(db, "select '{{a}}{{b}}' as x", a="p'", b="'q") == [{"x": "p''q"}]


def test_parentheses_in_strings_comments_and_identifiers_do_not_count() -> None:
    assert prepare("select ')' as \")(\" /* ( */ from (select 1) q", {}).kind == "select"
