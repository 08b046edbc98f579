"""SQL templates of ``database_query`` tools -> one safe statement for psycopg2. Pure; no I/O.

The contract: a template's ``{{name}}`` placeholders become bound parameters, never spliced text, so a value can
hold quotes, semicolons or ``{{...}}`` of its own and still be only a value. A template is exactly one statement;
which kinds of statement a tool may run (``Prepared.kind``) is for the caller to check.

To know where a placeholder or a ``;`` really is, the template is read with PostgreSQL's lexical rules (strings,
E'' and U&'' strings, dollar quotes, quoted identifiers, nested comments), assuming ``standard_conforming_strings``
is on (the default since PostgreSQL 9.1): backslashes are plain characters in '...' literals.
A placeholder in plain code becomes ``%(pN)s``; in a '...' literal, the literal becomes a concatenation of its
pieces and the parameters. Anywhere else (comments, E'' strings, identifiers...) it is refused: its meaning there
is unclear and a bound parameter cannot go there. A literal with more than a placeholder becomes an expression, so
it cannot follow a type name: write '{{n}} days'::interval, not interval '{{n}} days'.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
# PostgreSQL identifiers: any non-ASCII character counts as a letter; '$' may follow the first character.
_WORD = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_DOLLAR = re.compile(r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")  # $$ or $tag$, not $1
# PostgreSQL's whitespace, exactly: Python's \s also matches U+00A0, U+2000-U+3000..., which the server reads as
# identifier letters; treating them as blanks here would split statements differently from the server.
_SPACE = re.compile(r"[ \t\n\r\f\v]+")
_LINE_COMMENT = re.compile(r"--[^\n\r]*")

# Tokens that may end with a quote (a bound value is rendered as '...').
_QUOTED_END = ("string", "estring", "ustring", "prefixed", "placeholder")
# Tokens a placeholder must not appear in, and how to name them in the refusal.
_OPAQUE = {
    "comment": "a comment",
    "estring": "an E'...' string",
    "ustring": "a U&'...' string",
    "prefixed": "a B'...', X'...' or N'...' string",
    "dollar": "a dollar-quoted string",
    "ident": "a quoted identifier",
}


class SqlRefused(ValueError):
    """The template is not acceptable (several statements, placeholder in a comment, unterminated quote...).

    ``str()`` is a clear, user-readable reason.
    """


@dataclass(frozen=True)
class Prepared:
    """One statement for ``cursor.execute(sql, params)`` (always with the dict, so '%%' is read as '%')."""

    sql: str  # psycopg2 "pyformat": placeholders are %(p1)s, %(p2)s...; every literal '%' is doubled
    params: dict[str, Any]  # {"p1": value, ...}
    kind: str  # the statement's first keyword, lowercased: "select", "with", "insert"...
    names: tuple[str, ...]  # the placeholder names in order of first appearance
    returning: bool = False  # a RETURNING clause is present (a write that gives rows back)


def placeholders(query: str) -> tuple[str, ...]:
    """Names of the ``{{name}}`` placeholders in order of first appearance (wherever they are)."""
    return tuple(dict.fromkeys(m.group(1) for m in _PLACEHOLDER.finditer(query)))


def prepare(query: str, values: Mapping[str, Any]) -> Prepared:
    """The template as one statement with bound parameters, or ``SqlRefused`` saying why it cannot be."""
    if "\0" in query:
        raise SqlRefused("the query contains a NUL character")
    keys: dict[str, str] = {}  # placeholder name -> parameter key: one name binds one parameter
    params: dict[str, Any] = {}

    def bind(name: str) -> str:
        if name not in values:
            raise SqlRefused(f"parameter {name!r} is missing")
        if name not in keys:
            keys[name] = f"p{len(keys) + 1}"
            params[keys[name]] = values[name]
        return f"%({keys[name]})s"

    out: list[str] = []
    end = 0  # length of `out` up to the last token that is not whitespace or a comment
    kind: str | None = None
    ended = False  # a ';' was seen: from then on only whitespace and comments may follow
    previous = ""  # kind of the previous token
    depth = 0  # parentheses open
    returning = False
    for token, text in _tokens(query):
        glued, previous = previous in _QUOTED_END, token
        if token in ("space", "comment"):
            if out:  # leading and (via `end`) trailing whitespace and comments are left out
                out.append(text.replace("%", "%%"))
            continue
        if ended:
            raise SqlRefused("only one SQL statement is allowed")
        if token == "semicolon":
            ended = True
            continue
        if text in ("(", ")"):
            # Balanced, so the caller may wrap the statement in parentheses (a row-capping subquery) without the
            # template closing them early and going on outside.
            depth += 1 if text == "(" else -1
            if depth < 0:
                raise SqlRefused("unbalanced parentheses: a ')' closes nothing")
        if kind is None and text != "(":
            if token != "word":
                raise SqlRefused("the query must start with an SQL keyword such as SELECT")
            kind = text.lower()
        if glued and token in ("placeholder", "string"):
            out.append(" ")  # psycopg2 renders a value as '...': glued to another literal, the two would merge
        if token == "word" and text.lower() == "returning":
            returning = True
        if token == "placeholder":
            out.append(bind(text))
        elif token == "string":
            out.append(_literal(text, bind))
        else:
            out.append(text.replace("%", "%%"))
        end = len(out)
    if not end:
        raise SqlRefused("the query is empty")
    if kind is None:
        raise SqlRefused("the query must start with an SQL keyword such as SELECT")
    if depth:
        raise SqlRefused("unbalanced parentheses: a '(' is never closed")
    return Prepared("".join(out[:end]), params, kind, tuple(keys), returning)


def _literal(text: str, bind: Callable[[str], str]) -> str:
    """A '...' literal; with placeholders, the concatenation of its pieces and parameters in parentheses."""
    parts = _PLACEHOLDER.split(text[1:-1])  # [piece, name, piece, name, ..., piece]; '' escapes stay intact
    if len(parts) == 1:
        return text.replace("%", "%%")
    if len(parts) == 3 and parts[0] == parts[2] == "":
        return bind(parts[1])  # '{{x}}' is just the value
    terms = [bind(part) if i % 2 else "'" + part.replace("%", "%%") + "'" for i, part in enumerate(parts)]
    return "(" + " || ".join(term for i, term in enumerate(terms) if i % 2 or parts[i]) + ")"


def _tokens(query: str) -> Iterator[tuple[str, str]]:
    """(kind, text) pairs covering the whole query; refuses unterminated quotes and misplaced placeholders."""
    i, n = 0, len(query)
    while i < n:
        char = query[i]
        token = "other"
        if m := _PLACEHOLDER.match(query, i):
            yield "placeholder", m.group(1)
            i = m.end()
            continue
        if m := _SPACE.match(query, i):
            token, j = "space", m.end()
        elif m := _LINE_COMMENT.match(query, i):
            token, j = "comment", m.end()
        elif query.startswith("/*", i):
            token, j = "comment", _comment_end(query, i)
        elif char == "'":
            token, j = "string", _quote_end(query, i, "'", "string")
        elif char == '"':
            token, j = "ident", _quote_end(query, i, '"', "quoted identifier")
        elif m := _DOLLAR.match(query, i):
            close = query.find(m.group(), m.end())
            if close < 0:
                raise SqlRefused(f"unterminated dollar-quoted string (no closing {m.group()})")
            token, j = "dollar", close + len(m.group())
        elif m := _WORD.match(query, i):
            token, j = "word", m.end()
            prefix, after = m.group().lower(), query[j : j + 2]
            if prefix == "e" and after[:1] == "'":  # E'...': backslash escapes, so \' does not end it
                token, j = "estring", _quote_end(query, j, "'", "E'...' string", backslashes=True)
            elif prefix == "u" and after == "&'":
                token, j = "ustring", _quote_end(query, j + 1, "'", "U&'...' string")
            elif prefix == "u" and after == '&"':
                token, j = "ident", _quote_end(query, j + 1, '"', "quoted identifier")
            elif prefix in ("b", "x", "n") and after[:1] == "'":
                token, j = "prefixed", _quote_end(query, j, "'", "string")
        elif char == ";":
            token, j = "semicolon", i + 1
        elif query.startswith("{{", i):
            snippet = query[i : i + 40].split("}}")[0] + "}}"
            raise SqlRefused(f"malformed placeholder {snippet!r}: use {{{{name}}}} with letters, digits and _")
        else:
            j = i + 1
        text = query[i:j]
        if token in _OPAQUE and (m := _PLACEHOLDER.search(text)):
            raise SqlRefused(f"placeholder {{{{{m.group(1)}}}}} inside {_OPAQUE[token]} is not allowed")
        yield token, text
        i = j


def _quote_end(query: str, start: int, quote: str, what: str, backslashes: bool = False) -> int:
    """Index just past the quote closing the one at ``start`` (a doubled quote is part of the content)."""
    j = start + 1
    while j < len(query):
        if backslashes and query[j] == "\\":
            j += 2
        elif query[j] != quote:
            j += 1
        elif query.startswith(quote, j + 1):
            j += 2
        else:
            return j + 1
    raise SqlRefused(f"unterminated {what} (missing closing {quote})")


def _comment_end(query: str, start: int) -> int:
    """Index just past the */ closing the /* at ``start``; PostgreSQL block comments nest."""
    depth, j = 1, start + 2
    while depth:
        if j >= len(query):
            raise SqlRefused("unterminated /* comment (missing */)")
        if query.startswith("/*", j):
            depth, j = depth + 1, j + 2
        elif query.startswith("*/", j):
            depth, j = depth - 1, j + 2
        else:
            j += 1
    return j
