"""The search query language: parsing, and what it compiles to for FTS5 and PostgreSQL.

Whatever a user types parses to a query or is refused as an invalid request, and what it
compiles to is never an error for either engine: the property tests run the compiled text on a
real FTS5 table and through a real ``to_tsquery``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.postgres import postgres_database
from voxvault.errors import InvalidRequest
from voxvault.search.query import (
    MAX_QUERY_CHARS,
    MAX_TERMS,
    MAX_WORD_CHARS,
    SearchQuery,
    Term,
    parse_query,
    to_fts5,
    to_tsquery_text,
)


def t(*words: str, prefix: bool = False) -> Term:
    return Term(tuple(words), prefix)


@pytest.mark.parametrize(
    ("text", "groups", "excluded"),
    [
        ("budget review", [[t("budget")], [t("review")]], []),
        ("  Budget   REVIEW ", [[t("budget")], [t("review")]], []),
        ('"budget review"', [[t("budget", "review")]], []),
        ('"budget review', [[t("budget", "review")]], []),  # an unclosed quote runs to the end
        ("budget OR forecast", [[t("budget"), t("forecast")]], []),
        ("a b OR c d", [[t("a")], [t("b"), t("c")], [t("d")]], []),
        ("a OR b OR c", [[t("a"), t("b"), t("c")]], []),
        ("a OR OR b", [[t("a")], [t("or")], [t("or")], [t("b")]], []),
        ("OR", [[t("or")]], []),
        ("budget or forecast", [[t("budget")], [t("or")], [t("forecast")]], []),
        ("OR budget", [[t("or")], [t("budget")]], []),
        ("budget OR", [[t("budget")], [t("or")]], []),
        ("budget OR -draft", [[t("budget")], [t("or")]], [t("draft")]),
        ("budget -draft", [[t("budget")]], [t("draft")]),
        ('budget -"first draft"', [[t("budget")]], [t("first", "draft")]),
        ("budget - draft", [[t("budget")], [t("draft")]], []),  # a lone minus is punctuation
        ("budg*", [[t("budg", prefix=True)]], []),
        ('"budg*"', [[t("budg")]], []),  # no prefix inside quotes
        ("budget:review", [[t("budget", "review")]], []),
        ("NEAR(budget, review)", [[t("near", "budget")], [t("review")]], []),
        ("budget * ^ : ( )", [[t("budget")]], []),
        ("AND NOT budget", [[t("and")], [t("not")], [t("budget")]], []),
        ("Ünïcode Straße", [[t("ünïcode")], [t("strasse")]], []),
        ("שלום עולם", [[t("שלום")], [t("עולם")]], []),
        ("snake_case", [[t("snake", "case")]], []),
    ],
)
def test_parse(text: str, groups: list[list[Term]], excluded: list[Term]) -> None:
    parsed = parse_query(text)
    assert parsed == SearchQuery(tuple(tuple(g) for g in groups), tuple(excluded))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "-draft",
        '-"first draft"',
        "*",
        '""',
        "%",
        "\\",
        "\x00\x01",
        "🙂🙂",
        "- -- ---",
    ],
)
def test_nothing_to_look_for_is_an_invalid_request(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_query(text)


def test_limits() -> None:
    assert parse_query("a" * MAX_QUERY_CHARS).words == ("a" * MAX_WORD_CHARS,)
    with pytest.raises(InvalidRequest) as too_long:
        parse_query("a" * (MAX_QUERY_CHARS + 1))
    assert too_long.value.detail == {"max_chars": MAX_QUERY_CHARS, "chars": MAX_QUERY_CHARS + 1}
    assert len(parse_query(" ".join(["w"] * MAX_TERMS)).groups) == MAX_TERMS
    with pytest.raises(InvalidRequest):
        parse_query(" ".join(["w"] * MAX_TERMS) + " -x")
    # One letter and a * would be every word with that letter: refused, with the reason.
    assert parse_query("bu*").groups == ((Term(("bu",), prefix=True),),)
    with pytest.raises(InvalidRequest, match="at least 2 letters") as short:
        parse_query("budget b*")
    assert short.value.detail == {"term": "b*"}
    assert parse_query('"b*"').groups == ((Term(("b",)),),)  # quoted: a word, not a prefix


def test_compiled_forms() -> None:
    query = parse_query('budget OR forecast "next quarter" rev* -draft -"old plan"')
    assert to_fts5(query) == (
        '(("budget" OR "forecast") AND "next quarter" AND "rev" *) NOT ("draft" OR "old plan")'
    )
    assert to_tsquery_text(query) == (
        "(('budget' | 'forecast') & ('next' <-> 'quarter') & 'rev':*)"
        " & !('draft' | ('old' <-> 'plan'))"
    )
    plain = parse_query("Hello")
    assert (to_fts5(plain), to_tsquery_text(plain)) == ('"hello"', "'hello'")


# ---- the compiled text on the real engines ------------------------------------------------------

DOCUMENTS = [
    "the budget review is on Monday",
    "we're over budget; naïve forecasts, OR worse",
    "שלום עולם and مرحبا بالعالم",
    "NEAR AND NOT OR * ^ : drop table recordings",
    "x" * 10,
]


@pytest.fixture(scope="module")
def fts5() -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(":memory:")
    connection.execute(
        "CREATE VIRTUAL TABLE docs USING fts5(text,"
        " tokenize='porter unicode61 remove_diacritics 2')"
    )
    connection.executemany("INSERT INTO docs(text) VALUES (?)", [(d,) for d in DOCUMENTS])
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def postgres() -> Iterator[psycopg.Connection]:
    with postgres_database() as url, psycopg.connect(url, autocommit=True) as connection:
        yield connection


def parsed_or_refused(text: str) -> SearchQuery | None:
    try:
        return parse_query(text)
    except InvalidRequest:
        return None


HOSTILE = [
    '"unbalanced',
    'a "b',
    "NEAR(budget review, 2)",
    "*",
    "budget:*",
    "text:budget",
    "^budget",
    "budget AND review",
    "NOT budget",
    "'; DROP TABLE docs; --",
    "budget' OR '1'='1",
    "% _ \\ \\\\",
    "🙂 budget 🎉",
    "שלום",
    "مرحبا",
    "a\x00b\x01c\x1fd",
    "x" * 1000,
    "-a -b c*",
    "!budget & review | (x <-> y)",
    "budget:* & 'x'",
]


def fts5_match(connection: sqlite3.Connection, query: SearchQuery) -> list[str]:
    rows = connection.execute(
        "SELECT text FROM docs WHERE docs MATCH ? ORDER BY rowid", (to_fts5(query),)
    ).fetchall()
    return [text for (text,) in rows]


def tsquery_match(connection: psycopg.Connection, query: SearchQuery) -> list[str]:
    found: list[str] = []
    for config in ("english", "simple"):
        rows = connection.execute(
            "SELECT d FROM unnest(%s::text[]) WITH ORDINALITY AS u(d, n)"
            " WHERE to_tsvector(%s::regconfig, d) @@ to_tsquery(%s::regconfig, %s) ORDER BY n",
            (DOCUMENTS, config, config, to_tsquery_text(query)),
        ).fetchall()
        found += [d for (d,) in rows if d not in found]
    return found


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_queries_are_text_to_fts5(fts5: sqlite3.Connection, text: str) -> None:
    query = parsed_or_refused(text)
    if query is not None:
        fts5_match(fts5, query)
    assert len(fts5_match(fts5, parse_query("budget"))) == 2  # the table is intact


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_queries_are_text_to_tsquery(postgres: psycopg.Connection, text: str) -> None:
    query = parsed_or_refused(text)
    if query is not None:
        tsquery_match(postgres, query)


def test_engines_agree_on_what_the_operators_mean(
    fts5: sqlite3.Connection, postgres: psycopg.Connection
) -> None:
    for text, expected in [
        ("budget", [0, 1]),
        ('"budget review"', [0]),
        ("budget -review", [1]),
        ("forecast", [1]),  # stems
        ("naive", [1]),  # accents, by the unicode61 tokenizer only
        ("budg*", [0, 1]),
        ("review OR forecasts", [0, 1]),
        ("drop table", [3]),
        ("שלום", [2]),
        ("بالعالم", [2]),
    ]:
        query = parse_query(text)
        assert fts5_match(fts5, query) == [DOCUMENTS[i] for i in expected], text
        if text != "naive":  # PostgreSQL's configurations keep accents (no unaccent)
            assert tsquery_match(postgres, query) == [DOCUMENTS[i] for i in expected], text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_parses_or_is_refused_and_fts5_accepts_what_parses(
    fts5: sqlite3.Connection, text: str
) -> None:
    query = parsed_or_refused(text)
    if query is not None:
        assert query.groups
        fts5_match(fts5, query)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_parses_or_is_refused_and_tsquery_accepts_what_parses(
    postgres: psycopg.Connection, text: str
) -> None:
    query = parsed_or_refused(text)
    if query is not None:
        tsquery_match(postgres, query)
