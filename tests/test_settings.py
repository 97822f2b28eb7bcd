"""Settings: defaults, ``VOXVAULT_*`` variables, bounds, the signing key, backend choice."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from voxvault import Settings, Vault
from voxvault.errors import ConfigurationError
from voxvault.settings import SECRET_KEY_FILENAME

GiB = 1024**3


def test_defaults_put_everything_under_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    expected_dir = (tmp_path / "voxvault-data").resolve()
    assert settings.data_dir == expected_dir
    assert settings.data_dir.is_absolute()
    assert settings.max_upload_bytes == 10 * GiB
    assert settings.playback_url_ttl == 3600
    assert settings.database_url == f"sqlite:///{expected_dir}/voxvault.db"
    assert settings.blob_url == (expected_dir / "blobs").as_uri()
    assert settings.blob_url.startswith("file:///")
    assert settings.secret_key is None
    assert settings.public_url is None


def test_relative_and_home_data_dirs_are_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = Settings(data_dir=Path("some/where"))
    assert relative.data_dir == (tmp_path / "some" / "where").resolve()
    assert relative.database_url == f"sqlite:///{tmp_path.resolve()}/some/where/voxvault.db"

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = Settings(data_dir=Path("~/vv"))
    assert home.data_dir == (tmp_path / "home" / "vv").resolve()


def test_values_come_from_voxvault_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "env-data"
    monkeypatch.setenv("VOXVAULT_DATA_DIR", str(data))
    monkeypatch.setenv("VOXVAULT_MAX_UPLOAD_BYTES", "12345")
    monkeypatch.setenv("VOXVAULT_PLAYBACK_URL_TTL", "604800")
    monkeypatch.setenv("VOXVAULT_PUBLIC_URL", "https://vox.example.org")
    monkeypatch.setenv("VOXVAULT_SECRET_KEY", "s" * 32)
    settings = Settings()
    assert settings.data_dir == data.resolve()
    assert settings.max_upload_bytes == 12345
    assert settings.playback_url_ttl == 604800
    assert settings.public_url == "https://vox.example.org"
    assert settings.database_url == f"sqlite:///{data.resolve()}/voxvault.db"
    assert settings.load_secret_key() == b"s" * 32


def test_explicit_backend_urls_from_the_environment_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "elsewhere" / "meta.db"
    blobs = tmp_path / "bytes"
    monkeypatch.setenv("VOXVAULT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("VOXVAULT_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("VOXVAULT_BLOB_URL", blobs.as_uri())
    settings = Settings()
    assert settings.database_url == f"sqlite:///{db}"
    assert settings.blob_url == blobs.as_uri()


def test_unprefixed_variables_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAX_UPLOAD_BYTES", "5")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "nope"))
    settings = Settings()
    assert settings.max_upload_bytes == 10 * GiB
    assert settings.data_dir == (tmp_path / "voxvault-data").resolve()


@pytest.mark.parametrize("ttl", ["604801", "0", "-5"])
def test_playback_ttl_out_of_bounds_is_refused(monkeypatch: pytest.MonkeyPatch, ttl: str) -> None:
    monkeypatch.setenv("VOXVAULT_PLAYBACK_URL_TTL", ttl)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert [e["loc"] for e in caught.value.errors()] == [("playback_url_ttl",)]


def test_playback_ttl_of_exactly_seven_days_is_accepted() -> None:
    assert Settings(playback_url_ttl=604800).playback_url_ttl == 604800


@pytest.mark.parametrize("value", ["0", "-1", "lots"])
def test_max_upload_bytes_must_be_a_positive_integer(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("VOXVAULT_MAX_UPLOAD_BYTES", value)
    with pytest.raises(ValidationError):
        Settings()


def test_generated_secret_key_is_private_and_stable(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir)
    key = settings.load_secret_key()
    path = data_dir / SECRET_KEY_FILENAME
    assert path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= 32
    assert path.read_bytes().strip() == key
    assert settings.load_secret_key() == key
    assert Settings(data_dir=data_dir).load_secret_key() == key
    # Only the key itself is left behind: no staging file.
    assert sorted(p.name for p in data_dir.iterdir()) == [SECRET_KEY_FILENAME]


def test_each_data_dir_gets_its_own_key(tmp_path: Path) -> None:
    first = Settings(data_dir=tmp_path / "one").load_secret_key()
    second = Settings(data_dir=tmp_path / "two").load_secret_key()
    assert first != second


def test_configured_secret_key_wins_and_writes_nothing(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOXVAULT_SECRET_KEY", "0123456789abcdef")
    settings = Settings(data_dir=data_dir)
    assert settings.load_secret_key() == b"0123456789abcdef"
    assert not (data_dir / SECRET_KEY_FILENAME).exists()
    # The key does not leak through the settings' repr.
    assert "0123456789abcdef" not in repr(settings)


def test_short_configured_secret_key_is_a_configuration_error(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOXVAULT_SECRET_KEY", "0123456789abcde")  # 15 characters
    settings = Settings(data_dir=data_dir)
    with pytest.raises(ConfigurationError, match="at least 16 characters"):
        settings.load_secret_key()


def test_damaged_key_file_is_a_configuration_error(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    (data_dir / SECRET_KEY_FILENAME).write_text("short\n")
    with pytest.raises(ConfigurationError, match="damaged"):
        Settings(data_dir=data_dir).load_secret_key()


def test_concurrent_first_loads_agree_on_one_key(data_dir: Path) -> None:
    threads_count = 16
    barrier = threading.Barrier(threads_count)
    keys: list[bytes] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def load() -> None:
        settings = Settings(data_dir=data_dir)
        barrier.wait(timeout=30)
        try:
            key = settings.load_secret_key()
        except BaseException as exc:
            with lock:
                failures.append(exc)
            return
        with lock:
            keys.append(key)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert failures == []
    assert len(keys) == threads_count
    assert len(set(keys)) == 1
    assert (data_dir / SECRET_KEY_FILENAME).read_bytes().strip() == keys[0]
    assert sorted(p.name for p in data_dir.iterdir()) == [SECRET_KEY_FILENAME]


@pytest.mark.anyio
async def test_unsupported_blob_url_scheme_is_refused_at_open(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, blob_url="ftp://x")
    with pytest.raises(ConfigurationError, match="ftp://x"):
        await Vault.open(settings)


@pytest.mark.anyio
async def test_unsupported_database_url_is_refused_at_open(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir, database_url="mysql://x")
    with pytest.raises(ConfigurationError, match="mysql://x"):
        await Vault.open(settings)


@pytest.mark.anyio
async def test_unsupported_urls_from_the_environment_are_refused_at_open(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOXVAULT_DATA_DIR", str(data_dir))
    monkeypatch.setenv("VOXVAULT_BLOB_URL", "s3x://bucket/prefix")
    with pytest.raises(ConfigurationError, match="unsupported blob store URL"):
        await Vault.open()
