"""What SQL an attacker gets a database tool to run beyond its one statement: parameter values are bound, never spliced
(quotes, comments, dollar quotes, backslashes, placeholders, look-alike quotes), typed parameters refuse SQL, and a
tool's query text is one statement of its declared kind however it hides a second one (semicolons after comments or
strings, COPY TO PROGRAM, DO blocks, blanks PostgreSQL reads as letters).
"""

from __future__ import annotations

from pathlib import Path

from attack_kit import INVALID, WEIRD, call_of, refused, rows_of
from toolkit import add_tool, ask

pytest_plugins = ["attack_kit"]


def test_cant_inject_sql_through_parameters(make_worker, r, db, bot, table) -> None:
    worker = make_worker()
    before = rows_of(db, table)
    add_tool(
        db, bot, "name_probe", "database_query", {"query": f"SELECT id, name FROM {table} WHERE name = {{{{who}}}}"}
    )
    add_tool(
        db, bot, "quoted_probe", "database_query", {"query": f"SELECT id, name FROM {table} WHERE name = '{{{{who}}}}'"}
    )
    add_tool(
        db,
        bot,
        "glued_probe",
        "database_query",
        {"query": f"SELECT id, name FROM {table} WHERE note = 'x{{{{who}}}}y'"},
    )
    values = (
        "' OR 1=1 --",
        f"'; DROP TABLE {table}; --",
        f"1; delete from {table}",
        f"x' ; delete from {table} ; select '",
        f"$$; delete from {table}; $$",
        f"\\'; delete from {table}; --",
        "\\",
        "\\\\' OR 1=1 --",
        "\u2019 OR \u20191\u2019=\u20191",
        "\u02bc OR 1=1 --",
        "') OR ('1'='1",
        "%(p1)s",
        "%s %% %(who)s",
        "{{other}}",
        f"\u00a0$x$; delete from {table}; --$x$",
        f"*/ delete from {table} /*",
    )
    for value in values:
        reply, errs = ask(r, worker, bot, f'run name probe, quoted probe and glued probe who="{value}"')
        assert errs == [], (value, errs)
        for name in ("name_probe", "quoted_probe", "glued_probe"):
            call = call_of(reply, name)
            assert call["params"]["who"] == value and call["ok"], (value, call)
            assert call["result"]["rows"] == [], (value, name, call["result"])
    # The stored injection string is found as itself: exactly one row, not all of them.
    reply, errs = ask(r, worker, bot, f'run name probe and quoted probe who="{WEIRD}"')
    assert errs == []
    for name in ("name_probe", "quoted_probe"):
        assert [row["name"] for row in call_of(reply, name)["result"]["rows"]] == [WEIRD]
    assert rows_of(db, table) == before


def test_cant_pass_sql_as_a_typed_parameter(make_worker, r, db, bot, table) -> None:
    worker = make_worker()
    config = {
        "query": f"SELECT id, name FROM {table} WHERE id = {{{{id}}}}",
        "parameters": {"id": {"type": "integer", "required": True}},
    }
    add_tool(db, bot, "by_id", "database_query", config)
    for value in ("1 OR 1=1", "1; delete from " + table, "1e400", "0x1", "1)--"):
        reply, errs = ask(r, worker, bot, f'run by id id="{value}"')
        call = refused(reply, errs, "by_id", INVALID)
        assert "'id'" in call["error"]
    reply, errs = ask(r, worker, bot, "run by id id=2")
    assert errs == [] and call_of(reply, "by_id")["result"]["rows"] == [{"id": 2, "name": "bob"}]


def test_cant_smuggle_statements_into_a_tool_query(make_worker, r, db, bot, table, tmp_path: Path) -> None:
    worker = make_worker()
    before = rows_of(db, table)
    marker = tmp_path / "copied"
    bad = {
        "stacked": f"select 1; delete from {table}",
        "stacked_no_space": f"select 1;delete from {table};",
        "commit_trick": f"select 1; commit; delete from {table}",
        "rollback_trick": f"select 1; rollback; delete from {table}",
        "line_comment": f"select 1 -- harmless\n; delete from {table}",
        "block_comment": f"select 1 /* harmless */; delete from {table}",
        "after_dollar": f"select $$a;b$$; delete from {table}",
        "after_string": f"select 'a;b'; delete from {table}",
        "backslash": f"select 'a\\'; delete from {table}; --'",
        "insert_in_select": f"insert into {table} (name) values ('mallory')",
        "delete_in_select": f"delete from {table}",
        "copy_program": f"copy (select 1) to program 'touch {marker}'",
        "do_block": f"do $$ begin delete from {table}; end $$",
        "explain_analyze": f"explain analyze delete from {table}",
        "placeholder_in_comment": f"select 1 /* {{{{x}}}} */ from {table}",
        "unterminated": f"select 'a from {table}",
    }
    for name, sql in bad.items():
        add_tool(db, bot, f"bad_{name}", "database_query", {"query": sql, "type": "select"})
    add_tool(
        db, bot, "copy_kind", "database_query", {"query": f"copy {table} to program 'touch {marker}'", "type": "copy"}
    )
    for name in [*bad, "copy_kind"]:
        tool = name if name == "copy_kind" else f"bad_{name}"
        reply, errs = ask(r, worker, bot, f"run {tool.replace('_', ' ')} x=1")
        refused(reply, errs, tool, INVALID)
    assert rows_of(db, table) == before and not marker.exists()


LEXER_GAP = "\u00a0"  # Python's \s (sql.py _SPACE) calls NO-BREAK SPACE blank; PostgreSQL reads it as a letter


def test_cant_hide_statements_behind_unicode_blanks(make_worker, r, db, bot, table) -> None:
    worker = make_worker()
    before = rows_of(db, table)
    sql = f"select 1 as {LEXER_GAP}$x$; commit; delete from {table}; --$x$"
    add_tool(db, bot, "blank_trick", "database_query", {"query": sql, "type": "select"})
    reply, errs = ask(r, worker, bot, "run blank trick")
    assert rows_of(db, table) == before, "the select tool deleted every row"
    refused(reply, errs, "blank_trick", INVALID)
