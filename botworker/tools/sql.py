"""SQL templates of ``database_query`` tools -> one statement with bound parameters, read by PostgreSQL's own
lexer and parser (pglast: libpg_query, the server's grammar). Pure; no I/O.

The contract: a template's ``{{name}}`` placeholders become bound parameters (``$1``, ``$2``...: one per name),
never spliced text, so a value can hold quotes, semicolons or ``{{...}}`` of its own and still be only a value. A
template is exactly one statement; which kinds of statement a tool may run (``Prepared.kind``, read from the parse
tree) is for the caller to check.

How:
1. each placeholder becomes `` $n `` (spaces around it, so it cannot glue to a neighbouring token), and the text is
   split into tokens by the server's lexer. A placeholder must land on a parameter token of its own. In a plain
   '...' literal, the literal becomes a concatenation of its pieces and the parameters ('%{{q}}%' becomes
   ('%' || $1 || '%')). Anywhere else (a comment, an E'', U&'', B'', X'', N'' or dollar-quoted string, a quoted
   identifier) it is refused: a parameter cannot go there, and its meaning is unclear. ``$1`` written in the
   template itself is refused: parameters are the placeholders' alone.
2. the result is parsed: exactly one statement, and every parameter reference in the tree is one of ours, each
   occurrence there: the proof that no placeholder sat unbound inside a literal or a comment.

The lexer reads backslashes in '...' as plain characters (``standard_conforming_strings`` on, the default since
PostgreSQL 9.1; the database tool sets it for its transaction). A literal with a placeholder becomes an
expression, so it cannot follow a type name: write '{{n}} days'::interval, not interval '{{n}} days'.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pglast import parser

from .params import PLACEHOLDER as _PLACEHOLDER

_MALFORMED = re.compile(r"\{\{[^{}]{0,40}\}\}")
# Where a placeholder may not go, by the lexer's token name (and, for SCONST, how the token starts).
_COMMENTS = ("C_COMMENT", "SQL_COMMENT")
_PREFIXED = "a B'...', X'...' or N'...' string"
_OPAQUE = {"USCONST": "a U&'...' string", "BCONST": _PREFIXED, "XCONST": _PREFIXED, "UIDENT": "a quoted identifier"}
# Parse-tree statement nodes -> the kind a tool's type allows.
_KINDS = {"SelectStmt": "select", "InsertStmt": "insert", "UpdateStmt": "update", "DeleteStmt": "delete"}


class SqlRefused(ValueError):
    """The template is not acceptable (several statements, a placeholder in a comment, not SQL...).

    ``str()`` is a clear, user-readable reason.
    """


@dataclass(frozen=True)
class Prepared:
    """One statement for a cursor with PostgreSQL's own placeholders (psycopg's ``RawCursor``)."""

    sql: str  # the statement alone: no leading or trailing comments, no ';'
    params: tuple[Any, ...]  # the value of $1, $2...
    kind: str  # "select" (SELECT, VALUES, TABLE, WITH ... SELECT), "insert", "update", "delete", or another name
    names: tuple[str, ...]  # the placeholder names in order of first appearance ($1 is names[0])
    returning: bool = False  # a RETURNING clause is present (a write that gives rows back)


@dataclass(frozen=True)
class _Spot:
    """Where one placeholder's `` $n `` sits in the rewritten text."""

    start: int
    end: int  # exclusive
    name: str
    number: int


def placeholders(query: str) -> tuple[str, ...]:
    """Names of the ``{{name}}`` placeholders in order of first appearance (wherever they are)."""
    return tuple(dict.fromkeys(m.group(1) for m in _PLACEHOLDER.finditer(query)))


def prepare(query: str, values: Mapping[str, Any]) -> Prepared:
    """The template as one statement with bound parameters, or ``SqlRefused`` saying why it cannot be."""
    if "\0" in query:
        raise SqlRefused("the query contains a NUL character")
    names = placeholders(query)
    text, spots = _number(query, names)
    text = _bind_literals(text, spots, _tokens(query, text))
    missing = [name for name in names if name not in values]
    if missing:
        raise SqlRefused(f"parameter {missing[0]!r} is missing")
    statement, node = _one_statement(query, text)
    kind_node, body = next(iter(node.items()))
    used = list(_param_refs(body))
    if sorted(set(used)) != list(range(1, len(names) + 1)) or len(used) != len(spots):
        # A placeholder the lexer saw as a parameter that the grammar does not use as one: refuse what we
        # cannot explain rather than run a statement with a value unbound.
        raise SqlRefused("a placeholder is not where a value can go")
    kind = _KINDS.get(kind_node, kind_node.removesuffix("Stmt").lower())
    returning = bool(body.get("returningList") or body.get("returningClause"))
    return Prepared(statement, tuple(values[name] for name in names), kind, names, returning)


