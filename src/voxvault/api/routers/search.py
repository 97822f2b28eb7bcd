"""/v1/search: where in the library was something said."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import ConfigDict

from voxvault.api.deps import VaultDep
from voxvault.api.query_model import parse_query_string, query_parameters
from voxvault.models import SearchGroupPage, SearchPage, SearchRequest

router = APIRouter(prefix="/v1/search", tags=["search"])


class SearchParameters(SearchRequest):
    """The search's query parameters: validated once, here, into the service's own request;
    a parameter the search does not know is ignored, as on every other route."""

    model_config = ConfigDict(extra="ignore")


@router.get(
    "",
    response_model=SearchPage | SearchGroupPage,
    responses={422: {"description": "A parameter is invalid; the error body lists each."}},
    openapi_extra={"parameters": query_parameters(SearchParameters)},
)
async def search(request: Request, vault: VaultDep) -> Response:
    """Segments of current transcripts that match, best first (ties: newer recordings first).

    Each hit names its recording and second and carries a signed playback URL that starts
    there. Ranking considers the newest 1,000 matching segments; `truncated` says more matched.
    Pass `next_cursor` back as `cursor` (with the same query and filters) for the next page.
    """
    asked = parse_query_string(SearchParameters, request)
    page = await vault.search(asked, base_url=str(request.base_url))
    # The page is the service's own model, made just now: serialised as it is, not validated
    # against the response model once more.
    return Response(page.model_dump_json(), media_type="application/json")
