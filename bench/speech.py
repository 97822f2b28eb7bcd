"""What the pipeline benchmarks share: test speech, and the API calls that feed it to a server.

Speech: espeak-ng says varied sentences, PyAV makes an MP3 of them. The MP3 is what a user would
upload: compressed, so both the pipeline and a direct faster-whisper call have to decode it.
Sentences are drawn from a fixed pool in an order that depends on ``seed``, so different files
say different things but every run makes the same ones.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import httpx

from bench.common import BenchError, log, run_tool

ESPEAK_WORDS_PER_MINUTE = 160
MP3_BIT_RATE = 64_000
TOOL_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 600.0
POLL_S = 0.1

SENTENCES = (
    "The quarterly report shows that revenue grew by twelve percent compared with last year.",
    "Please remember to lock the back door before you leave the office tonight.",
    "Our team will meet on Thursday afternoon to review the new product roadmap.",
    "The weather forecast predicts heavy rain along the coast for most of the weekend.",
    "She asked whether the library would stay open late during the exam period.",
    "A small bakery on the corner sells fresh bread every morning at seven o'clock.",
    "The engineers replaced the old pump and the water pressure returned to normal.",
    "If the train is delayed again, we should consider taking the bus instead.",
    "The museum opened a new exhibition about the history of early aviation.",
    "He spent the whole evening fixing the bicycle chain in the garage.",
    "Customers have reported that the mobile application crashes when they upload photos.",
    "The committee agreed to postpone the vote until more information is available.",
    "Our neighbours planted tomatoes, carrots and beans in their garden this spring.",
    "The hospital is looking for volunteers to help at the reception desk on weekends.",
    "Most of the students finished the test well before the end of the hour.",
    "The river flooded the lower fields after three days of continuous rain.",
    "We need to order more paper for the printer before the end of the month.",
    "The conference will take place in a large hotel near the central station.",
    "Several birds were singing in the tall oak tree outside my window this morning.",
    "The manager explained the new safety rules to everyone working in the warehouse.",
    "A strong wind knocked over the fence between our house and the park.",
    "They decided to paint the kitchen a light shade of green before the holidays.",
    "The new software update improves battery life and fixes several security problems.",
    "My grandfather still remembers the first time he saw a television set.",
    "The city council plans to build a new bridge across the river next year.",
    "Please send me the final version of the contract by Friday at noon.",
    "The children built a sandcastle and watched the waves wash it away.",
    "Scientists measured the temperature of the lake every hour for a whole week.",
    "The restaurant changed its menu and now serves vegetarian dishes every day.",
    "After the meeting, the director thanked everyone for their hard work this year.",
    "The airport was closed for two hours because of thick fog over the runway.",
    "Our internet connection was slow all afternoon, so the call kept dropping.",
    "The farmer sold apples, pears and plums at the market on Saturday.",
    "Traffic on the main road was diverted while workers repaired the water main.",
    "The orchestra rehearsed the symphony three times before the evening concert.",
    "He forgot his umbrella on the train and arrived at work completely soaked.",
    "The survey found that most people prefer to work from home two days a week.",
    "A delivery van blocked the narrow street for almost twenty minutes.",
    "The professor recommended reading the second chapter before next week's lecture.",
    "We celebrated my sister's birthday with a picnic by the lake.",
)


def sentences_for(seconds: float, seed: int) -> list[str]:
    """About ``seconds`` of speech: the pool shuffled by ``seed``, repeated only when needed."""
    rng = random.Random(seed)  # picking sentences, not secrets
    words_needed = seconds * ESPEAK_WORDS_PER_MINUTE / 60
    chosen: list[str] = []
    words = 0
    while words < words_needed:
        pool = list(SENTENCES)
        rng.shuffle(pool)
        for sentence in pool:
            chosen.append(sentence)
            words += len(sentence.split())
            if words >= words_needed:
                break
    return chosen


def make_speech_mp3(path: Path, seconds: float, *, seed: int = 0) -> float:
    """Write about ``seconds`` of varied speech to ``path`` as MP3; its duration in seconds."""
    if shutil.which("espeak-ng") is None:
        raise BenchError("espeak-ng is needed to make test speech (`make test-system-deps`)")
    text_file = path.with_suffix(".txt")
    raw = path.with_suffix(".espeak.wav")
    text_file.write_text("\n".join(sentences_for(seconds, seed)) + "\n", encoding="utf-8")
    try:
        run_tool(
            [
                "espeak-ng",
                "-v",
                "en-us",
                "-s",
                str(ESPEAK_WORDS_PER_MINUTE),
                "-w",
                str(raw),
                "-f",
                str(text_file),
            ],
            timeout=TOOL_TIMEOUT_S,
        )
        duration = _wav_to_mp3(raw, path)
    finally:
        text_file.unlink(missing_ok=True)
        raw.unlink(missing_ok=True)
    log(f"[speech] {path.name}: {duration:.1f} s of speech, {path.stat().st_size:,} bytes of MP3")
    return duration


def _wav_to_mp3(source: Path, target: Path) -> float:
    samples = 0
    rate = 0
    with av.open(str(source)) as inp, av.open(str(target), "w", format="mp3") as out:
        in_stream = inp.streams.audio[0]
        rate = in_stream.codec_context.sample_rate
        stream: Any = out.add_stream("libmp3lame", rate=rate)
        stream.layout = "mono"
        stream.bit_rate = MP3_BIT_RATE
        resampler = av.AudioResampler(stream.codec_context.format, "mono", rate)
        for frame in inp.decode(in_stream):
            for converted in resampler.resample(frame):
                converted.pts = samples
                converted.time_base = Fraction(1, rate)
                samples += converted.samples
                for packet in stream.encode(converted):
                    out.mux(packet)
        for converted in resampler.resample(None):
            converted.pts = samples
            converted.time_base = Fraction(1, rate)
            samples += converted.samples
            for packet in stream.encode(converted):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return samples / rate if rate else 0.0


# ---- the API ----------------------------------------------------------------------------------


def check(response: httpx.Response, status: int = 200) -> Any:
    """The JSON body of ``response``, or BenchError when its status is not ``status``."""
    if response.status_code != status:
        raise BenchError(
            f"{response.request.method} {response.request.url} answered "
            f"{response.status_code}: {response.text[:500]}"
        )
    return response.json()


def upload(client: httpx.Client, path: Path, *, transcribe: bool) -> dict[str, Any]:
    """POST ``path`` as a new recording; the recording."""
    response = client.post(
        "/v1/recordings",
        params={"filename": path.name, "transcribe": str(transcribe).lower()},
        content=path.read_bytes(),
        headers={"Content-Type": "audio/mpeg"},
    )
    recording: dict[str, Any] = check(response, 201)
    return recording


def job_of(client: httpx.Client, recording_id: str) -> dict[str, Any]:
    """The recording's newest pipeline job."""
    items = check(client.get(f"/v1/recordings/{recording_id}/jobs"))["items"]
    if not items:
        raise BenchError(f"recording {recording_id} has no job")
    job: dict[str, Any] = items[0]
    return job


def wait_for_job(
    client: httpx.Client,
    job_id: str,
    done: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = JOB_TIMEOUT_S,
) -> dict[str, Any]:
    """Poll the job until ``done(job)``; BenchError if it fails, is cancelled or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = check(client.get(f"/v1/jobs/{job_id}"))
        if done(job):
            return job
        if job["status"] in ("failed", "cancelled"):
            raise BenchError(f"job {job_id} ended {job['status']}: {job.get('error')}")
        time.sleep(POLL_S)
    raise BenchError(f"job {job_id} did not {what} within {timeout:.0f} s")


def succeeded(job: dict[str, Any]) -> bool:
    return bool(job["status"] == "succeeded")
