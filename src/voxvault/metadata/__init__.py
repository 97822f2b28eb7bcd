"""Metadata stores, chosen by database URL and imported lazily."""

from __future__ import annotations

from urllib.parse import urlsplit

from voxvault.errors import ConfigurationError
from voxvault.metadata.base import DEFAULT_WORKSPACE, MetadataStore, RecordingBlobs

__all__ = ["DEFAULT_WORKSPACE", "MetadataStore", "RecordingBlobs", "open_metadata_store"]

_SQL_SCHEMES = {"sqlite", "sqlite+aiosqlite", "postgresql", "postgresql+psycopg", "postgres"}


def open_metadata_store(url: str) -> MetadataStore:
    scheme = urlsplit(url).scheme
    if scheme == "postgres":
        url = "postgresql" + url[len("postgres") :]
    if scheme not in _SQL_SCHEMES:
        raise ConfigurationError(
            f"unsupported database URL {url!r}; use sqlite:///path or postgresql://..."
        )
    try:
        from voxvault.metadata.sql import SqlMetadataStore

        return SqlMetadataStore.from_url(url)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"the database URL {url!r} needs a driver: pip install 'voxvault[postgres]' ({exc})"
        ) from exc
