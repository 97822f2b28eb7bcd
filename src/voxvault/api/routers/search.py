"""/v1/search: where in the library was something said."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from voxvault.api.deps import VaultDep
from voxvault.models import SearchGroupPage, SearchPage

router = APIRouter(prefix="/v1/search", tags=["search"])

_QUERY_HELP = (
    'Words (all must match, case- and accent-insensitive, stemmed), `"exact phrases"`, '
    "`a OR b`, `-excluded`, `prefix*`. At most 1,000 characters; anything else is text."
)


@router.get("")
async def search(
    request: Request,
    vault: VaultDep,
    q: Annotated[str, Query(description=_QUERY_HELP)],
    tag: str | None = None,
    speaker: str | None = None,
    language: str | None = None,
    recording_id: str | None = None,
    created_after: str | None = None,
    created_before: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: str | None = None,
    group: Annotated[str | None, Query(description="`recording`: hits per recording")] = None,
    per_group: Annotated[int, Query(ge=1, le=20)] = 3,
) -> SearchPage | SearchGroupPage:
    """Segments of current transcripts that match, best first (ties: newer recordings first).

    Each hit names its recording and second and carries a signed playback URL that starts
    there. Ranking considers the newest 1,000 matching segments; `truncated` says more matched.
    Pass `next_cursor` back as `cursor` (with the same query and filters) for the next page.
    """
    asked = {
        "q": q,
        "tag": tag,
        "speaker": speaker,
        "language": language,
        "recording_id": recording_id,
        "created_after": created_after,
        "created_before": created_before,
        "limit": limit,
        "cursor": cursor,
        "group": group,
        "per_group": per_group,
    }
    return await vault.search(
        {k: v for k, v in asked.items() if v is not None}, base_url=str(request.base_url)
    )
