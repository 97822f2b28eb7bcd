"""Full-text search of transcripts: the query language, the SearchIndex port and its adapters
(SQLite FTS5, PostgreSQL tsvector), and the search use case."""

from voxvault.search.base import IndexHit, IndexPage, SearchFilters, SearchIndex
from voxvault.search.query import SearchQuery, Term, parse_query

__all__ = [
    "IndexHit",
    "IndexPage",
    "SearchFilters",
    "SearchIndex",
    "SearchQuery",
    "Term",
    "parse_query",
]
