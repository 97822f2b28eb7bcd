"""Settings: one typed class read from ``VOXVAULT_*`` environment variables.

Backends are chosen by URL scheme (``sqlite://``, ``file://``; scale-out adapters add theirs).
Defaults put everything under one data directory so that a fresh machine needs no servers.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from voxvault.errors import ConfigurationError

GiB = 1024**3
MAX_PLAYBACK_URL_TTL = 7 * 24 * 3600
SECRET_KEY_FILENAME = "secret.key"  # noqa: S105 - a file name, not a secret


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VOXVAULT_", extra="ignore")

    data_dir: Path = Path("./voxvault-data")
    database_url: str = ""
    blob_url: str = ""
    max_upload_bytes: Annotated[int, Field(gt=0)] = 10 * GiB
    secret_key: SecretStr | None = None
    playback_url_ttl: Annotated[int, Field(gt=0, le=MAX_PLAYBACK_URL_TTL)] = 3600
    public_url: str | None = None
    """Base URL clients reach this server at (behind a proxy); signed links are built on it."""
    blob_public_url: str | None = None
    """Where clients reach an object store when that differs from ``blob_url``'s endpoint;
    presigned playback links are signed for it."""
    whisper_model: str = "tiny.en"
    """A model name (``tiny.en`` is bundled; others download when online) or a local directory."""
    whisper_device: Literal["auto", "cpu", "cuda"] = "auto"
    whisper_compute_type: str = "auto"
    whisper_beam_size: Annotated[int, Field(ge=1, le=20)] = 5
    whisper_cpu_threads: Annotated[int, Field(ge=0, le=256)] = 0
    """CPU threads of the engine; 0: all cores, less one when the API serves from the same
    process (``serve --workers N``), so that requests keep a core while it transcribes."""
    max_duration_s: Annotated[float, Field(gt=0)] = 12 * 3600
    """Longest recording accepted: checked at upload and again while decoding."""
    decode_timeout_s: Annotated[float, Field(gt=0)] = 1800
    """Wall-clock limit for decoding one upload (untrusted media) in the normalize step."""
    decode_memory_bytes: Annotated[int, Field(ge=256 * 1024**2)] = 2 * GiB
    """Address-space limit of the process that decodes untrusted media."""
    queue_url: str = "embedded"
    """``embedded``: jobs are rows in the metadata database."""
    events_url: str = "memory"
    """``memory``: progress events stay in this process (SSE also follows the database);
    ``redis://host:6379/0``: they reach every API process."""
    job_lease_s: Annotated[float, Field(ge=1, le=3600)] = 30
    """A job whose worker has not renewed its lease for this long is run again elsewhere."""
    job_max_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    job_retry_delay_s: Annotated[float, Field(ge=0, le=3600)] = 5
    """Delay before the first retry; each further retry waits twice as long."""
    gc_grace_s: Annotated[float, Field(ge=0)] = 3600
    """Orphaned blobs, staging leftovers and scratch directories younger than this are kept by
    ``voxvault gc`` and the sweeper, and not reported by ``voxvault fsck``: they may belong to
    an upload or a delete in progress."""
    sweep_interval_s: Annotated[int, Field(ge=0)] = 3600
    """How often the server runs its sweeps (status repair, gc), once per cluster; 0: never.
    A divisor of 60 s or a whole number of minutes dividing an hour (they run on a clock)."""
    upload_ttl: Annotated[int, Field(gt=0)] = 24 * 3600
    """Seconds a resumable upload stays resumable after its last chunk; then its bytes are swept."""

    @field_validator("sweep_interval_s")
    @classmethod
    def _sweep_on_a_clock(cls, value: int) -> int:
        minutes, seconds = divmod(value, 60)
        if value == 0 or (value < 60 and 60 % value == 0):
            return value
        if not seconds and minutes <= 60 and 60 % minutes == 0:
            return value
        raise ValueError("must be 0, a divisor of 60 s, or whole minutes dividing an hour")

    @model_validator(mode="after")
    def _fill_backend_urls(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'voxvault.db'}"
        if not self.blob_url:
            self.blob_url = (self.data_dir / "blobs").as_uri()
        return self

    def load_secret_key(self) -> bytes:
        """The signing key: the configured one, else the one kept in the data directory.

        The kept key is created once, with mode 0600, by whichever process gets there first.
        """
        if self.secret_key is not None:
            value = self.secret_key.get_secret_value()
            if len(value) < 16:
                raise ConfigurationError("VOXVAULT_SECRET_KEY must be at least 16 characters")
            return value.encode()
        path = self.data_dir / SECRET_KEY_FILENAME
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # Written under a private name, then linked into place: a racing process either
            # wins the link or reads the complete key of the one that did.
            staging = self.data_dir / f".{SECRET_KEY_FILENAME}.{secrets.token_hex(8)}"
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48))
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(staging, path)
            except FileExistsError:
                pass
            finally:
                staging.unlink()
        key = path.read_text().strip()
        if len(key) < 16:
            raise ConfigurationError(f"the secret key in {path} is damaged")
        return key.encode()
