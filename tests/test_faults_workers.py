"""gunicorn's workers against long requests (RELIABILITY.md A6 and J5), on a real server and database.

A6: a chunk that takes longer than the worker `--timeout`. Under the sync worker class the arbiter
kills the worker mid-request (X4): the upload must still move forward on every retry, because what
the request committed before the kill persists. Under the project's gthread workers the same chunk
is simply served. J5: a 1 GiB download is streamed, the serving worker's memory staying bounded,
and a `Range` request is either honoured or consistently ignored.

Servers are started per test (worker class and timeout are per server), with the app preloaded in
the master so a replacement worker starts fast, and SIGKILLed at the end (a graceful stop takes
seconds). Timed requests go only to warmed workers: a worker's first request imports the URLconf and
views, which must not eat into a 3 s timeout.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
import requests

from uploads import services, storage
from uploads.models import Status, UploadSession

from .invariants import OffsetLog, assert_invariants

pytestmark = pytest.mark.live
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# A6: the worker timeout, the client's link speed, and the slow uploads. A sync worker lives about
# 3-4 s into a request (the arbiter checks heartbeats once a second). At 256 KiB/s that is less than
# one block (UPLOADS_BLOCK_SIZE, 1 MiB): only the commit interval (UPLOADS_COMMIT_INTERVAL, 1 s)
# saves progress, about 0.75 MiB an attempt, so 2 MiB takes three or four; eight leave room for a
# loaded machine. The server runs with 1 MiB blocks (SLOW_ENV) and the default commit interval.
TIMEOUT = 3
SYNC_RATE = 256 * KiB  # bytes per second
SYNC_SIZE = 2 * MiB
MAX_ATTEMPTS = 8
GTHREAD_RATE = MiB
GTHREAD_SIZE = 2 * TIMEOUT * GTHREAD_RATE  # one chunk lasting twice the timeout
PIECE = 16 * KiB  # the client writes this much, then sleeps to keep to its rate
# 1 MiB blocks, the size that showed the livelock (the default is smaller now).
SLOW_ENV = {"UPLOADS_TEST_HOOKS": "1", "UPLOADS_BLOCK_SIZE": str(MiB)}

# J5: the largest growth of a worker's resident memory accepted while it serves 1 GiB. Streaming
# holds a block or two (FileResponse reads 64 KiB at a time; gunicorn may sendfile() it outright);
# buffering any real fraction of the file would show as hundreds of MiB.
RSS_BOUND = 64 * MiB
RSS_SAMPLE_INTERVAL = 0.01  # seconds


def _warm(server, workers: int = 2) -> None:
    """Until the server runs `workers` workers and each has answered once (X-Worker-Pid needs
    UPLOADS_TEST_HOOKS). The server accepts connections before its master has forked them all."""
    seen: set[int] = set()
    deadline = time.monotonic() + 30
    with ThreadPoolExecutor(2 * workers) as pool:
        while not (len(server.workers()) == workers and set(server.workers()) <= seen):
            assert time.monotonic() < deadline, f"workers {server.workers()}, only {seen} ever answered"
            for response in pool.map(lambda _: requests.options(f"{server.url}/files/", timeout=10), range(2 * workers)):
                seen.add(int(response.headers["X-Worker-Pid"]))


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Token {token}"}


def _create(server, token: str, name: str, size: int) -> str:
    response = requests.post(f"{server.url}/api/uploads/", json={"filename": name, "size": size}, headers=_auth(token), timeout=10)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _get(server, token: str, upload_id: str) -> dict:
    """Where the upload stands, as a client asks before resuming."""
    response = requests.get(f"{server.url}/api/uploads/{upload_id}/", headers=_auth(token), timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


@dataclass
class Attempt:
    start: int  # the offset the chunk was sent from
    status: int | None  # None: the connection broke without an answer
    body: bytes
    seconds: float
    worker: int | None  # X-Worker-Pid of the answer


def _put_slowly(server, token: str, upload_id: str, source: bytes, start: int, rate: int) -> Attempt:
    """One REST PUT of everything from `start` to the end, trickled at `rate` bytes a second."""
    parts = urlsplit(server.url)
    body = memoryview(source)[start:]
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    began = time.monotonic()
    try:
        connection.putrequest("PUT", f"/api/uploads/{upload_id}/")
        for name, value in {
            **_auth(token),
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes {start}-{len(source) - 1}/{len(source)}",
            "Content-Length": str(len(body)),
        }.items():
            connection.putheader(name, value)
        connection.endheaders()
        try:
            for sent in range(0, len(body), PIECE):
                connection.send(body[sent:sent + PIECE])
                ahead = began + (sent + PIECE) / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        except OSError:
            pass  # the worker is gone; an answer it managed to send may still be waiting
        try:
            response = connection.getresponse()
            status, payload = response.status, response.read()
            worker = response.getheader("X-Worker-Pid")
        except (OSError, http.client.HTTPException):
            status, payload, worker = None, b"", None
    finally:
        connection.close()
    return Attempt(start, status, payload, time.monotonic() - began, int(worker) if worker else None)


def _timeouts(server) -> int:
    return server.output().count("WORKER TIMEOUT")


def test_a6_sync_worker_killed_by_the_timeout_progress_persists(serve, token):
    """A6, RELIABILITY's second option ("progress made before the kill persists and later attempts
    move forward"): sync workers with `--timeout 3`, a 2 MiB upload sent as one chunk per attempt
    at 256 KiB/s, less than one block per worker lifetime. Each attempt outlives the timeout and
    its worker is killed by the arbiter (no 2xx: a reset, or gunicorn's own 500 for the aborted
    request); the client asks for the offset and sends the rest. The offset strictly grows from
    attempt to attempt (a slow body is committed every UPLOADS_COMMIT_INTERVAL, not only every
    block), the upload completes within eight attempts with the right SHA-256, and the invariants
    hold."""
    # gunicorn turns a sync worker class with threads > 1 into gthread: one thread keeps it sync.
    server = serve(f"--worker-class sync --threads 1 --workers 2 --timeout {TIMEOUT}", **SLOW_ENV)
    assert "Using worker: sync" in server.output()
    source = os.urandom(SYNC_SIZE)
    upload_id = _create(server, token, "slow-sync.bin", len(source))
    offsets = OffsetLog()
    offsets.saw(0)
    attempts: list[Attempt] = []
    while len(attempts) < MAX_ATTEMPTS:
        _warm(server)  # the attempt's worker must not spend its timeout importing views
        before = set(server.workers())
        attempt = _put_slowly(server, token, upload_id, source, offsets.seen[-1], SYNC_RATE)
        attempts.append(attempt)
        if attempt.status == 200:
            break
        # Only the kill ends an attempt early: nothing else may refuse a well-formed chunk.
        assert attempt.status in (None, 500), (attempt.status, attempt.body[:300])
        _wait_for(lambda before=before: len(before - set(server.workers())) == 1 and len(server.workers()) == 2,
                  15, "the arbiter to replace the killed worker")
        state = _get(server, token, upload_id)
        assert state["offset"] > offsets.seen[-1], (
            f"attempt {len(attempts)} made no progress: offsets {offsets.seen} then {state['offset']}"
        )
        offsets.saw(state["offset"])
        if state["status"] == "complete":  # killed after the last byte was committed; the GET finished it
            break

    summary = [(a.start, a.status, round(a.seconds, 1)) for a in attempts]
    print(f"\nA6 sync --timeout {TIMEOUT}: attempts (start offset, status, seconds) {summary}; "
          f"offsets after each kill {offsets.seen[1:]}; WORKER TIMEOUT x{_timeouts(server)}")
    failed = [attempt for attempt in attempts if attempt.status != 200]
    assert failed, "the chunk never outlived the timeout: the scenario did not happen"
    assert _timeouts(server) >= len(failed), server.output()[-3000:]
    final = _get(server, token, upload_id)
    assert final["status"] == "complete", f"not done after {len(attempts)} attempts: {summary}"
    assert final["offset"] == len(source)
    assert final["sha256"] == hashlib.sha256(source).hexdigest()
    offsets.saw(final["offset"])
    assert_invariants(UploadSession.objects.get(pk=upload_id), source, acked=offsets.acked)


def test_a6_gthread_worker_is_not_killed_by_a_long_chunk(serve, token):
    """A6, RELIABILITY's first option ("the worker class does not kill live requests"): the
    project's gthread workers with `--timeout 3`. A 6 MiB chunk at 1 MiB/s lasts twice the timeout,
    yet completes in one attempt: gthread's main loop keeps heart-beating while a thread streams the
    body, so the arbiter sees a live worker."""
    server = serve(f"--timeout {TIMEOUT}", **SLOW_ENV)
    assert "Using worker: project.gunicorn_worker.ThreadWorker" in server.output()  # gthread, subclassed
    source = os.urandom(GTHREAD_SIZE)
    upload_id = _create(server, token, "slow-gthread.bin", len(source))
    _warm(server)
    workers = set(server.workers())

    attempt = _put_slowly(server, token, upload_id, source, 0, GTHREAD_RATE)

    print(f"\nA6 gthread --timeout {TIMEOUT}: one attempt, status {attempt.status}, {attempt.seconds:.1f} s")
    assert attempt.status == 200, attempt.body[:300]
    # The client paced itself, so the request did outlive the timeout.
    assert attempt.seconds >= 2 * TIMEOUT
    assert attempt.worker in workers and set(server.workers()) == workers, "a worker was replaced"
    assert _timeouts(server) == 0, server.output()[-3000:]
    final = _get(server, token, upload_id)
    assert final["status"] == "complete" and final["offset"] == len(source)
    assert final["sha256"] == hashlib.sha256(source).hexdigest()
    assert_invariants(UploadSession.objects.get(pk=upload_id), source, acked=len(source))


# --- J5 ------------------------------------------------------------------------------------------


def _rss(pid: int) -> int | None:
    """Resident memory of `pid` in bytes (None once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * KiB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler:
    """The peak resident memory of some processes, sampled on a thread while the `with` block runs."""

    def __init__(self, pids: list[int]) -> None:
        self.baseline = {pid: _rss(pid) for pid in pids}
        self.peak = dict(self.baseline)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL):
            for pid in self.peak:
                rss = _rss(pid)
                if rss is not None:
                    self.peak[pid] = max(self.peak[pid] or 0, rss)
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def growth(self) -> dict[int, int]:
        return {pid: self.peak[pid] - self.baseline[pid] for pid in self.peak}


