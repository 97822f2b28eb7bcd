"""The search query language, parsed once and compiled for each engine.

::

    budget review        both words, anywhere in the segment
    "budget review"      the exact phrase
    budget OR forecast   either word (OR binds tighter than the implied AND)
    budget -draft        budget, but not in a segment that says draft
    budg*                any word starting with budg (two letters at least)

Everything else is text: punctuation and engine operators (``NEAR(``, ``:``, ``^``, a lone
``*``) only separate words, an unclosed quote runs to the end, and ``OR`` that does not stand
between two terms is the word "or". Words are what both engines' tokenizers call words: runs of
letters and digits, compared case-insensitively (and, where the engine stems, by stem).

The grammar is this small on purpose, and hand-written because each engine's own syntax
(FTS5 MATCH, ``to_tsquery``) must never see user text unescaped: the compilers below emit only
quoted words, so no input can reach either engine as syntax.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from voxvault.errors import InvalidRequest

MAX_QUERY_CHARS = 1_000
MAX_TERMS = 32
MAX_WORD_CHARS = 100
MIN_PREFIX_CHARS = 2

_TOKEN = re.compile(r'(-?)"([^"]*)"?|(\S+)')
_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True, slots=True)
class Term:
    """One word, or several that must follow each other (a phrase)."""

    words: tuple[str, ...]
    prefix: bool = False
    """The last word matches any word that starts with it."""


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """Every group must match (a group matches when any of its terms does); no excluded term may."""

    groups: tuple[tuple[Term, ...], ...]
    excluded: tuple[Term, ...]

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(w for group in self.groups for term in group for w in term.words)


@dataclass(frozen=True, slots=True)
class _Token:
    term: Term | None
    excluded: bool = False
    is_or: bool = False


def _term(text: str, *, quoted: bool) -> Term | None:
    words = tuple(w.casefold()[:MAX_WORD_CHARS] for w in _WORD.findall(text))
    if not words:
        return None
    prefix = not quoted and text.endswith("*")
    if prefix and len(words[-1]) < MIN_PREFIX_CHARS:
        raise InvalidRequest(
            f"a prefix needs at least {MIN_PREFIX_CHARS} letters before the *",
            detail={"term": text[:MAX_WORD_CHARS]},
        )
    return Term(words, prefix)


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    for match in _TOKEN.finditer(text):
        minus, phrase, bare = match.groups()
        if bare is None:
            term = _term(phrase, quoted=True)
            excluded = bool(minus)
        elif bare == "OR":
            tokens.append(_Token(None, is_or=True))
            continue
        else:
            excluded = bare.startswith("-") and len(bare) > 1
            term = _term(bare[1:] if excluded else bare, quoted=False)
        if term is not None:
            tokens.append(_Token(term, excluded=excluded))
    return tokens


def parse_query(text: str) -> SearchQuery:
    """Parse a user's query; InvalidRequest (400) when nothing in it can be searched for."""
    if len(text) > MAX_QUERY_CHARS:
        raise InvalidRequest(
            f"a search query is at most {MAX_QUERY_CHARS} characters",
            detail={"max_chars": MAX_QUERY_CHARS, "chars": len(text)},
        )
    tokens = _tokens(text)
    groups: list[list[Term]] = []
    excluded: list[Term] = []
    joining = False
    for index, token in enumerate(tokens):
        if token.is_or:
            before = tokens[index - 1] if index else None
            after = tokens[index + 1] if index + 1 < len(tokens) else None
            if _joinable(before) and _joinable(after) and not joining:
                joining = True
                continue
            token = _Token(Term(("or",)))
        assert token.term is not None
        if token.excluded:
            excluded.append(token.term)
        elif joining:
            groups[-1].append(token.term)
        else:
            groups.append([token.term])
        joining = False
    if not groups:
        raise InvalidRequest(
            "the query has no word to look for: give at least one word or phrase that must "
            "match (excluded terms alone, punctuation and symbols find nothing)"
        )
    terms = sum(len(group) for group in groups) + len(excluded)
    if terms > MAX_TERMS:
        raise InvalidRequest(
            f"a search query has at most {MAX_TERMS} terms",
            detail={"max_terms": MAX_TERMS, "terms": terms},
        )
    return SearchQuery(tuple(tuple(g) for g in groups), tuple(excluded))


def _joinable(token: _Token | None) -> bool:
    return token is not None and not token.is_or and not token.excluded


# ---- compiled forms -----------------------------------------------------------------------------


def _compile(
    query: SearchQuery, term: Callable[[Term], str], either: str, both: str, but_not: str
) -> str:
    """The query in an engine's syntax, given how it writes a term and its three operators."""

    def group(terms: tuple[Term, ...]) -> str:
        return term(terms[0]) if len(terms) == 1 else "(" + either.join(map(term, terms)) + ")"

    required = both.join(map(group, query.groups))
    if not query.excluded:
        return required
    return f"({required}){but_not}({either.join(map(term, query.excluded))})"


def _fts5_term(term: Term) -> str:
    # Words hold letters and digits only, so double quotes around them make plain FTS5 strings.
    return '"' + " ".join(term.words) + '"' + (" *" if term.prefix else "")


def to_fts5(query: SearchQuery) -> str:
    """The FTS5 MATCH expression of a query."""
    return _compile(query, _fts5_term, " OR ", " AND ", " NOT ")


def _ts_term(term: Term) -> str:
    lexemes = [f"'{word}'" for word in term.words]
    if term.prefix:
        lexemes[-1] += ":*"
    return lexemes[0] if len(lexemes) == 1 else "(" + " <-> ".join(lexemes) + ")"


def to_tsquery_text(query: SearchQuery) -> str:
    """The text ``to_tsquery(config, text)`` turns into the query for one configuration."""
    return _compile(query, _ts_term, " | ", " & ", " & !")
