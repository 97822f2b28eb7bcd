"""Blob stores, chosen by URL scheme and imported lazily."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from voxvault.blobs.base import BlobInfo, BlobSink, BlobStore, StoredBlob
from voxvault.errors import ConfigurationError

__all__ = ["BlobInfo", "BlobSink", "BlobStore", "StoredBlob", "open_blob_store"]

# scheme -> (module, factory, extra that provides its dependencies)
_ADAPTERS: dict[str, tuple[str, str, str | None]] = {
    "file": ("voxvault.blobs.local", "LocalBlobStore", None),
    "s3": ("voxvault.blobs.s3", "S3BlobStore", "s3"),
}


def open_blob_store(url: str) -> BlobStore:
    scheme = urlsplit(url).scheme
    if scheme not in _ADAPTERS:
        known = ", ".join(sorted(_ADAPTERS))
        raise ConfigurationError(f"unsupported blob store URL {url!r}; schemes: {known}")
    module_name, factory_name, extra = _ADAPTERS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # pragma: no cover - depends on which extras are installed
        hint = f"pip install 'voxvault[{extra}]'" if extra else "reinstall voxvault"
        raise ConfigurationError(f"the {scheme}:// blob store needs: {hint} ({exc})") from exc
    store: BlobStore = getattr(module, factory_name).from_url(url)
    return store
