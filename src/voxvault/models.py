"""The shapes VoxVault speaks in: records the service returns and inputs it validates.

Field names here are the API contract (handbook §3); every front-end renders these models.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from voxvault.errors import ValidationFailed
from voxvault.names import RECORDING_ID

MAX_SEGMENT_TEXT = 10_000
MAX_SEGMENTS = 100_000
MAX_WORDS_PER_SEGMENT = 2_000
MAX_TITLE = 500
MAX_TAGS = 64
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 32
TAG_PATTERN = r"^[\w][\w .:/+-]{0,63}$"


def validation_failed(exc: ValidationError) -> ValidationFailed:
    """The service's 422 for a pydantic error, listing each problem without echoing input."""
    problems = [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_context=False, include_input=False)
    ]
    return ValidationFailed("some fields are invalid", detail=problems)


class RecordingStatus(StrEnum):
    UPLOADING = "uploading"
    STORED = "stored"
    QUEUED = "queued"
    PROCESSING = "processing"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"


class Recording(BaseModel):
    id: str
    status: RecordingStatus
    title: str | None
    filename: str | None
    content_type: str
    size_bytes: int
    sha256: str
    duration_s: float | None
    sample_rate: int | None
    channels: int | None
    codec: str | None
    tags: list[str]
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    error: str | None = None
    """Why processing failed, when ``status`` is ``failed``."""


class RecordingPage(BaseModel):
    items: list[Recording]
    next_cursor: str | None


def _unique_tags(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _bounded_metadata(value: dict[str, Any]) -> dict[str, Any]:
    if _depth(value) > MAX_METADATA_DEPTH:
        raise ValueError(f"metadata may nest at most {MAX_METADATA_DEPTH} levels deep")
    try:
        encoded = json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
    except ValueError:
        raise ValueError("metadata numbers must be finite (no NaN or Infinity)") from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must serialize to at most {MAX_METADATA_BYTES} bytes")
    return value


Tag = Annotated[str, Field(pattern=TAG_PATTERN)]
Tags = Annotated[list[Tag], Field(max_length=MAX_TAGS), AfterValidator(_unique_tags)]
Title = Annotated[str, Field(min_length=1, max_length=MAX_TITLE)]
Metadata = Annotated[dict[str, Any], AfterValidator(_bounded_metadata)]


class RecordingPatch(BaseModel):
    """Fields a client may change; anything else in the body is refused."""

    model_config = ConfigDict(extra="forbid")

    title: Title | None = None
    tags: Tags | None = None
    metadata: Metadata | None = None


class RecordingQuery(BaseModel):
    limit: Annotated[int, Field(ge=1, le=500)] = 50
    cursor: str | None = None
    status: RecordingStatus | None = None
    tag: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None


Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Word(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: Seconds
    end: Seconds
    word: Annotated[str, Field(max_length=200)]
    probability: Annotated[float | None, Field(ge=0, le=1, allow_inf_nan=False)] = None

    @model_validator(mode="after")
    def _ordered(self) -> Word:
        if self.end < self.start:
            raise ValueError("word end is before its start")
        return self


class Segment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: Seconds
    end: Seconds
    speaker: Annotated[str | None, Field(max_length=100)] = None
    text: Annotated[str, Field(max_length=MAX_SEGMENT_TEXT)]
    words: Annotated[list[Word] | None, Field(max_length=MAX_WORDS_PER_SEGMENT)] = None

    @model_validator(mode="after")
    def _ordered(self) -> Segment:
        if self.end < self.start:
            raise ValueError("segment end is before its start")
        if self.words:
            starts = [word.start for word in self.words]
            if starts != sorted(starts):
                raise ValueError("words are not in time order")
        return self


LANGUAGE_PATTERN = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


class TranscriptInput(BaseModel):
    """A transcript submitted from elsewhere; stored as a new version."""

    model_config = ConfigDict(extra="forbid")

    language: Annotated[str | None, Field(pattern=LANGUAGE_PATTERN.pattern)] = None
    segments: Annotated[list[Segment], Field(max_length=MAX_SEGMENTS)]
    engine: Annotated[str | None, Field(max_length=64)] = None
    """What made it (``faster-whisper``, or an app's own live engine)."""
    model: Annotated[str | None, Field(max_length=200)] = None

    @model_validator(mode="after")
    def _segments_in_order(self) -> TranscriptInput:
        starts = [segment.start for segment in self.segments]
        if starts != sorted(starts):
            raise ValueError("segments are not in time order")
        return self


MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,99})?$"


