"""The threads that run a put's lanes are kept for the next puts and leave once idle."""

from __future__ import annotations

import threading
import time

import pytest

from voxvault.blobs.base import _LaneThreads


def lane_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "voxvault-lane")


def test_a_thread_is_reused_for_the_next_job_and_leaves_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_LaneThreads, "IDLE_S", 0.2)
    threads = _LaneThreads()
    before = lane_threads()
    ran: list[str] = []
    for _ in range(5):
        done = threading.Event()

        def job(done: threading.Event = done) -> None:
            ran.append(threading.current_thread().name)
            done.set()

        threads.run(job)
        assert done.wait(5)
        time.sleep(0.01)  # the thread is back among the idle ones
    assert len(ran) == 5
    assert lane_threads() - before == 1  # one thread ran all five
    deadline = time.monotonic() + 5
    while lane_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lane_threads() == before


def test_jobs_running_at_once_get_a_thread_each() -> None:
    threads = _LaneThreads()
    started, release = threading.Barrier(4), threading.Event()

    def job() -> None:
        started.wait(5)
        release.wait(5)

    for _ in range(3):
        threads.run(job)
    started.wait(5)  # three jobs run at once: none waits for another to finish
    release.set()
