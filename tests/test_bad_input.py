"""Bad input gets a clear 4xx and leaves nothing behind.

Every case checks four things: the exact status, the error body's shape and code, that no
recording is listed that was not there before, and that the blob store holds exactly the blobs it
held before (staging and unfinished uploads included).

The cases run on the embedded stack and on the scale-out one (``tests/stacks.py``); those of a
store with a small upload limit run on the embedded stack only (it is one more configuration,
and the limit is enforced per API process alike on both).
"""

from __future__ import annotations

import json
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, stored_files
from tests.media import riff_declaring, sine_samples, wav_bytes
from tests.stacks import EmbeddedStack, Stack, client, stack
from voxvault import Settings, Vault
from voxvault.api.limits import MAX_JSON_BODY_BYTES
from voxvault.api.routers.recordings import MULTIPART_OVERHEAD_BYTES
from voxvault.models import MAX_SEGMENT_TEXT

pytestmark = pytest.mark.anyio
__all__ = ["client", "stack"]  # the fixtures that run each test on both stacks

BOUNDARY = "voxvault-test-boundary-7f3a"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
WAV = {"Content-Type": "audio/wav"}
JSON = {"Content-Type": "application/json"}
GOOD_TRANSCRIPT = {
    "language": "en",
    "segments": [
        {
            "start": 0.0,
            "end": 0.4,
            "text": "hello",
            "words": [{"start": 0.0, "end": 0.4, "word": "hello"}],
        },
        {"start": 0.5, "end": 0.9, "text": "world"},
    ],
}


# ---- helpers ------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is ``status`` with the one error shape, the given code and a real message."""
    assert response.status_code == status, (
        response.request.method,
        response.request.url,
        response.text,
    )
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "detail"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str)
    assert error["message"].strip(), error
    return error


def multipart_head(filename: bytes | None, fields: dict[str, str] | None = None) -> bytes:
    """Text fields, then the headers of the ``file`` part (the bytes of the file come next)."""
    head = b""
    for name, value in (fields or {}).items():
        head += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
    disposition = b'form-data; name="file"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    head += f"--{BOUNDARY}\r\n".encode()
    head += b"Content-Disposition: " + disposition + b"\r\nContent-Type: audio/wav\r\n\r\n"
    return head


MULTIPART_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


def multipart_body(
    filename: bytes | None, data: bytes, fields: dict[str, str] | None = None
) -> bytes:
    return multipart_head(filename, fields) + data + MULTIPART_TAIL


@dataclass(frozen=True)
class StoreState:
    """What a client and the backends can see of the store."""

    recordings: list[dict[str, Any]]
    files: dict[str, str]  # blob key -> a fingerprint of its bytes
    usage: dict[str, Any]


async def store_state(client: httpx.AsyncClient, stack: Stack) -> StoreState:
    listing = await client.get("/v1/recordings", params={"limit": 500})
    assert listing.status_code == 200, listing.text
    info = await client.get("/v1/storage-info")
    assert info.status_code == 200, info.text
    return StoreState(listing.json()["items"], stack.stored_blobs(), info.json()["usage"])


async def assert_store_unchanged(
    client: httpx.AsyncClient, stack: Stack, before: StoreState
) -> None:
    assert await store_state(client, stack) == before


async def assert_store_empty(client: httpx.AsyncClient, stack: Stack) -> None:
    state = await store_state(client, stack)
    assert state.recordings == []
    assert state.files == {}
    assert state.usage == {
        "recordings": 0,
        "recording_bytes": 0,
        "transcripts": 0,
        "artifacts": 0,
        "artifact_bytes": 0,
    }


@dataclass(frozen=True)
class Existing:
    """A recording with one transcript version and one artifact, and the store's state then."""

    id: str
    audio: bytes
    state: StoreState


