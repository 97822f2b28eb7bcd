"""The search use case: a request in, hits with snippets and playback links out.

Pagination is by offset within the ranked candidates, carried in an opaque cursor that is only
valid for the query and filters it was issued for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import html
import json
from typing import TYPE_CHECKING

from voxvault.errors import InvalidRequest
from voxvault.models import SearchGroup, SearchGroupPage, SearchHit, SearchPage, SearchRequest
from voxvault.search.base import HIGHLIGHT_END, HIGHLIGHT_START, SearchFilters
from voxvault.search.query import parse_query

if TYPE_CHECKING:
    from voxvault.vault import Vault

MARK_START = "<mark>"
MARK_END = "</mark>"


def _fingerprint(request: SearchRequest) -> str:
    asked = request.model_dump(mode="json", exclude={"cursor", "limit"})
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:16]


def encode_cursor(offset: int, request: SearchRequest) -> str:
    raw = json.dumps([offset, _fingerprint(request)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(request: SearchRequest) -> int:
    if request.cursor is None:
        return 0
    try:
        raw = base64.urlsafe_b64decode(request.cursor + "=" * (-len(request.cursor) % 4))
        offset, fingerprint = json.loads(raw)
        valid = isinstance(offset, int) and 0 <= offset <= 10**6 and isinstance(fingerprint, str)
    except (ValueError, TypeError, RecursionError, binascii.Error):
        valid = False
    if not valid:
        raise InvalidRequest("the cursor is not one this server issued")
    if fingerprint != _fingerprint(request):
        raise InvalidRequest("the cursor belongs to another query or other filters")
    return int(offset)


def highlight(snippet: str) -> str:
    """The adapter's snippet as HTML: text escaped, matched words in ``<mark>``."""
    escaped = html.escape(snippet, quote=False)
    return escaped.replace(HIGHLIGHT_START, MARK_START).replace(HIGHLIGHT_END, MARK_END)


def _seconds(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


async def search_library(
    vault: Vault, request: SearchRequest, *, base_url: str
) -> SearchPage | SearchGroupPage:
    query = parse_query(request.q)
    offset = decode_cursor(request)
    filters = SearchFilters(
        tag=request.tag,
        speaker=request.speaker,
        language=request.language,
        recording_id=request.recording_id,
        created_after=request.created_after,
        created_before=request.created_before,
    )
    grouped = request.group == "recording"
    page = await vault.metadata.search(
        vault.workspace,
        query,
        filters,
        offset=offset,
        limit=request.limit,
        per_group=request.per_group if grouped else None,
    )

    urls, _ = await vault.playback_urls(
        [(found.recording_id, found.has_playback) for found in page.hits], base_url=base_url
    )
    hits = [
        SearchHit(
            recording_id=found.recording_id,
            recording_title=found.recording_title,
            start=found.start,
            end=found.end,
            speaker=found.speaker,
            text=found.text,
            snippet=highlight(found.snippet),
            playback_url=(
                f"{urls[found.recording_id, found.has_playback]}"
                f"#t={_seconds(found.start)},{_seconds(found.end)}"
            ),
        )
        for found in page.hits
    ]
    counted = page.groups if grouped else page.total
    more = offset + request.limit < counted
    next_cursor = encode_cursor(offset + request.limit, request) if more else None
    truncated = page.truncated
    if not grouped:
        return SearchPage(items=hits, next_cursor=next_cursor, truncated=truncated)
    groups: list[SearchGroup] = []
    for found, shown in zip(page.hits, hits, strict=True):
        if not groups or groups[-1].recording_id != found.recording_id:
            groups.append(
                SearchGroup(
                    recording_id=found.recording_id,
                    recording_title=found.recording_title,
                    hits=[],
                )
            )
        groups[-1].hits.append(shown)
    return SearchGroupPage(items=groups, next_cursor=next_cursor, truncated=truncated)
