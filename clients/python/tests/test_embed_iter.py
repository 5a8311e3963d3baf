"""The FastEmbed scenario: a batch job streams a large corpus through
``Client.embed_iter`` while workers are SIGKILLed under it; every text's
vector comes back, in order, and the job finishes in bounded time."""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from helpers import TOLERANCE, Daemon, PollTimeout, max_abs_diff, poll

import inferd

CORPUS_SIZE = 20_000
KILLS = 2
# The job takes about 65 s with the debug build on the 2-core machine.
JOB_TIMEOUT = 420.0

WORDS = (
    "river stone garden window lantern copper violet thunder meadow harbor "
    "pencil orbit candle marble forest silver engine anchor velvet prism"
).split()


def corpus_text(i: int) -> str:
    """Short, distinct text number ``i`` (a few words)."""
    return f"{WORDS[i % 20]} {WORDS[(i // 20) % 20]} {WORDS[(i // 400) % 20]} number {i}"


def corpus(n: int, pulled: list[int]) -> Iterator[str]:
    """A lazy corpus; ``pulled[0]`` counts the texts read so far."""
    for i in range(n):
        pulled[0] += 1
        yield corpus_text(i)


class Job(threading.Thread):
    """Consumes ``embed_iter`` into a preallocated array, counting progress."""

    def __init__(self, stream: Callable[[], Iterator[Any]], n: int) -> None:
        super().__init__(daemon=True, name="embed-job")
        self.stream = stream
        self.out = np.full((n, 384), np.nan, dtype=np.float32)
        self.done = 0
        self.error: BaseException | None = None
        self.elapsed = math.nan

    def run(self) -> None:
        started = time.monotonic()
        try:
            for vector in self.stream():
                self.out[self.done] = vector
                self.done += 1
        except BaseException as err:  # reported by the test
            self.error = err
        self.elapsed = time.monotonic() - started


def kill_a_busy_worker(daemon: Daemon) -> int:
    """SIGKILLs a worker that is running a request (or, failing that within
    a few polls, any serving worker); returns its pid."""

    def busy() -> int | None:
        workers = daemon.status()["workers"]
        pids = [w["pid"] for w in workers if w["state"] == "busy"]
        return pids[0] if pids else None

    try:
        pid = poll("a busy worker", busy, timeout=10)
    except PollTimeout:
        pid = daemon.serving_pids()[0]
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.timeout(JOB_TIMEOUT + 120)
def test_embed_iter_streams_a_corpus_in_order_through_two_worker_kills(
    spawn_daemon: Callable[..., Daemon],
) -> None:
    daemon = spawn_daemon(workers=2)
    before = daemon.status()["counters"]
    pulled = [0]
    client = inferd.Client(socket=daemon.socket, timeout=60.0)
    job = Job(
        lambda: client.embed_iter(
            corpus(CORPUS_SIZE, pulled), batch_size=64, concurrency=4, as_numpy=True
        ),
        CORPUS_SIZE,
    )
    job.start()

    killed: list[int] = []
    killed_at: list[int] = []
    for k in range(1, KILLS + 1):
        # Wait (bounded) until a share of the corpus came back, then kill.
        target = CORPUS_SIZE * k // (KILLS + 1)
        poll(
            f"{target} results before kill {k}",
            lambda target=target: True if job.done >= target or not job.is_alive() else None,
            timeout=JOB_TIMEOUT,
        )
        assert job.is_alive(), f"the job ended early: {job.error!r}"
        # Bounded read-ahead: never more than `concurrency` batches past the
        # results handed out.
        assert pulled[0] - job.done <= 4 * 64 + 64, (pulled[0], job.done)
        killed.append(kill_a_busy_worker(daemon))
        killed_at.append(job.done)

    job.join(timeout=JOB_TIMEOUT)
    assert not job.is_alive(), f"embed_iter still running after {JOB_TIMEOUT}s ({job.done} done)"
    assert job.error is None, f"embed_iter failed after {job.done} results: {job.error!r}"
    assert job.done == CORPUS_SIZE == pulled[0]

    # Every vector is there: finite and unit length (none missing or empty).
    out = job.out
    assert np.isfinite(out).all()
    norms = np.linalg.norm(out, axis=1)
    assert np.abs(norms - 1.0).max() < 1e-3

    # In order: a sample (the ends, around each kill, and random indices)
    # matches the same texts embedded directly, in other batches.
    rng = random.Random(1)
    sample = {0, CORPUS_SIZE - 1}
    for at in killed_at:
        sample.update(range(max(0, at - 100), min(CORPUS_SIZE, at + 400), 7))
    sample.update(rng.sample(range(CORPUS_SIZE), 200))
    indices = sorted(sample)
    direct = client.embed([corpus_text(i) for i in indices], as_numpy=True)
    for row, i in enumerate(indices):
        diff = max_abs_diff(out[i], direct[row])
        assert diff <= 2 * TOLERANCE, f"vector {i} is not text {i}'s: max abs diff {diff}"
    # Neighbouring texts differ, so a shifted stream could not pass the above.
    assert max_abs_diff(out[1], direct[indices.index(0)]) > 100 * TOLERANCE

    after = daemon.status()["counters"]
    exits = sum(after["worker_exits"].values()) - sum(before["worker_exits"].values())
    assert exits >= KILLS, f"expected {KILLS} worker exits, counters say {exits}"
    # The kills hit requests in flight (a busy worker was chosen): the daemon
    # re-dispatched them (or answered worker_lost, which the client retried).
    retried = after["retries"] - before["retries"]
    lost = after["requests_failed"].get("worker_lost", 0)
    assert retried + lost >= 1, "no kill hit a request in flight"
    print(
        f"\nembed_iter: {CORPUS_SIZE} texts in {job.elapsed:.1f}s "
        f"({CORPUS_SIZE / job.elapsed:.0f}/s), killed pids {killed} after {killed_at} results; "
        f"daemon retries {retried}, worker_lost {lost}"
    )