async def make_existing(client: httpx.AsyncClient, stack: Stack) -> Existing:
    audio = wav_bytes(seconds=1.0)
    created = await client.post(
        "/v1/recordings?filename=kept.wav&transcribe=false", content=audio, headers=WAV
    )
    assert created.status_code == 201, created.text
    recording_id: str = created.json()["id"]
    transcript = await client.put(f"/v1/recordings/{recording_id}/transcript", json=GOOD_TRANSCRIPT)
    assert transcript.status_code == 201, transcript.text
    artifact = await client.put(
        f"/v1/recordings/{recording_id}/artifacts/notes.txt",
        content=b"some notes",
        headers={"Content-Type": "text/plain"},
    )
    assert artifact.status_code == 200, artifact.text
    state = await store_state(client, stack)
    assert state.recordings[0]["id"] == recording_id
    # The original, five transcript files and the artifact.
    assert len([key for key in state.files if recording_id in key]) == 7
    return Existing(recording_id, audio, state)


@pytest.fixture
async def existing(client: httpx.AsyncClient, stack: Stack) -> Existing:
    return await make_existing(client, stack)


async def assert_unchanged(client: httpx.AsyncClient, stack: Stack, before: Existing) -> None:
    after = await store_state(client, stack)
    assert after == before.state
    versions = await client.get(f"/v1/recordings/{before.id}/transcript/versions")
    assert [v["version"] for v in versions.json()["items"]] == [1]
    audio = await client.get(f"/v1/recordings/{before.id}/audio")
    assert audio.content == before.audio


class CountingBody:
    """A lazy request body that counts what the server actually pulled from it."""

    def __init__(self, parts: Sequence[bytes], chunk: int = 16 * 1024) -> None:
        self.chunks = [part[i : i + chunk] for part in parts for i in range(0, len(part), chunk)]
        self.total = sum(len(part) for part in parts)
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.chunks:
            self.sent += len(piece)
            yield piece