def _complete_sparse_upload(user, size: int, markers: dict[int, bytes]) -> UploadSession:
    """A complete upload of `size` bytes, made without sending them: a sparse partial file (zeros
    but for `markers`, written at their offsets), its offset committed, then finalized by the
    service that finishes an upload a crash left fully committed but unpublished (RELIABILITY A3).
    The row's SHA-256 and final file are thus the product's own. Costs no disk and no upload time."""
    upload, _ = services.upload_create(owner=user, filename="big.bin", size=size)
    with open(storage.partial_path(upload.pk), "r+b") as partial:
        partial.truncate(size)
        for at, data in markers.items():
            os.pwrite(partial.fileno(), data, at)
    # The one write behind the services' back: the offset the bytes above would have committed.
    UploadSession.objects.filter(pk=upload.pk, offset=0).update(offset=size)
    upload = services.upload_settle(upload=upload)
    assert upload.status == Status.COMPLETE and upload.file == storage.final_name(upload.pk, upload.filename)
    return upload


def test_j5_a_1_gib_download_is_streamed_in_bounded_memory(serve, user, token):
    """J5: GET /api/uploads/<id>/content/ of a 1 GiB upload, read in 1 MiB pieces and dropped,
    while every worker's VmRSS is sampled. Every byte arrives (count, SHA-256, and random markers at
    their offsets), and no worker grows by RSS_BOUND. Then `Range: bytes=<size - 824>-`: either 206
    with exactly those bytes and a Content-Range, or the range ignored consistently (200, the whole
    file from byte 0, no Content-Range, and no `Accept-Ranges: bytes` promised anywhere)."""
    size = GiB
    markers = {at: os.urandom(4 * KiB) for at in (0, 300 * MiB + 5, 512 * MiB, size - 4 * KiB)}
    upload = _complete_sparse_upload(user, size, markers)
    final_path = storage.final_storage().path(upload.file)
    server = serve(UPLOADS_TEST_HOOKS="1")
    url = f"{server.url}/api/uploads/{upload.pk}/content/"
    try:
        _warm(server)  # a worker's first request imports the views: not the download's growth
        digest, received = hashlib.sha256(), 0
        found: dict[int, bytearray] = {at: bytearray() for at in markers}
        with RssSampler(server.workers()) as sampler:
            with requests.get(url, headers=_auth(token), stream=True, timeout=60) as response:
                assert response.status_code == 200, response.text[:300]
                assert int(response.headers["Content-Length"]) == size
                serving = int(response.headers["X-Worker-Pid"])
                plain_accept_ranges = response.headers.get("Accept-Ranges", "")
                for piece in response.iter_content(MiB):
                    digest.update(piece)
                    for at, data in markers.items():  # the parts of each marker inside this piece
                        low, high = max(at, received), min(at + len(data), received + len(piece))
                        if low < high:
                            found[at] += piece[low - received:high - received]
                    received += len(piece)
        growth = sampler.growth()
        assert serving in growth and sampler.samples >= 5, f"worker {serving} was not sampled: {sampler.peak}"
        print(f"\nJ5 1 GiB download: serving worker {serving} RSS {sampler.baseline[serving] / MiB:.1f} MiB "
              f"-> peak {sampler.peak[serving] / MiB:.1f} MiB (growth {growth[serving] / MiB:.2f} MiB); "
              f"all workers' growth MiB {[round(g / MiB, 2) for g in growth.values()]}; {sampler.samples} samples")
        assert received == size
        assert digest.hexdigest() == upload.sha256
        assert {at: bytes(data) for at, data in found.items()} == markers, "bytes arrived at the wrong offsets"
        assert max(growth.values()) < RSS_BOUND, f"a worker grew by {max(growth.values()) / MiB:.1f} MiB"

        tail = 824
        with requests.get(url, headers={**_auth(token), "Range": f"bytes={size - tail}-"}, stream=True, timeout=60) as response:
            if response.status_code == 206:
                assert response.headers["Content-Range"] == f"bytes {size - tail}-{size - 1}/{size}"
                assert response.content == markers[size - 4 * KiB][-tail:]
                assert plain_accept_ranges == "bytes", "ranges are served but not advertised"
                print("J5 Range: 206 Partial Content")
            else:
                # RFC 9110 §14.2: a server may ignore Range and send the whole representation.
                assert response.status_code == 200, response.text[:300]
                assert "Content-Range" not in response.headers
                assert int(response.headers["Content-Length"]) == size
                assert "bytes" not in (plain_accept_ranges, response.headers.get("Accept-Ranges", ""))
                assert response.raw.read(4 * KiB) == markers[0]  # from byte 0, not the range's start
                print("J5 Range: ignored (200, the whole file)")
    finally:
        os.unlink(final_path)  # apparent 1 GiB: do not leave it for tools that copy tmp directories
