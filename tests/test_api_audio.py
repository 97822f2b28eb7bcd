"""Serving the original bytes: ranges, HEAD, conditional requests, signed playback links.

The API tests run on the embedded stack and on the scale-out one (``tests/stacks.py``); there the
playback links are presigned by the object store, and the signed ``/v1/playback`` links are made
with the stack's key and checked by whichever API process gets them.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.media import wav_bytes
from tests.stacks import Stack, client, stack
from voxvault.api.ranges import parse_range
from voxvault.errors import RangeNotSatisfiable
from voxvault.names import content_disposition

pytestmark = pytest.mark.anyio
__all__ = ["client", "stack"]  # the fixtures that run each test on both stacks
AUDIO = wav_bytes(seconds=1.0, rate=16000)  # 32,044 bytes
SIZE = len(AUDIO)


@pytest.fixture
async def recording(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.post(
        "/v1/recordings",
        params={"filename": "réunion «ok».wav", "transcribe": "false"},
        content=AUDIO,
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_full_get_has_range_support_headers(
    client: httpx.AsyncClient, recording: dict[str, Any]
) -> None:
    response = await client.get(f"/v1/recordings/{recording['id']}/audio")
    assert response.status_code == 200
    assert response.content == AUDIO
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-length"] == str(SIZE)
    assert response.headers["etag"] == f'"{recording["sha256"]}"'
    assert response.headers["content-type"] == "audio/wav"
    assert response.headers["x-content-type-options"] == "nosniff"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('inline; filename="r_union _ok_.wav"')
    assert "filename*=UTF-8''r%C3%A9union%20%C2%ABok%C2%BB.wav" in disposition


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, SIZE - 1),
        ("bytes=-100", SIZE - 100, SIZE - 1),
        ("bytes=-999999", 0, SIZE - 1),
        ("bytes=30000-999999", 30000, SIZE - 1),
        (f"bytes={SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE - 1),
    ],
)
async def test_single_and_suffix_ranges_are_206(
    client: httpx.AsyncClient, recording: dict[str, Any], header: str, start: int, end: int
) -> None:
    response = await client.get(
        f"/v1/recordings/{recording['id']}/audio", headers={"Range": header}
    )
    assert response.status_code == 206
    assert response.content == AUDIO[start : end + 1]
    assert response.headers["content-range"] == f"bytes {start}-{end}/{SIZE}"
    assert response.headers["content-length"] == str(end - start + 1)


@pytest.mark.parametrize("header", [f"bytes={SIZE}-", f"bytes={SIZE + 10}-{SIZE + 20}", "bytes=-0"])
async def test_unsatisfiable_range_is_416(
    client: httpx.AsyncClient, recording: dict[str, Any], header: str
) -> None:
    response = await client.get(
        f"/v1/recordings/{recording['id']}/audio", headers={"Range": header}
    )
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{SIZE}"
    assert response.json()["error"]["code"] == "range_not_satisfiable"


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-10,20-30",
        "bytes=abc",
        "items=0-10",
        "bytes=10-5",
        "bytes=\xb2-5".encode("latin-1"),
        "bytes=-",
    ],
)
async def test_multi_or_invalid_ranges_get_the_whole_body(
    client: httpx.AsyncClient, recording: dict[str, Any], header: str | bytes
) -> None:
    response = await client.get(
        f"/v1/recordings/{recording['id']}/audio",
        headers=[(b"Range", header if isinstance(header, bytes) else header.encode())],
    )
    assert response.status_code == 200
    assert response.content == AUDIO


async def test_head_sends_headers_only(
    client: httpx.AsyncClient, recording: dict[str, Any]
) -> None:
    url = f"/v1/recordings/{recording['id']}/audio"
    response = await client.head(url)
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == str(SIZE)
    partial = await client.head(url, headers={"Range": "bytes=10-19"})
    assert partial.status_code == 206
    assert partial.headers["content-range"] == f"bytes 10-19/{SIZE}"
    assert partial.content == b""


async def test_conditional_requests(client: httpx.AsyncClient, recording: dict[str, Any]) -> None:
    url = f"/v1/recordings/{recording['id']}/audio"
    etag = f'"{recording["sha256"]}"'
    not_modified = await client.get(url, headers={"If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    changed = await client.get(url, headers={"If-None-Match": '"other"'})
    assert changed.status_code == 200
    same = await client.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert same.status_code == 206
    stale = await client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"old"'})
    assert stale.status_code == 200
    assert stale.content == AUDIO


@given(
    size=st.integers(min_value=0, max_value=10_000),
    first=st.one_of(st.none(), st.integers(min_value=0, max_value=12_000)),
    last=st.one_of(st.none(), st.integers(min_value=0, max_value=12_000)),
)
def test_parse_range_agrees_with_slicing(size: int, first: int | None, last: int | None) -> None:
    """RFC 9110 semantics, checked against Python slicing of the same bytes."""
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    try:
        result = parse_range(header, size)
    except RangeNotSatisfiable:
        if first is None:
            assert last == 0 or size == 0
        else:
            assert first >= size
            assert last is None or last >= first
        return
    if result is None:
        assert (first is None and last is None) or (
            first is not None and last is not None and last < first
        )
        return
    start, end = result
    assert 0 <= start <= end < size
    if first is None:
        assert last is not None
        assert data[start : end + 1] == data[-last:]
    else:
        assert data[start : end + 1] == data[first : (last + 1 if last is not None else None)]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("plain.wav", 'inline; filename="plain.wav"'),
        ('quo"te;x.wav', "inline; filename=\"quo_te_x.wav\"; filename*=UTF-8''quo%22te%3Bx.wav"),
        ("日本.mp3", "inline; filename=\"__.mp3\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC.mp3"),
        (None, 'inline; filename="fallback"'),
    ],
)
def test_content_disposition_is_always_a_safe_header(name: str | None, expected: str) -> None:
    value = content_disposition(name, "fallback")
    assert value == expected
    assert value.isascii()
    assert "\r" not in value
    assert "\n" not in value


# ---- signed playback links ----------------------------------------------------------------------


def expires_of(link: str) -> int:
    """When a playback link expires: a signed link says so, a presigned one says when it was
    signed and for how long."""
    query = {k: v[0] for k, v in parse_qs(urlsplit(link).query).items()}
    if "expires" in query:
        return int(query["expires"])
    signed = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    return int(signed.timestamp()) + int(query["X-Amz-Expires"])


def signed_link(stack: Stack, recording_id: str, expires: int) -> str:
    signature = stack.sign(recording_id, expires)
    return f"/v1/playback/{recording_id}?ws=default&expires={expires}&signature={signature}"


async def test_playback_link_plays_with_ranges(
    client: httpx.AsyncClient, stack: Stack, recording: dict[str, Any]
) -> None:
    before = time.time()
    response = await client.get(f"/v1/recordings/{recording['id']}/playback")
    assert response.status_code == 200
    link = response.json()
    assert set(link) == {"url", "expires_at"}
    url = urlsplit(link["url"])
    if stack.presigns_playback:
        # Straight to the object store: the original (no rendition without the pipeline).
        assert url.netloc != urlsplit(stack.base_url).netloc
        assert url.path.endswith(f"/recordings/{recording['id']}/original")
    else:
        assert (url.scheme, url.netloc, url.path) == (
            "http",
            "testserver",
            f"/v1/playback/{recording['id']}",
        )
    expires = expires_of(link["url"])
    assert before + 3600 - 2 <= expires <= time.time() + 3600 + 2
    assert datetime.fromisoformat(link["expires_at"]).timestamp() == pytest.approx(expires, abs=2)
    full = await client.get(link["url"])
    assert full.status_code == 200
    assert full.content == AUDIO
    if not stack.presigns_playback:
        assert full.headers["cache-control"].startswith("private, max-age=")
    part = await client.get(link["url"], headers={"Range": "bytes=-44"})
    assert part.status_code == 206
    assert part.content == AUDIO[-44:]


async def test_playback_ttl_is_configurable_and_capped(
    client: httpx.AsyncClient, recording: dict[str, Any]
) -> None:
    url = f"/v1/recordings/{recording['id']}/playback"
    link = (await client.get(url, params={"ttl": 60})).json()
    assert expires_of(link["url"]) <= time.time() + 61
    too_long = await client.get(url, params={"ttl": 7 * 24 * 3600 + 1})
    assert too_long.status_code == 422
    assert (await client.get(url, params={"ttl": 7 * 24 * 3600})).status_code == 200


def _tamper(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return f"{parts.path}?{urlencode(query)}"


async def test_signed_links_play_from_every_api_process(
    client: httpx.AsyncClient, stack: Stack, recording: dict[str, Any]
) -> None:
    link = signed_link(stack, recording["id"], int(time.time()) + 600)
    for _ in range(4):  # on the scale-out stack, each of the two processes twice
        response = await client.get(link, headers={"Range": "bytes=0-43"})
        assert (response.status_code, response.content) == (206, AUDIO[:44])


async def test_tampered_or_expired_links_are_403(
    client: httpx.AsyncClient, stack: Stack, recording: dict[str, Any]
) -> None:
    other = (
        await client.post("/v1/recordings", params={"transcribe": "false"}, content=wav_bytes(0.2))
    ).json()
    link = signed_link(stack, recording["id"], int(time.time()) + 3600)
    query = {k: v[0] for k, v in parse_qs(urlsplit(link).query).items()}
    signature = query["signature"]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]
    later = str(int(query["expires"]) + 3600)
    bad_links = [
        _tamper(link, signature=flipped),
        _tamper(link, expires=later),
        _tamper(link, ws="another"),
        f"/v1/playback/{other['id']}?{urlencode(query)}",
        f"/v1/playback/{recording['id']}",
        f"/v1/playback/{recording['id']}?ws=default&expires=soon&signature={signature}",
    ]
    past = int(time.time()) - 1
    expired_signature = stack.sign(recording["id"], past)
    expired = (
        f"/v1/playback/{recording['id']}?ws=default&expires={past}&signature={expired_signature}"
    )
    for bad in [*bad_links, expired]:
        response = await client.get(bad)
        assert response.status_code == 403, bad
        assert response.json()["error"]["code"] == "signature_invalid"
    assert "expired" in (await client.get(expired)).json()["error"]["message"]


async def test_link_of_a_deleted_recording_stops_working(
    client: httpx.AsyncClient, stack: Stack, recording: dict[str, Any]
) -> None:
    link = (await client.get(f"/v1/recordings/{recording['id']}/playback")).json()["url"]
    signed = signed_link(stack, recording["id"], int(time.time()) + 600)
    assert (await client.delete(f"/v1/recordings/{recording['id']}")).status_code == 204
    assert (await client.get(link)).status_code == 404
    assert (await client.get(signed)).status_code == 404