def assert_raw_error(status: int, body: bytes, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    error = json.loads(body)["error"]
    assert error["code"] == code, error
    assert error["message"].strip()


# ---- uploads that are not audio -----------------------------------------------------------------

NOT_AUDIO: dict[str, tuple[bytes, int, str]] = {
    "zero-bytes": (b"", 400, "empty_upload"),
    "random-bytes": (random.Random(20240611).randbytes(64 * 1024), 415, "unsupported_media"),
    "text": (b"This is not a recording, just some text.\n" * 50, 415, "unsupported_media"),
    "json": (json.dumps(GOOD_TRANSCRIPT).encode(), 415, "unsupported_media"),
    "truncated-wav-header": (wav_bytes(seconds=1.0)[:20], 415, "unsupported_media"),
    "wav-header-without-samples": (wav_bytes(seconds=0.0), 415, "unsupported_media"),
    "riff-declaring-4gib-no-samples": (riff_declaring(0xFFFFFFFF), 415, "unsupported_media"),
}


@pytest.mark.parametrize("via", ["raw", "multipart"])
@pytest.mark.parametrize("case", list(NOT_AUDIO))
async def test_upload_that_is_not_audio_is_refused(
    client: httpx.AsyncClient, stack: Stack, case: str, via: str
) -> None:
    data, status, code = NOT_AUDIO[case]
    before = await store_state(client, stack)
    if via == "raw":
        response = await client.post("/v1/recordings?filename=x.wav", content=data, headers=WAV)
    else:
        body = multipart_body(b"x.wav", data, {"title": "not audio"})
        response = await client.post(
            "/v1/recordings", content=body, headers={"Content-Type": MULTIPART}
        )
    assert_error(response, status, code)
    await assert_store_unchanged(client, stack, before)


async def test_riff_header_declaring_4gib_stores_the_duration_of_the_real_bytes(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    body = riff_declaring(0xFFFFFFFF, sine_samples(0.1, 16000))
    assert struct.unpack("<I", body[4:8]) == (0xFFFFFFFF,)
    before = stack.stored_keys()
    response = await client.post(
        "/v1/recordings?filename=liar.wav&transcribe=false", content=body, headers=WAV
    )
    assert response.status_code == 201, response.text
    recording = response.json()
    assert recording["duration_s"] == pytest.approx(0.1, abs=0.01)  # not 37 hours
    assert recording["size_bytes"] == len(body)
    assert recording["sample_rate"] == 16000
    assert (await client.get(f"/v1/recordings/{recording['id']}")).json() == recording
    assert (await client.get(f"/v1/recordings/{recording['id']}/audio")).content == body
    assert set(stack.stored_keys()) - set(before) == {f"recordings/{recording['id']}/original"}
    audio = await client.get(f"/v1/recordings/{recording['id']}/audio")
    assert int(audio.headers["content-length"]) == len(body)


# ---- hostile filenames --------------------------------------------------------------------------

HOSTILE_FILENAMES = {
    "dot-dot-path": "../../etc/x",
    "slash": "a/b.wav",
    "absolute": "/etc/passwd",
    "backslash": "..\\x.wav",
    "dot-dot": "..",
    "nul": "a\x00b.wav",
    "only-nul": "\x00",
    "newline": "a\nb.wav",
    "300-bytes": "a" * 296 + ".wav",
    "300-bytes-of-2-byte-chars": "é" * 150,
    "rtl-override": "invoice\u202ewav.exe",
    "rtl-mark": "a\u200fb.wav",
    "blank": "   ",
}


@pytest.mark.parametrize("case", list(HOSTILE_FILENAMES))
async def test_hostile_filename_in_the_query_is_refused(
    client: httpx.AsyncClient, stack: Stack, case: str
) -> None:
    before = await store_state(client, stack)
    response = await client.post(
        "/v1/recordings",
        params={"filename": HOSTILE_FILENAMES[case]},
        content=wav_bytes(seconds=0.2),
        headers=WAV,
    )
    error = assert_error(response, 400, "bad_request")
    assert error["detail"] == {"field": "filename"}
    await assert_store_unchanged(client, stack, before)


@pytest.mark.parametrize(
    "query", ["filename=%00", "filename=a%00.wav", "filename=..%2F..%2Fetc%2Fx"]
)
async def test_percent_encoded_hostile_filename_is_refused(
    client: httpx.AsyncClient, stack: Stack, query: str
) -> None:
    before = await store_state(client, stack)
    response = await client.post(
        f"/v1/recordings?{query}", content=wav_bytes(seconds=0.2), headers=WAV
    )
    assert_error(response, 400, "bad_request")
    await assert_store_unchanged(client, stack, before)


# (A raw newline would end the part header itself, so that case is only sent in the query.)
@pytest.mark.parametrize("case", [c for c in HOSTILE_FILENAMES if c != "newline"])
async def test_hostile_filename_in_a_multipart_part_is_refused(
    client: httpx.AsyncClient, stack: Stack, case: str
) -> None:
    # Raw UTF-8 in the part header, as browsers send it (httpx would percent-escape some bytes).
    filename = HOSTILE_FILENAMES[case].encode()
    body = multipart_body(filename, wav_bytes(seconds=0.2))
    before = await store_state(client, stack)
    response = await client.post(
        "/v1/recordings", content=body, headers={"Content-Type": MULTIPART}
    )
    error = assert_error(response, 400, "bad_request")
    assert error["detail"] == {"field": "filename"}
    await assert_store_unchanged(client, stack, before)


@pytest.mark.parametrize("via", ["query", "multipart"])
async def test_the_same_upload_with_a_plain_name_is_accepted(
    client: httpx.AsyncClient, stack: Stack, via: str
) -> None:
    """The control for the cases above: only the name made them fail."""
    audio = wav_bytes(seconds=0.2)
    before = stack.stored_keys()
    if via == "query":
        response = await client.post(
            "/v1/recordings",
            params={"filename": "é ok.wav", "transcribe": "false"},
            content=audio,
            headers=WAV,
        )
    else:
        body = multipart_body("é ok.wav".encode(), audio, {"transcribe": "false"})
        response = await client.post(
            "/v1/recordings", content=body, headers={"Content-Type": MULTIPART}
        )
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "é ok.wav"
    new = set(stack.stored_keys()) - set(before)
    assert new == {f"recordings/{response.json()['id']}/original"}


# ---- malformed JSON -----------------------------------------------------------------------------

MALFORMED_JSON = {
    "open-brace": b"{",
    "bare-words": b"{not json",
    "unterminated": b'{"title": "x"',
    "single-quotes": b"{'title': 'x'}",
    "trailing-comma": b'{"title": "x",}',
    "trailing-garbage": b'{"title": "x"} and more',
    "not-utf8": b"\xff\xfe",
    "invalid-utf8-in-a-string": b'{"title": "\xff"}',
}


@pytest.mark.parametrize("route", ["patch", "put-transcript"])
@pytest.mark.parametrize("case", list(MALFORMED_JSON))
async def test_malformed_json_is_refused(
    client: httpx.AsyncClient, stack: Stack, existing: Existing, case: str, route: str
) -> None:
    if route == "patch":
        request = client.patch(
            f"/v1/recordings/{existing.id}", content=MALFORMED_JSON[case], headers=JSON
        )
    else:
        request = client.put(
            f"/v1/recordings/{existing.id}/transcript", content=MALFORMED_JSON[case], headers=JSON
        )
    assert_error(await request, 400, "malformed_json")
    await assert_unchanged(client, stack, existing)


INVALID_PATCHES: dict[str, Any] = {
    "empty-title": {"title": ""},
    "long-title": {"title": "x" * 501},
    "unknown-field": {"status": "ready"},
    "tags-not-a-list": {"tags": "a,b"},
    "tag-with-newline": {"tags": ["a\nb"]},
    "metadata-not-an-object": {"metadata": [1, 2]},
    "not-an-object": [{"title": "x"}],
}


@pytest.mark.parametrize("case", list(INVALID_PATCHES))
async def test_invalid_patch_is_refused(
    client: httpx.AsyncClient, stack: Stack, existing: Existing, case: str
) -> None:
    response = await client.patch(f"/v1/recordings/{existing.id}", json=INVALID_PATCHES[case])
    error = assert_error(response, 422, "validation_failed")
    assert isinstance(error["detail"], list)
    assert error["detail"]
    await assert_unchanged(client, stack, existing)


# ---- unknown and malformed recording ids ---------------------------------------------------------

ROUTES: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("GET", "", b"", {}),
    ("PATCH", "", b'{"title": "renamed"}', JSON),
    ("DELETE", "", b"", {}),
    ("GET", "/audio", b"", {}),
    ("GET", "/playback", b"", {}),
    ("GET", "/transcript", b"", {}),
    ("PUT", "/transcript", json.dumps(GOOD_TRANSCRIPT).encode(), JSON),
    ("GET", "/transcript.srt", b"", {}),
    ("GET", "/transcript/versions", b"", {}),
    ("GET", "/artifacts", b"", {}),
    ("GET", "/artifacts/x", b"", {}),
    ("PUT", "/artifacts/x", b"artifact bytes", {"Content-Type": "text/plain"}),
    ("DELETE", "/artifacts/x", b"", {}),
]

BAD_IDS = {
    "unknown": "0" * 32,
    "unknown-uppercase": "ABCDEF0123456789ABCDEF0123456789",
    "dot-dot-etc": "../etc",
    "encoded-dot-dot-etc": "%2E%2E%2Fetc",
    "encoded-dot-dot": "%2e%2e",
    "1000-chars": "x" * 1000,
    "nul": "%00",
    "invalid-utf8": "%FF%FE",
    "rtl-override": "%E2%80%AE",
    "encoded-slash": "a%2Fb",
}


@pytest.mark.parametrize("bad_id", list(BAD_IDS))
@pytest.mark.parametrize(
    ("method", "suffix", "body", "headers"), ROUTES, ids=[f"{m} {s or '/'}" for m, s, *_ in ROUTES]
)
async def test_unknown_or_malformed_id_is_404_on_every_route(
    client: httpx.AsyncClient,
    stack: Stack,
    existing: Existing,
    bad_id: str,
    method: str,
    suffix: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    response = await client.request(
        method, f"/v1/recordings/{BAD_IDS[bad_id]}{suffix}", content=body, headers=headers
    )
    assert_error(response, 404, "not_found")
    await assert_unchanged(client, stack, existing)


@pytest.mark.parametrize("suffix", ["/audio", "/artifacts/x"])
async def test_unknown_id_is_404_on_head(
    client: httpx.AsyncClient, stack: Stack, existing: Existing, suffix: str
) -> None:
    response = await client.head(f"/v1/recordings/{'0' * 32}{suffix}")
    assert response.status_code == 404
    assert response.content == b""
    await assert_unchanged(client, stack, existing)


@pytest.mark.parametrize("raw_id", [b"..", b"../etc", b"."])
@pytest.mark.parametrize(
    ("method", "suffix", "body", "headers"), ROUTES, ids=[f"{m} {s or '/'}" for m, s, *_ in ROUTES]
)
async def test_literal_dot_segments_as_id_are_404(
    client: httpx.AsyncClient,
    stack: Stack,
    existing: Existing,
    raw_id: bytes,
    method: str,
    suffix: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    """HTTP clients collapse ``..`` before sending; a hand-written request does not."""
    raw_path = b"/v1/recordings/" + raw_id + suffix.encode()
    header_list = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    status, _, content = await stack.raw_request(method, raw_path, body, header_list)
    assert_raw_error(status, content, 404, "not_found")
    await assert_unchanged(client, stack, existing)


# ---- artifact names -----------------------------------------------------------------------------

BAD_ARTIFACT_NAMES = {
    "encoded-slash": "a%2Fb",
    "slash": "a/b",
    "encoded-dot-dot": "%2E%2E",
    "dot-dot-inside": "a..b",
    "encoded-traversal": "..%2F..%2Fetc%2Fpasswd",
    "hidden": ".hidden",
    "200-chars": "x" * 200,
    "129-chars": "x" * 129,
    "nul": "a%00b",
    "space": "a%20b",
    "non-ascii": "%C3%A9t%C3%A9.txt",
    "leading-dash": "-rf",
}


@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
@pytest.mark.parametrize("case", list(BAD_ARTIFACT_NAMES))
async def test_bad_artifact_name_is_refused(
    client: httpx.AsyncClient, stack: Stack, existing: Existing, case: str, method: str
) -> None:
    response = await client.request(
        method,
        f"/v1/recordings/{existing.id}/artifacts/{BAD_ARTIFACT_NAMES[case]}",
        content=b"payload" if method == "PUT" else b"",
    )
    error = assert_error(response, 400, "bad_request")
    assert error["detail"]["field"] == "name"
    await assert_unchanged(client, stack, existing)


@pytest.mark.parametrize("name", [b"..", b"../notes.txt", b"../../original", b"./notes.txt"])
@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
async def test_literal_dot_segments_in_artifact_names_never_reach_a_file(
    client: httpx.AsyncClient,
    stack: Stack,
    existing: Existing,
    name: bytes,
    method: str,
) -> None:
    raw_path = f"/v1/recordings/{existing.id}/artifacts/".encode() + name
    status, _, content = await stack.raw_request(
        method, raw_path, b"overwritten!" if method == "PUT" else b""
    )
    assert_raw_error(status, content, 400, "bad_request")
    await assert_unchanged(client, stack, existing)


# ---- transcripts --------------------------------------------------------------------------------


def _segment(start: Any = 0.0, end: Any = 1.0, **extra: Any) -> dict[str, Any]:
    return {"start": start, "end": end, "text": "x", **extra}


INVALID_TRANSCRIPTS: dict[str, bytes] = {
    name: (body if isinstance(body, bytes) else json.dumps(body).encode())
    for name, body in {
        "negative-start": {"segments": [_segment(start=-0.5)]},
        "negative-end": {"segments": [_segment(start=0.0, end=-1.0)]},
        "end-before-start": {"segments": [_segment(start=2.0, end=1.0)]},
        "word-end-before-start": {
            "segments": [_segment(words=[{"start": 0.6, "end": 0.2, "word": "x"}])]
        },
        "negative-word-start": {
            "segments": [_segment(words=[{"start": -1, "end": 0.2, "word": "x"}])]
        },
        "words-out-of-order": {
            "segments": [
                _segment(
                    words=[
                        {"start": 0.5, "end": 0.6, "word": "b"},
                        {"start": 0.1, "end": 0.2, "word": "a"},
                    ]
                )
            ]
        },
        "segments-out-of-order": {"segments": [_segment(5.0, 6.0), _segment(1.0, 2.0)]},
        "nan-start": b'{"segments": [{"start": NaN, "end": 1, "text": "x"}]}',
        "infinite-end": b'{"segments": [{"start": 0, "end": Infinity, "text": "x"}]}',
        "minus-infinity-start": b'{"segments": [{"start": -Infinity, "end": 1, "text": "x"}]}',
        "nan-word-end": (
            b'{"segments": [{"start": 0, "end": 1, "text": "x",'
            b' "words": [{"start": 0, "end": NaN, "word": "x"}]}]}'
        ),
        "nan-probability": (
            b'{"segments": [{"start": 0, "end": 1, "text": "x",'
            b' "words": [{"start": 0, "end": 1, "word": "x", "probability": NaN}]}]}'
        ),
        "huge-number": b'{"segments": [{"start": 1e400, "end": 1e400, "text": "x"}]}',
        "text-over-limit": {
            "segments": [{"start": 0, "end": 1, "text": "x" * (MAX_SEGMENT_TEXT + 1)}]
        },
        "probability-over-one": {
            "segments": [_segment(words=[{"start": 0, "end": 1, "word": "x", "probability": 1.5}])]
        },
        "time-as-text": {"segments": [_segment(start="soon")]},
        "no-segments": {"language": "en"},
        "segments-not-a-list": {"segments": {"start": 0}},
        "unknown-field": {"segments": [], "speaker_count": 2},
        "bad-language": {"language": "english!", "segments": []},
    }.items()
}


@pytest.mark.parametrize("case", list(INVALID_TRANSCRIPTS))
async def test_invalid_transcript_is_refused(
    client: httpx.AsyncClient, stack: Stack, existing: Existing, case: str
) -> None:
    response = await client.put(
        f"/v1/recordings/{existing.id}/transcript", content=INVALID_TRANSCRIPTS[case], headers=JSON
    )
    error = assert_error(response, 422, "validation_failed")
    assert isinstance(error["detail"], list)
    assert error["detail"]
    assert all(problem["loc"] and problem["msg"] for problem in error["detail"])
    await assert_unchanged(client, stack, existing)
    current = await client.get(f"/v1/recordings/{existing.id}/transcript")
    assert current.json()["version"] == 1
    assert [s["text"] for s in current.json()["segments"]] == ["hello", "world"]


# ---- size limits --------------------------------------------------------------------------------

LIMIT = 100_000


@pytest.fixture
async def small_stack(data_dir: Path) -> AsyncIterator[EmbeddedStack]:
    """An embedded store that takes uploads of at most ``LIMIT`` bytes."""
    async with await Vault.open(Settings(data_dir=data_dir, max_upload_bytes=LIMIT)) as opened:
        yield EmbeddedStack(data_dir, opened)


@pytest.fixture
async def small_client(small_stack: EmbeddedStack) -> AsyncIterator[httpx.AsyncClient]:
    """The API over the store that takes uploads of at most ``LIMIT`` bytes."""
    async with small_stack.client() as http:
        yield http


def exactly_limit_wav() -> bytes:
    audio = wav_bytes(seconds=(LIMIT - 44) / 32000)
    assert len(audio) == LIMIT
    return audio


def assert_too_large(response: httpx.Response) -> None:
    error = assert_error(response, 413, "too_large")
    assert error["detail"] == {"max_bytes": LIMIT}


async def test_declared_length_over_the_limit_is_refused_before_the_body_is_read(
    small_client: httpx.AsyncClient, small_stack: Stack
) -> None:
    body = CountingBody([wav_bytes(seconds=5.0)])
    response = await small_client.post(
        "/v1/recordings?filename=big.wav",
        content=body,
        headers={**WAV, "Content-Length": str(body.total)},
    )
    assert_too_large(response)
    assert body.sent == 0
    await assert_store_empty(small_client, small_stack)


async def test_streamed_upload_over_the_limit_is_refused_while_streaming(
    small_client: httpx.AsyncClient, small_stack: Stack
) -> None:
    body = CountingBody([wav_bytes(seconds=10.0)])
    response = await small_client.post("/v1/recordings?filename=big.wav", content=body, headers=WAV)
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_too_large(response)
    assert LIMIT < body.sent < body.total  # it stopped reading soon after the limit
    await assert_store_empty(small_client, small_stack)


async def test_upload_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not(
    small_client: httpx.AsyncClient, small_stack: Stack
) -> None:
    audio = exactly_limit_wav()
    over = await small_client.post(
        "/v1/recordings?filename=x.wav", content=CountingBody([audio, b"\0"]), headers=WAV
    )
    assert_too_large(over)
    await assert_store_empty(small_client, small_stack)
    at = await small_client.post(
        "/v1/recordings?filename=x.wav", content=CountingBody([audio]), headers=WAV
    )
    assert at.status_code == 201, at.text
    assert at.json()["size_bytes"] == LIMIT


async def test_multipart_over_the_limit_is_refused_while_streaming(
    small_client: httpx.AsyncClient, small_stack: Stack
) -> None:
    body = CountingBody(
        [multipart_head(b"big.wav", {"title": "big"}), wav_bytes(seconds=10.0), MULTIPART_TAIL]
    )
    response = await small_client.post(
        "/v1/recordings",
        content=body,
        headers={"Content-Type": MULTIPART, "Content-Length": str(body.total)},
    )
    assert_too_large(response)
    assert body.sent < body.total
    await assert_store_empty(small_client, small_stack)


async def test_multipart_declared_far_over_the_limit_is_refused_before_the_body_is_read(
    small_client: httpx.AsyncClient, small_stack: Stack
) -> None:
    file_bytes = LIMIT + MULTIPART_OVERHEAD_BYTES
    body = CountingBody(
        [multipart_head(b"big.wav"), b"\0" * file_bytes, MULTIPART_TAIL], chunk=1024 * 1024
    )
    response = await small_client.post(
        "/v1/recordings",
        content=body,
        headers={"Content-Type": MULTIPART, "Content-Length": str(body.total)},
    )
    assert_too_large(response)
    assert body.sent == 0
    await assert_store_empty(small_client, small_stack)


async def test_multipart_at_the_limit_is_accepted(
    small_client: httpx.AsyncClient, small_stack: Stack
) -> None:
    body = multipart_body(b"x.wav", exactly_limit_wav(), {"title": "fits"})
    response = await small_client.post(
        "/v1/recordings", content=body, headers={"Content-Type": MULTIPART}
    )
    assert response.status_code == 201, response.text
    assert response.json()["size_bytes"] == LIMIT
    assert len(small_stack.stored_keys()) == 1


@pytest.mark.parametrize("declared", [True, False], ids=["declared", "streamed"])
async def test_artifact_over_the_limit_is_refused_and_keeps_the_old_one(
    small_client: httpx.AsyncClient, small_stack: Stack, declared: bool
) -> None:
    existing = await make_existing(small_client, small_stack)
    body = CountingBody([b"\1" * (2 * LIMIT)])
    headers = {"Content-Type": "text/plain"}
    if declared:
        headers["Content-Length"] = str(body.total)
    response = await small_client.put(
        f"/v1/recordings/{existing.id}/artifacts/notes.txt", content=body, headers=headers
    )
    error = assert_error(response, 413, "too_large")
    assert error["detail"] == {"max_bytes": LIMIT}
    assert body.sent == 0 if declared else LIMIT < body.sent < body.total
    await assert_unchanged(small_client, small_stack, existing)
    kept = await small_client.get(f"/v1/recordings/{existing.id}/artifacts/notes.txt")
    assert kept.content == b"some notes"


async def test_json_body_declared_over_the_json_limit_is_refused_before_it_is_read(
    small_client: httpx.AsyncClient, small_stack: Stack
) -> None:
    existing = await make_existing(small_client, small_stack)
    body = CountingBody([b'{"title": "', b"x" * MAX_JSON_BODY_BYTES, b'"}'], chunk=1024 * 1024)
    response = await small_client.patch(
        f"/v1/recordings/{existing.id}",
        content=body,
        headers={**JSON, "Content-Length": str(body.total)},
    )
    assert_error(response, 413, "too_large")
    assert body.sent == 0
    await assert_unchanged(small_client, small_stack, existing)


@pytest.mark.parametrize("route", ["patch", "put-transcript"])
async def test_streamed_json_body_over_the_json_limit_is_413(
    small_client: httpx.AsyncClient, small_stack: Stack, route: str
) -> None:
    existing = await make_existing(small_client, small_stack)
    body = CountingBody([b'{"title": "', b"x" * MAX_JSON_BODY_BYTES, b'"}'], chunk=1024 * 1024)
    path = f"/v1/recordings/{existing.id}" + ("" if route == "patch" else "/transcript")
    method = "PATCH" if route == "patch" else "PUT"
    response = await small_client.request(method, path, content=body, headers=JSON)
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "too_large")
    assert body.sent <= MAX_JSON_BODY_BYTES + 1024 * 1024
    await assert_unchanged(small_client, small_stack, existing)


# ---- interrupted uploads against a real server ---------------------------------------------------
# Embedded only: they watch the bytes reach the local staging directory and leave it again.

DECLARED = 5_000_000
SENT = 1_200_000  # over the BlobStore's 1 MiB write buffer, so bytes really reach the disk


@cache
def long_wav() -> bytes:
    audio = wav_bytes(seconds=40.0)
    assert len(audio) > SENT
    return audio


def interrupted_request(kind: str) -> bytes:
    """The head and the first ``SENT`` bytes of a much longer upload."""
    audio = long_wav()[:SENT]
    if kind == "raw":
        head = (
            "POST /v1/recordings?filename=x.wav HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: audio/wav\r\nContent-Length: {DECLARED}\r\n\r\n"
        )
        return head.encode() + audio
    if kind == "multipart":
        preamble = multipart_head(b"x.wav", {"title": "cut off"})
        length = len(preamble) + DECLARED + len(MULTIPART_TAIL)
        head = (
            "POST /v1/recordings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: {MULTIPART}\r\nContent-Length: {length}\r\n\r\n"
        )
        return head.encode() + preamble + audio
    assert kind == "chunked"
    head = (
        "POST /v1/recordings?filename=x.wav HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: audio/wav\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    step = 64 * 1024
    chunks = [audio[i : i + step] for i in range(0, len(audio), step)]
    return head.encode() + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.02)


def staged_bytes(data_dir: Path) -> int:
    return sum(path.stat().st_size for path in stored_files(data_dir) if path.exists())


@pytest.mark.parametrize("hangup", ["close", "reset"])
@pytest.mark.parametrize("kind", ["raw", "multipart", "chunked"])
def test_interrupted_upload_leaves_nothing_behind(
    live_server: LiveServer, data_dir: Path, kind: str, hangup: str
) -> None:
    sock = socket.create_connection(("127.0.0.1", live_server.port), timeout=10)
    try:
        sock.sendall(interrupted_request(kind))
        # The upload is under way: its bytes sit in a staging file.
        wait_for(
            lambda: staged_bytes(data_dir) > 0, "the upload's bytes reach the staging directory"
        )
        assert all(p.parent.name == ".staging" for p in stored_files(data_dir))
        if hangup == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()

    wait_for(lambda: not stored_files(data_dir), "the server removes the partial upload")
    assert httpx.get(f"{live_server.url}/v1/recordings", timeout=5).json()["items"] == []
    usage = httpx.get(f"{live_server.url}/v1/storage-info", timeout=5).json()["usage"]
    assert usage["recordings"] == 0
    assert usage["recording_bytes"] == 0

    # Still healthy, still serving uploads, and it logged no crash.
    assert live_server.process.poll() is None
    assert httpx.get(f"{live_server.url}/healthz", timeout=5).status_code == 200
    done = httpx.post(
        f"{live_server.url}/v1/recordings?filename=after.wav",
        content=wav_bytes(seconds=0.5),
        headers=WAV,
        timeout=10,
    )
    assert done.status_code == 201, done.text
    log = live_server.log.read_text()
    assert "Traceback" not in log, log
    assert " 500" not in log, log