class TranscribeRequest(BaseModel):
    """Options of a (re-)transcription; unset ones come from the server's settings."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str | None, Field(pattern=MODEL_NAME_PATTERN)] = None
    """A Whisper model name (``tiny.en``, ``large-v3``) or a hub id (``org/name``)."""
    language: Annotated[str | None, Field(pattern=LANGUAGE_PATTERN.pattern)] = None
    """The spoken language (ISO 639-1, e.g. ``en``); detected when unset."""


class Transcript(BaseModel):
    recording_id: str
    version: int
    language: str | None
    segments: list[Segment]
    created_at: datetime
    engine: str | None = None
    model: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds spent per pipeline step, for transcripts the pipeline made."""
    job_id: str | None = None
    """The job that made it; a job makes at most one transcript, however often it runs."""


class TranscriptVersion(BaseModel):
    version: int
    language: str | None
    segment_count: int
    created_at: datetime
    engine: str | None = None
    model: str | None = None
    job_id: str | None = None


class TranscriptVersionList(BaseModel):
    items: list[TranscriptVersion]


class Artifact(BaseModel):
    name: str
    content_type: str
    size_bytes: int
    sha256: str
    created_at: datetime


class ArtifactList(BaseModel):
    items: list[Artifact]


class PlaybackLink(BaseModel):
    url: str
    expires_at: datetime


class StorageUsage(BaseModel):
    recordings: int
    recording_bytes: int
    transcripts: int
    artifacts: int
    artifact_bytes: int


class StorageInfo(BaseModel):
    database: dict[str, Any]
    blobs: dict[str, Any]
    usage: StorageUsage


# ---- search ---------------------------------------------------------------------------------


class SearchRequest(BaseModel):
    """A search of the library: the query language is ``voxvault.search.query``'s."""

    model_config = ConfigDict(extra="forbid")

    q: Annotated[
        str,
        Field(
            description="Words (all must match, case- and accent-insensitive, stemmed), "
            '`"exact phrases"`, `a OR b`, `-excluded`, `prefix*`. At most 1,000 characters; '
            "anything else is text."
        ),
    ]
    tag: Tag | None = None
    speaker: Annotated[str | None, Field(min_length=1, max_length=100)] = None
    language: Annotated[str | None, Field(pattern=LANGUAGE_PATTERN.pattern)] = None
    recording_id: Annotated[str | None, Field(pattern=RECORDING_ID.pattern)] = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    limit: Annotated[int, Field(ge=1, le=100)] = 20
    cursor: Annotated[str | None, Field(max_length=512)] = None
    group: Annotated[
        Literal["recording"] | None,
        Field(description="`recording`: one item per recording, ranked by its best hit."),
    ] = None
    per_group: Annotated[
        int, Field(ge=1, le=20, description="Hits per recording when grouped.")
    ] = 3


class SearchHit(BaseModel):
    recording_id: str
    recording_title: str | None
    start: float
    end: float
    speaker: str | None
    text: str
    snippet: str
    """The text around the match, HTML-escaped, each matched word inside ``<mark>…</mark>``."""
    playback_url: str
    """A signed URL that plays the recording from the hit (``#t=start,end``)."""


class SearchPage(BaseModel):
    items: list[SearchHit]
    next_cursor: str | None
    truncated: bool
    """More segments matched than were ranked (the newest ``window`` are): narrow the query."""


class SearchGroup(BaseModel):
    recording_id: str
    recording_title: str | None
    hits: list[SearchHit]


class SearchGroupPage(BaseModel):
    items: list[SearchGroup]
    next_cursor: str | None
    truncated: bool