def _number(query: str, names: tuple[str, ...]) -> tuple[str, list[_Spot]]:
    """The template with each placeholder replaced by `` $n ``, and where each one went."""
    out: list[str] = []
    spots: list[_Spot] = []
    length = last = 0
    for m in _PLACEHOLDER.finditer(query):
        piece = query[last : m.start()]
        number = names.index(m.group(1)) + 1
        param = f" ${number} "
        spots.append(_Spot(length + len(piece), length + len(piece) + len(param), m.group(1), number))
        out += [piece, param]
        length += len(piece) + len(param)
        last = m.end()
    out.append(query[last:])
    return "".join(out), spots


def _tokens(query: str, text: str) -> list[parser.Token]:
    try:
        return list(parser.scan(text))
    except parser.ParseError as exc:
        raise _not_sql(query, exc) from None


def _bind_literals(text: str, spots: list[_Spot], tokens: list[parser.Token]) -> str:
    """Check where each placeholder landed; rewrite the plain literals that hold placeholders."""
    rewrites: list[tuple[int, int, str]] = []  # (start, end exclusive, replacement)
    for i, token in enumerate(tokens):
        start, end = token.start, token.end + 1
        inside = [s for s in spots if start < s.end and s.start < end]
        if token.name == "PARAM" and not any(s.start <= start and end <= s.end for s in spots):
            raise SqlRefused(f"{text[start:end]!r} is not allowed: values go in as {{{{name}}}} placeholders")
        if not inside or token.name == "PARAM":
            continue
        raw = text[start:end]
        where = _OPAQUE.get(token.name)
        if token.name in _COMMENTS:
            where = "a comment"
        elif token.name == "SCONST" and raw[:1] in "eE":
            where = "an E'...' string"
        elif token.name == "SCONST" and raw[:1] == "$":
            where = "a dollar-quoted string"
        elif token.name == "SCONST" and i and tokens[i - 1].name == "NCHAR" and tokens[i - 1].end + 1 == start:
            where = _PREFIXED
        elif token.name == "IDENT" and raw[:1] == '"':
            where = "a quoted identifier"
        elif token.name != "SCONST" and not where:
            where = "a name or keyword"
        if where:
            raise SqlRefused(f"placeholder {{{{{inside[0].name}}}}} inside {where} is not allowed")
        rewrites.append((start, end, _concatenation(text, start, end, inside)))
    for start, end, replacement in reversed(rewrites):
        text = text[:start] + replacement + text[end:]
    return text


def _concatenation(text: str, start: int, end: int, spots: list[_Spot]) -> str:
    """A '...' literal holding placeholders as an expression: the value alone, or its pieces joined by ||."""
    terms: list[str] = []
    at = start + 1  # after the opening quote
    for spot in spots:
        if spot.start > at:
            terms.append("'" + text[at : spot.start] + "'")
        terms.append(f"${spot.number}")
        at = spot.end
    if end - 1 > at:
        terms.append("'" + text[at : end - 1] + "'")
    return f" {terms[0]} " if len(terms) == 1 else " (" + " || ".join(terms) + ") "


def _one_statement(query: str, text: str) -> tuple[str, dict[str, Any]]:
    """The only statement in ``text`` (its own text, and its parse tree node), or SqlRefused."""
    try:
        stmts = json.loads(parser.parse_sql_json(text))["stmts"]
    except parser.ParseError as exc:
        raise _not_sql(query, exc) from None
    if not stmts:
        raise SqlRefused("the query is empty")
    if len(stmts) > 1:
        raise SqlRefused("only one SQL statement is allowed")
    raw = text.encode()  # the parser's offsets count bytes
    start = stmts[0].get("stmt_location", 0)
    length = stmts[0].get("stmt_len") or len(raw) - start
    return raw[start : start + length].decode().strip(), stmts[0]["stmt"]


def _param_refs(node: Any) -> Iterator[int]:
    """The numbers of every parameter reference in a parse tree (as JSON)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ParamRef":
                yield int(value.get("number", 0))
            else:
                yield from _param_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _param_refs(item)


def _not_sql(query: str, exc: parser.ParseError) -> SqlRefused:
    if m := next((m for m in _MALFORMED.finditer(query) if not _PLACEHOLDER.fullmatch(m.group())), None):
        return SqlRefused(f"malformed placeholder {m.group()!r}: use {{{{name}}}} with letters, digits and _")
    return SqlRefused(f"the query is not valid SQL: {exc.args[0] if exc.args else exc}")
