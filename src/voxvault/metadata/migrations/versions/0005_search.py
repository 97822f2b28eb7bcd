"""Search index: the segments of each recording's current transcript, full-text indexed.

SQLite: an external-content FTS5 table over ``search_segments``, kept in step by triggers.
PostgreSQL: a ``config`` (text search configuration) per segment, a generated ``tsv`` column
and a GIN index on it; and ``voxvault_*`` configurations: PostgreSQL's own per language, with
accents folded (the ``unaccent`` extension, trusted: a database owner may create it) and no
stop words, so that they read text as the SQLite index does.

The index starts empty; the server's sweeper (or ``voxvault reindex``) fills it from the
transcripts already stored.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

from voxvault.metadata.tables import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_SQLITE = [
    # prefix: 2- and 3-letter prefix queries read one list instead of merging every word's.
    "CREATE VIRTUAL TABLE search_fts USING fts5(text, content='search_segments',"
    " content_rowid='id', tokenize='porter unicode61 remove_diacritics 2', prefix='2 3')",
    "CREATE TRIGGER search_segments_indexed AFTER INSERT ON search_segments BEGIN"
    " INSERT INTO search_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER search_segments_unindexed AFTER DELETE ON search_segments BEGIN"
    " INSERT INTO search_fts(search_fts, rowid, text) VALUES ('delete', old.id, old.text); END",
]

# The stock configurations with a Snowball stemmer of the same name; those the server has get a
# voxvault_ twin (an older server may lack a few languages).
_STEMMED = (
    "arabic", "armenian", "basque", "catalan", "danish", "dutch", "english", "finnish",
    "french", "german", "greek", "hindi", "hungarian", "indonesian", "irish", "italian",
    "lithuanian", "nepali", "norwegian", "portuguese", "romanian", "russian", "serbian",
    "spanish", "swedish", "tamil", "turkish", "yiddish",
)  # fmt: skip
_WORD_TOKENS = "asciiword, asciihword, hword_asciipart, word, hword, hword_part"
# Constants only: no input reaches this text.
_CONFIGURATIONS = f"""
DO $$
DECLARE name text;
BEGIN
    CREATE TEXT SEARCH CONFIGURATION voxvault_simple (COPY = simple);
    ALTER TEXT SEARCH CONFIGURATION voxvault_simple
        ALTER MAPPING FOR {_WORD_TOKENS} WITH unaccent, simple;
    FOREACH name IN ARRAY ARRAY['{"', '".join(_STEMMED)}'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_ts_config WHERE cfgname = name);
        EXECUTE format(
            'CREATE TEXT SEARCH DICTIONARY voxvault_%s_stem (TEMPLATE = snowball, LANGUAGE = %s)',
            name, name);
        EXECUTE format('CREATE TEXT SEARCH CONFIGURATION voxvault_%s (COPY = %s)', name, name);
        EXECUTE format(
            'ALTER TEXT SEARCH CONFIGURATION voxvault_%s ALTER MAPPING FOR {_WORD_TOKENS}'
            ' WITH unaccent, voxvault_%s_stem', name, name);
    END LOOP;
END $$
"""  # noqa: S608

_POSTGRESQL = [
    "CREATE EXTENSION IF NOT EXISTS unaccent",
    _CONFIGURATIONS,
    "ALTER TABLE search_segments ADD COLUMN config regconfig NOT NULL DEFAULT 'voxvault_simple'",
    "ALTER TABLE search_segments ADD COLUMN tsv tsvector"
    " GENERATED ALWAYS AS (to_tsvector(config, text)) STORED",
    "CREATE INDEX ix_search_segments_tsv ON search_segments USING gin (tsv)",
]


def upgrade() -> None:
    op.create_table(
        "search_documents",
        sa.Column(
            "recording_id",
            sa.String(64),
            sa.ForeignKey("recordings.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("language", sa.String(32)),
        sa.Column("config", sa.String(64), nullable=False),
        sa.Column("segment_count", sa.Integer, nullable=False),
        sa.Column("first_segment_id", sa.BigInteger),
        sa.Column("last_segment_id", sa.BigInteger),
        sa.Column("indexed_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "search_segments",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column(
            "recording_id",
            sa.String(64),
            sa.ForeignKey("recordings.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("start", sa.Float, nullable=False),
        sa.Column("end", sa.Float, nullable=False),
        sa.Column("speaker", sa.String(100)),
        sa.Column("text", sa.Text, nullable=False),
    )
    op.create_index("ix_search_segments_recording", "search_segments", ["recording_id", "position"])
    dialect = op.get_bind().dialect.name
    for statement in _SQLITE if dialect == "sqlite" else _POSTGRESQL:
        op.execute(statement)


_DROP_CONFIGURATIONS = """
DO $$
DECLARE name text;
BEGIN
    FOR name IN SELECT cfgname FROM pg_ts_config WHERE cfgname LIKE 'voxvault\\_%' LOOP
        EXECUTE format('DROP TEXT SEARCH CONFIGURATION %I', name);
    END LOOP;
    FOR name IN SELECT dictname FROM pg_ts_dict WHERE dictname LIKE 'voxvault\\_%' LOOP
        EXECUTE format('DROP TEXT SEARCH DICTIONARY %I', name);
    END LOOP;
END $$
"""


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        op.execute("DROP TABLE search_fts")
    op.drop_table("search_segments")
    op.drop_table("search_documents")
    if dialect != "sqlite":
        op.execute(_DROP_CONFIGURATIONS)
