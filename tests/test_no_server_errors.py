"""No request a client can make produces a 500.

Hypothesis throws random methods, paths built from the real route templates with random
segments, query strings, headers and bodies at a store holding a real recording with a
transcript and an artifact. Every answer must be below 500, and every 4xx must carry the one
error body shape.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import stored_files
from tests.media import riff_declaring, wav_bytes
from tests.stacks import EmbeddedStack
from tests.test_bad_input import make_existing, store_state
from voxvault import Vault
from voxvault.api import create_app
from voxvault.api.routers import (
    artifacts,
    jobs,
    playback,
    recordings,
    search,
    system,
    transcripts,
    tus,
)

pytestmark = pytest.mark.anyio

REAL_ID = "{real-id}"  # stands for the live recording's id; filled in when the request is sent
REAL_JOB = "{real-job}"  # likewise for a job of that recording
ARTIFACT = "notes.txt"
BOUNDARY = "fuzz-boundary"
TRANSCRIPT = {
    "language": "en",
    "segments": [
        {"start": 0.0, "end": 0.2, "text": "hi", "speaker": "A"},
        {
            "start": 0.2,
            "end": 0.4,
            "text": "there",
            "words": [{"start": 0.2, "end": 0.4, "word": "there"}],
        },
    ],
}

# The route templates, as the app itself declares them (checked against the app below).
TEMPLATES = [
    "/healthz",
    "/readyz",
    "/v1/storage-info",
    "/v1/recordings",
    "/v1/recordings/{recording_id}",
    "/v1/recordings/{recording_id}/audio",
    "/v1/recordings/{recording_id}/playback",
    "/v1/recordings/{recording_id}/transcript",
    "/v1/recordings/{recording_id}/transcript/versions",
    "/v1/recordings/{recording_id}/transcript.{fmt}",
    "/v1/recordings/{recording_id}/artifacts",
    "/v1/recordings/{recording_id}/artifacts/{name:path}",
    "/v1/playback/{recording_id}",
    "/v1/recordings/{recording_id}/transcribe",
    "/v1/recordings/{recording_id}/jobs",
    "/v1/recordings/{recording_id}/events",
    "/v1/jobs/{job_id}",
    "/v1/jobs/{job_id}/cancel",
    "/v1/search",
    "/files/v1/uploads",
    "/files/v1/uploads/{upload_id}",
]


ROUTE_METHODS = [
    ("/healthz", "GET"),
    ("/readyz", "GET"),
    ("/v1/storage-info", "GET"),
    ("/v1/recordings", "GET"),
    ("/v1/recordings", "POST"),
    ("/v1/recordings/{recording_id}", "GET"),
    ("/v1/recordings/{recording_id}", "PATCH"),
    ("/v1/recordings/{recording_id}", "DELETE"),
    ("/v1/recordings/{recording_id}/audio", "GET"),
    ("/v1/recordings/{recording_id}/audio", "HEAD"),
    ("/v1/recordings/{recording_id}/playback", "GET"),
    ("/v1/recordings/{recording_id}/transcript", "GET"),
    ("/v1/recordings/{recording_id}/transcript", "PUT"),
    ("/v1/recordings/{recording_id}/transcript/versions", "GET"),
    ("/v1/recordings/{recording_id}/transcript.{fmt}", "GET"),
    ("/v1/recordings/{recording_id}/artifacts", "GET"),
    ("/v1/recordings/{recording_id}/artifacts/{name:path}", "GET"),
    ("/v1/recordings/{recording_id}/artifacts/{name:path}", "HEAD"),
    ("/v1/recordings/{recording_id}/artifacts/{name:path}", "PUT"),
    ("/v1/recordings/{recording_id}/artifacts/{name:path}", "DELETE"),
    ("/v1/playback/{recording_id}", "GET"),
    ("/v1/playback/{recording_id}", "HEAD"),
    ("/v1/recordings/{recording_id}/transcribe", "POST"),
    ("/v1/recordings/{recording_id}/jobs", "GET"),
    ("/v1/recordings/{recording_id}/events", "GET"),
    ("/v1/jobs/{job_id}", "GET"),
    ("/v1/jobs/{job_id}/cancel", "POST"),
    ("/v1/search", "GET"),
    ("/files/v1/uploads", "OPTIONS"),
    ("/files/v1/uploads", "POST"),
    ("/files/v1/uploads/{upload_id}", "HEAD"),
    ("/files/v1/uploads/{upload_id}", "PATCH"),
    ("/files/v1/uploads/{upload_id}", "DELETE"),
    ("/files/v1/uploads/{upload_id}", "OPTIONS"),
]


def test_the_templates_are_the_apps_routes() -> None:
    """The fuzzer aims at every route the app has, and only at those."""
    declared = {
        (route.path, method)
        for module in (system, recordings, jobs, transcripts, artifacts, playback, search, tus)
        for route in module.router.routes
        for method in route.methods
    }
    assert declared == set(ROUTE_METHODS)
    assert {path for path, _ in ROUTE_METHODS} == set(TEMPLATES)


# ---- strategies ---------------------------------------------------------------------------------

PRINTABLE = st.characters(exclude_categories=["Cs"])  # anything a URL can carry once encoded
SPECIAL_SEGMENTS = [
    "",
    ".",
    "..",
    "%2e%2e",
    "%2F",
    "a%2Fb",
    "..%2F..%2Fetc%2Fpasswd",
    "%00",
    "%ff%fe",
    "%",
    "%zz",
    "%E2%80%AE",
    "\u202e",
    "\u200f",
    "é",
    "🎙",
    " ",
    ";",
    "x" * 5000,
    "0" * 32,
    "A" * 32,
    ARTIFACT,
    ".hidden",
    "srt",
    "vtt",
    "json",
    "txt",
    "md",
    "pdf",
]


LIKELY_SEGMENTS = {
    "{recording_id}": st.just(REAL_ID),
    "{fmt}": st.sampled_from(["json", "srt", "vtt", "txt", "md"]),
    "{name:path}": st.just(ARTIFACT),
    "{job_id}": st.just(REAL_JOB),
    "{upload_id}": st.sampled_from(["0" * 32, "f" * 32]),
}


@st.composite
def segments(draw: st.DrawFn, placeholder: str) -> str:
    """Mostly the value that reaches the real thing, otherwise something odd."""
    if draw(st.booleans()):
        return draw(LIKELY_SEGMENTS[placeholder])
    raw = draw(
        st.one_of(
            st.just(REAL_ID),
            st.sampled_from(SPECIAL_SEGMENTS),
            st.text(PRINTABLE, max_size=40),
            st.text("0123456789abcdef", min_size=31, max_size=33),
        )
    )
    if raw in (REAL_ID, REAL_JOB):
        return raw
    # Percent-encode like a client would, but sometimes leave '%' or '/' alone so that
    # hand-written escapes and extra path levels get through too.
    return quote(raw, safe=draw(st.sampled_from(["", "%", "/", "%/", "%/.;"])))


QUERY_KEYS = [
    "filename",
    "title",
    "tag",
    "metadata",
    "limit",
    "cursor",
    "status",
    "created_after",
    "created_before",
    "version",
    "download",
    "ttl",
    "ws",
    "expires",
    "signature",
    "transcribe",
    "q",
    "speaker",
    "language",
    "recording_id",
    "group",
    "per_group",
]
QUERY_VALUES = [
    "",
    "0",
    "-1",
    "1",
    "500",
    "501",
    "9" * 40,
    "1e309",
    "NaN",
    "true",
    "yes",
    "stored",
    "deleting",
    "2024-01-01T00:00:00Z",
    "2024-13-45",
    "{}",
    '{"a": 1}',
    "[1]",
    "{",
    "../../etc/x",
    "a\x00b",
    "\u202e.wav",
    "x" * 3000,
    "default",
    "9" * 5000,  # more digits than Python will turn into an int
    str(2**63),  # one past SQLite's INTEGER
    "0001-01-01T00:00:00+14:00",  # in UTC, before the year 1
    "9999-12-31T23:59:59-14:00",  # in UTC, after the year 9999
    "recording",
    "en-US",
    'there OR "hello there" -x pre* NEAR( ^ :',  # search's language and engines' operators
    base64.urlsafe_b64encode(json.dumps(["0001-01-01T00:00:00+14:00", "0" * 32]).encode()).decode(),
    base64.urlsafe_b64encode(b"[" * 3000).decode(),
]


@st.composite
def query_strings(draw: st.DrawFn) -> str:
    pairs = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(QUERY_KEYS), st.text(PRINTABLE, max_size=10)),
                st.one_of(st.sampled_from(QUERY_VALUES), st.text(PRINTABLE, max_size=30)),
            ),
            max_size=4,
        )
    )
    safe = draw(st.sampled_from(["", "%", "%/&="]))
    return "&".join(f"{quote(k, safe=safe)}={quote(v, safe=safe)}" for k, v in pairs)


# Header values as bytes: visible ASCII and Latin-1, as a server would pass them on.
HEADER_BYTES = st.binary(max_size=60).map(
    lambda b: bytes(c for c in b if 0x20 <= c < 0x7F or c >= 0xA0)
)
RANGES = st.one_of(
    st.sampled_from(
        [
            b"bytes=0-0",
            b"bytes=0-",
            b"bytes=-1",
            b"bytes=-0",
            b"bytes=5-2",
            b"bytes=0-1,2-3",
            b"bytes=99999999999999999999999999-",
            b"bytes=-99999999999999999999999999",
            b"bytes=0-99999999999999999999999999",
            b"bytes= 1 - 2 ",
            b"BYTES=1-2",
            b"bytes=\xb2-3",
            b"items=0-1",
            b"bytes=",
            b"bytes=-",
            b"bytes=1000000-",
            b"bytes=" + b"9" * 5000 + b"-",
            b"bytes=0-" + b"9" * 5000,
            b"bytes=-" + b"9" * 5000,
        ]
    ),
    st.from_regex(rb"bytes=[0-9]{0,25}-[0-9]{0,25}", fullmatch=True),
    HEADER_BYTES,
)
CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            b"audio/wav",
            b"audio/mpeg",
            b"video/mp4",
            b"application/json",
            b"application/json; charset=utf-8",
            b"application/merge-patch+json",
            b"multipart/form-data",
            f"multipart/form-data; boundary={BOUNDARY}".encode(),
            b"multipart/form-data; boundary=",
            b'multipart/form-data; boundary=""',
            f"multipart/mixed; boundary={BOUNDARY}".encode(),
            b"text/plain",
            b"application/octet-stream",
            b"application/offset+octet-stream",
            b"",
            b"*/*",
            b"audio/",
            b"a" * 300,
        ]
    ),
    HEADER_BYTES,
)
TUS_NUMBERS = st.one_of(
    st.sampled_from([b"0", b"1", b"100", b"-1", b"1.5", b"9" * 30, b""]), HEADER_BYTES
)
TUS_HEADERS = {
    "tus-resumable": st.one_of(st.sampled_from([b"1.0.0", b"0.2.2", b""]), HEADER_BYTES),
    "upload-length": TUS_NUMBERS,
    "upload-offset": TUS_NUMBERS,
    "upload-metadata": st.one_of(
        st.sampled_from([b"filename YS53YXY=,transcribe ZmFsc2U=", b"a", b"a !", b"a,a", b","]),
        HEADER_BYTES,
    ),
    "upload-checksum": st.one_of(
        st.sampled_from([b"sha1 2jmj7l5rSw0yVb/vlWAYkK/YBwk=", b"md5 x", b"crc32 AA=="]),
        HEADER_BYTES,
    ),
    "x-http-method-override": st.sampled_from([b"PATCH", b"DELETE", b"HEAD", b"bogus"]),
}
ETAGS = st.one_of(st.sampled_from([b"*", b'"x"', b"", b'W/"x"', b'"', b"{etag}"]), HEADER_BYTES)


def _multipart(fields: dict[str, str], filename: str, data: bytes, *, closed: bool) -> bytes:
    body = b"".join(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    )
    body += (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + data
    return body + (f"\r\n--{BOUNDARY}--\r\n".encode() if closed else b"")


def deep_object(depth: int) -> str:
    """A small JSON object that nests ``depth`` arrays deep."""
    return '{"a": ' + "[" * depth + "]" * depth + "}"


def deep_metadata(depth: int) -> str:
    return '{"metadata": ' + deep_object(depth) + "}"


WAV = wav_bytes(seconds=0.1)
SPECIAL_BODIES = [
    b"",
    WAV,
    WAV[:20],
    WAV[:44],
    riff_declaring(0xFFFFFFFF),
    riff_declaring(0xFFFFFFFF, WAV[44:]),
    b"NaN",
    b"{",
    b"null",
    b"[]",
    b'{"title": "\xff"}',
    json.dumps(TRANSCRIPT).encode(),
    b'{"segments": [{"start": NaN, "end": Infinity, "text": "x"}]}',
    b'{"segments": [{"start": 1e400, "end": -1e400, "text": "x"}]}',
    b'{"title": "t", "tags": ["a", "a"], "metadata": {"k": [1, 2]}}',
    b'{"metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    deep_metadata(300).encode(),
    _multipart({"title": "t", "tags": "a,b", "metadata": '{"k": 1}'}, "x.wav", WAV, closed=True),
    _multipart({"metadata": "[1]"}, "x.wav", WAV, closed=True),
    _multipart({}, "../x.wav", WAV, closed=True),
    _multipart({}, "x.wav", WAV, closed=False),
    _multipart({}, "x.wav", b"", closed=True),
    f"--{BOUNDARY}--\r\n".encode(),
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(PRINTABLE, max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "title",
                    "tags",
                    "metadata",
                    "segments",
                    "start",
                    "end",
                    "text",
                    "words",
                    "language",
                    "model",
                    "x",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)
BODIES = st.one_of(
    st.sampled_from(SPECIAL_BODIES),
    st.binary(max_size=512),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.text(PRINTABLE, max_size=200).map(str.encode),
)


@dataclass(frozen=True)
class FuzzRequest:
    method: str
    path: str
    query: str
    headers: dict[str, bytes] = field(default_factory=dict)
    body: bytes = b""
    signed: bool = False


METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@st.composite
def fuzz_requests(draw: st.DrawFn) -> FuzzRequest:
    if draw(st.integers(0, 9)) < 8:  # mostly a method the route has, so handlers get to run
        template, method = draw(st.sampled_from(ROUTE_METHODS))
    else:
        template, method = draw(st.sampled_from(TEMPLATES)), draw(st.sampled_from(METHODS))
    path = template
    for placeholder in LIKELY_SEGMENTS:
        if placeholder in path:
            path = path.replace(placeholder, draw(segments(placeholder)))
    headers: dict[str, bytes] = {}
    for name, values in (
        ("range", RANGES),
        ("content-type", CONTENT_TYPES),
        ("if-none-match", ETAGS),
        ("if-range", ETAGS),
        *TUS_HEADERS.items(),
    ):
        if draw(st.booleans()):
            headers[name] = draw(values)
    return FuzzRequest(
        method=method,
        path=path,
        query=draw(query_strings()),
        headers=headers,
        body=draw(BODIES),
        signed=template.startswith("/v1/playback") and draw(st.booleans()),
    )


# ---- the store under fire -----------------------------------------------------------------------


@dataclass
class LiveStore:
    client: httpx.AsyncClient
    recording_id: str = ""
    job_id: str = ""
    etag: str = ""

    async def ensure_populated(self) -> None:
        """Put back the recording, transcript and artifact if an earlier request removed them."""
        if (
            not self.recording_id
            or (await self.client.get(f"/v1/recordings/{self.recording_id}")).status_code == 404
        ):
            created = await self.client.post(
                "/v1/recordings?filename=real.wav",
                content=WAV,
                headers={"Content-Type": "audio/wav"},
            )
            assert created.status_code == 201, created.text
            self.recording_id = created.json()["id"]
            self.etag = f'"{created.json()["sha256"]}"'
            self.job_id = ""
        # No worker runs here: cancel whatever a request queued, so that the recording stays
        # settled and its event stream ends at once instead of waiting for progress.
        listed = await self.client.get(f"/v1/recordings/{self.recording_id}/jobs")
        for job in listed.json()["items"]:
            self.job_id = self.job_id or job["id"]
            if job["status"] in ("queued", "running"):
                cancel = await self.client.post(f"/v1/jobs/{job['id']}/cancel")
                assert cancel.status_code == 200, cancel.text
        transcript = f"/v1/recordings/{self.recording_id}/transcript"
        if (await self.client.get(transcript)).status_code == 404:
            assert (await self.client.put(transcript, json=TRANSCRIPT)).status_code == 201
        artifact = f"/v1/recordings/{self.recording_id}/artifacts/{ARTIFACT}"
        if (await self.client.get(artifact)).status_code == 404:
            put = await self.client.put(
                artifact, content=b"notes", headers={"Content-Type": "text/plain"}
            )
            assert put.status_code == 200, put.text


@pytest.fixture
async def store(vault: Vault) -> AsyncIterator[LiveStore]:
    # Exceptions that escape the app are re-raised by the transport, so they fail the test too.
    transport = httpx.ASGITransport(app=create_app(vault))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
        live = LiveStore(http)
        await live.ensure_populated()
        yield live


def _describe(request: FuzzRequest, url: str, response: httpx.Response) -> str:
    return (
        f"{request.method} {url}\nheaders={request.headers!r}\nbody={request.body[:300]!r}\n"
        f"-> {response.status_code} {response.text[:500]}"
    )


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=fuzz_requests())
async def test_no_request_produces_a_server_error(store: LiveStore, request: FuzzRequest) -> None:
    await store.ensure_populated()
    path = request.path.replace(REAL_ID, store.recording_id).replace(REAL_JOB, store.job_id)
    query = request.query
    if request.signed:
        link = await store.client.get(f"/v1/recordings/{store.recording_id}/playback")
        assert link.status_code == 200, link.text
        signed_query = httpx.URL(link.json()["url"]).query.decode()
        query = f"{signed_query}&{query}" if query else signed_query
    headers = {
        name.encode(): value.replace(b"{etag}", store.etag.encode())
        for name, value in request.headers.items()
    }
    url = f"{path}?{query}" if query else path

    response = await store.client.request(
        request.method, url, headers=headers, content=request.body
    )

    assert response.status_code < 500, _describe(request, url, response)
    if 400 <= response.status_code < 500 and request.method != "HEAD":
        assert response.headers["content-type"] == "application/json", _describe(
            request, url, response
        )
        body: Any = response.json()
        assert set(body) == {"error"}, _describe(request, url, response)
        assert set(body["error"]) == {"code", "message", "detail"}, _describe(
            request, url, response
        )
        assert isinstance(body["error"]["code"], str)
        assert body["error"]["code"], _describe(request, url, response)
        assert isinstance(body["error"]["message"], str)
        assert body["error"]["message"].strip(), _describe(request, url, response)


async def test_odd_uploads_leave_only_what_was_accepted(store: LiveStore, data_dir: Path) -> None:
    """Every odd body, raw and as a form: refusals leave nothing, staging ends up empty."""
    accepted = 0
    for body in SPECIAL_BODIES:
        for content_type in (b"audio/wav", f"multipart/form-data; boundary={BOUNDARY}".encode()):
            response = await store.client.post(
                "/v1/recordings?filename=x.wav",
                content=body,
                headers={b"content-type": content_type},
            )
            assert response.status_code in (201, 400, 413, 415, 422), response.text
            accepted += response.status_code == 201
    assert accepted > 0  # the real WAV bodies got in, so refusals are about the bytes
    listing = await store.client.get("/v1/recordings", params={"limit": 500})
    assert len(listing.json()["items"]) == 1 + accepted
    files = stored_files(data_dir)
    assert not any(path.parent.name == ".staging" for path in files)
    assert len([p for p in files if p.name == "original"]) == 1 + accepted


# ---- requests the fuzzer once found, or could: each must be a 4xx or a success -------------------

BIG = "9" * 5000
DEEP = deep_object(300)  # pydantic cannot serialize past about 255 levels
EDGE_CASES: dict[str, tuple[str, str, dict[str, str], bytes, set[int]]] = {
    # name: (method, url with {id}, headers, body, acceptable statuses)
    "range-start-of-5000-digits": (
        "GET",
        "/v1/recordings/{id}/audio",
        {"Range": f"bytes={BIG}-"},
        b"",
        {200, 416},
    ),
    "range-end-of-5000-digits": (
        "GET",
        "/v1/recordings/{id}/audio",
        {"Range": f"bytes=0-{BIG}"},
        b"",
        {200, 206},
    ),
    "range-suffix-of-5000-digits": (
        "GET",
        "/v1/recordings/{id}/audio",
        {"Range": f"bytes=-{BIG}"},
        b"",
        {200, 206},
    ),
    "artifact-range-of-5000-digits": (
        "GET",
        "/v1/recordings/{id}/artifacts/notes.txt",
        {"Range": f"bytes=-{BIG}"},
        b"",
        {200, 206},
    ),
    "playback-expires-of-5000-digits": (
        "GET",
        f"/v1/playback/{{id}}?ws=default&expires={BIG}&signature=x",
        {},
        b"",
        {403},
    ),
    "playback-signature-not-ascii": (
        "GET",
        f"/v1/playback/{{id}}?ws=default&expires={2**40}&signature=%C2%80",
        {},
        b"",
        {403},
    ),
    "transcript-version-past-int64": (
        "GET",
        f"/v1/recordings/{{id}}/transcript?version={2**63}",
        {},
        b"",
        {404, 422},
    ),
    "export-version-past-int64": (
        "GET",
        f"/v1/recordings/{{id}}/transcript.srt?version={2**63}",
        {},
        b"",
        {404, 422},
    ),
    "created-after-before-year-1-in-utc": (
        "GET",
        "/v1/recordings?created_after=0001-01-01T00:00:00%2B14:00",
        {},
        b"",
        {200, 400, 422},
    ),
    "created-before-after-year-9999-in-utc": (
        "GET",
        "/v1/recordings?created_before=9999-12-31T23:59:59-14:00",
        {},
        b"",
        {200, 400, 422},
    ),
    "cursor-with-a-date-before-year-1-in-utc": (
        "GET",
        "/v1/recordings?cursor="
        + base64.urlsafe_b64encode(
            json.dumps(["0001-01-01T00:00:00+14:00", "0" * 32]).encode()
        ).decode(),
        {},
        b"",
        {400},
    ),
    "cursor-of-deeply-nested-json": (
        "GET",
        "/v1/recordings?cursor=" + base64.urlsafe_b64encode(b"[" * 3000).decode(),
        {},
        b"",
        {400},
    ),
    "patch-metadata-nested-300-deep": (
        "PATCH",
        "/v1/recordings/{id}",
        {"Content-Type": "application/json"},
        deep_metadata(300).encode(),
        {422},
    ),
    "upload-query-metadata-nested-300-deep": (
        "POST",
        "/v1/recordings?filename=x.wav&metadata=" + quote(DEEP),
        {"Content-Type": "audio/wav"},
        WAV,
        {422},
    ),
    "upload-form-metadata-nested-300-deep": (
        "POST",
        "/v1/recordings",
        {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        _multipart({"metadata": DEEP}, "x.wav", WAV, closed=True),
        {422},
    ),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
async def test_edge_request_is_not_a_server_error(
    client: httpx.AsyncClient, vault: Vault, data_dir: Path, case: str
) -> None:
    stack = EmbeddedStack(data_dir, vault)
    existing = await make_existing(client, stack)
    method, url, headers, body, acceptable = EDGE_CASES[case]
    response = await client.request(
        method, url.replace("{id}", existing.id), headers=headers, content=body
    )

    assert response.status_code in acceptable, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"code", "message", "detail"}
        assert error["message"].strip()
    # Nothing was stored, and the store still answers.
    assert await store_state(client, stack) == existing.state
    assert (await client.get(f"/v1/recordings/{existing.id}")).status_code == 200
