"""The fault matrix over real sockets (RELIABILITY.md §5 A, E, F, G, H): crashes and a hostile network.

Each test is named after its RELIABILITY id and ends with `assert_invariants`. Crashes use the
test-only crash points (uploads/faults.py): a gunicorn started with `UPLOADS_TEST_HOOKS=1` and
`UPLOADS_CRASH_POINT=<point>[@n]` SIGKILLs its worker there. The network faults go through
tests/faults/proxy.py. Clients behave as real ones do: after an error they ask where the upload
stands (REST GET, tus HEAD), adopt a 409's offset, and send from there; every offset they are
shown is recorded, for INV4 (never decreasing).

Servers: `serve()` starts one per test (crash points and timeouts are per server), with the app
preloaded in the master so a replacement worker starts fast, and SIGKILLs it at the end (a graceful
gunicorn stop takes seconds); tests that need nothing special share one module-wide server.
Time limits are only asserted against warmed workers (a worker's first request imports the views).

Already covered elsewhere, so not repeated here: a worker SIGKILLed mid-chunk by pid (A1,
test_live.py), a silent half-open body freed by the body timeout or by a release request
(test_live.py, test_tus_live.py), DELETE during a PATCH (E5, test_tus_live.py).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
import redis
import requests
from django.conf import settings
from django.utils import timezone

from uploads import progress, selectors, services, storage
from uploads.models import Status, UploadSession

from .faults import FaultProxy
from .invariants import assert_invariants, assert_single_writer, final_files
from .server import ROOT, project_environment

pytestmark = pytest.mark.live
KiB = 1024
MiB = 1024 * KiB
TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
PROTOCOLS = ["rest", "tus"]

# A crashing server commits only when a chunk ends (not every MiB as the body streams), so every
# chunk passes each chunk crash point exactly once, and `<point>@2` fires in the second chunk. Crash
# counters are per process: one worker sees every request.
CRASH_ENV = {
    "UPLOADS_TEST_HOOKS": "1",
    "WEB_CONCURRENCY": "1",
    "UPLOADS_BLOCK_SIZE": str(MiB),
    "UPLOADS_COMMIT_BYTES": str(64 * MiB),
    "UPLOADS_COMMIT_INTERVAL": "60",
}


def _ok(status: int) -> bool:
    return 200 <= status < 300


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _host_port(base: str) -> tuple[str, int]:
    parts = urlsplit(base)
    return parts.hostname, parts.port


@pytest.fixture(scope="module")
def _shared(django_db_setup, django_db_blocker, tmp_path_factory):
    from .server import start_server

    root = tmp_path_factory.mktemp("faults")
    media = root / "media"
    media.mkdir()
    with django_db_blocker.unblock():
        server = start_server(
            media, root, UPLOADS_COMMIT_BYTES=str(MiB), UPLOADS_TEST_HOOKS="1", GUNICORN_CMD_ARGS="--preload"
        )
    _warm(server, 2)
    yield server, media
    server.kill()


@pytest.fixture
def shared_server(_shared, transactional_db, settings):
    """One plain server (2 gthread workers) for the tests that need nothing special of it: a
    server start costs seconds. The test's MEDIA_ROOT becomes the server's."""
    server, media = _shared
    assert server.process.poll() is None, server.output()
    settings.MEDIA_ROOT = str(media)
    yield server
    assert_single_writer(server.write_log)  # INV7 (the log spans the module's tests so far)


@pytest.fixture
def fault_proxy():
    """`fault_proxy(server)`: a FaultProxy on a free port in front of `server`; stopped afterwards."""
    proxies: list[FaultProxy] = []

    def start(server) -> FaultProxy:
        proxy = FaultProxy(*_host_port(server.url))
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()


def _server_cached_offset(row: UploadSession) -> int | None:
    """The running total the *server* wrote to Redis, read raw (no fallback, no back-off)."""
    prefix = settings.CACHES["uploads"]["KEY_PREFIX"]  # the server's too (tests/server.py)
    value = redis.Redis.from_url(settings.UPLOADS_REDIS_URL).get(f"{prefix}:1:{progress.key_for(row)}")
    return int(value) if value is not None and value.isdigit() else None


@dataclass
class Client:
    """One upload, driven the way real clients drive it (see the module docstring)."""

    protocol: str
    token: str
    id: str
    size: int
    seen: list[int] = field(default_factory=list)  # every offset shown to the client, in order
    acked: int = 0  # ACK_MAX

    @classmethod
    def create(cls, protocol: str, base: str, token: str, size: int) -> Client:
        auth = {"Authorization": f"Token {token}"}
        if protocol == "rest":
            name = f"fault-{uuid.uuid4().hex[:12]}.bin"  # the REST Redis key is by name: keep it unique
            response = requests.post(f"{base}/api/uploads/", json={"filename": name, "size": size}, headers=auth, timeout=10)
            assert response.status_code == 201, response.text
            upload_id = response.json()["id"]
        else:
            response = requests.post(f"{base}/files/", headers={**auth, **TUS, "Upload-Length": str(size)}, timeout=10)
            assert response.status_code == 201, response.text
            upload_id = response.headers["Location"].rstrip("/").rsplit("/", 1)[-1]
        return cls(protocol, token, upload_id, size)

    # --- requests ---
    def url(self, base: str) -> str:
        return f"{base}/api/uploads/{self.id}/" if self.protocol == "rest" else f"{base}/files/{self.id}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}", **(TUS if self.protocol == "tus" else {})}

    def chunk_headers(self, offset: int, length: int) -> dict[str, str]:
        if self.protocol == "rest":
            return {"Content-Type": "application/octet-stream",
                    "Content-Range": f"bytes {offset}-{offset + length - 1}/{self.size}"}
        return {"Content-Type": OCTETS, "Upload-Offset": str(offset)}

    def digest_header(self, data: bytes) -> dict[str, str]:
        digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
        return {"Content-Digest": f"sha-256=:{digest}:"} if self.protocol == "rest" else {"Upload-Checksum": f"sha256 {digest}"}

    def send(self, base: str, offset: int, data: bytes, *, record: bool = True, **extra: str) -> requests.Response:
        """One chunk: REST PUT or tus PATCH."""
        response = requests.request(
            "PUT" if self.protocol == "rest" else "PATCH", self.url(base), data=data, timeout=30,
            headers={**self.headers(), **self.chunk_headers(offset, len(data)), **extra},
        )
        if record:
            self.observe(response)
        return response

    def open_raw(self, base: str, offset: int, length: int | None, **extra: str) -> tuple[socket.socket, int]:
        """The chunk request's head only (Content-Length `length`, or chunked for None); the caller
        sends the body as it likes. Returns the socket and the number of head bytes sent."""
        headers = {**self.headers(), **self.chunk_headers(offset, length or 0), **extra}
        headers.update({"Content-Length": str(length)} if length is not None else {"Transfer-Encoding": "chunked"})
        parts = urlsplit(self.url(base))
        lines = [f"{'PUT' if self.protocol == 'rest' else 'PATCH'} {parts.path} HTTP/1.1", f"Host: {parts.netloc}"]
        head = ("\r\n".join(lines + [f"{k}: {v}" for k, v in headers.items()]) + "\r\n\r\n").encode()
        sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        sock.sendall(head)
        return sock, len(head)

    def offset_in(self, response: requests.Response) -> int | None:
        if self.protocol == "tus":
            value = response.headers.get("Upload-Offset")
            return int(value) if value is not None else None
        try:
            return response.json().get("offset")
        except ValueError:
            return None

    def observe(self, response: requests.Response) -> int | None:
        offset = self.offset_in(response)
        if offset is not None:
            self.seen.append(offset)
            if _ok(response.status_code):
                self.acked = max(self.acked, offset)
        return offset

    def ask_response(self, base: str) -> requests.Response:
        method = requests.get if self.protocol == "rest" else requests.head
        return method(self.url(base), headers=self.headers(), timeout=10)

    def ask(self, base: str) -> int:
        """Where the upload stands (REST GET, tus HEAD), as a client asks before resuming."""
        response = self.ask_response(base)
        assert response.status_code == 200, response.text
        return self.observe(response)

    def finish(self, base: str, source: bytes, chunk: int) -> None:
        """Resume from the server's offset and send the rest, adopting the offset of any 409."""
        offset = self.ask(base)
        for _ in range(2 * len(source) // chunk + 4):
            if offset >= self.size:
                break
            response = self.send(base, offset, source[offset:offset + chunk])
            assert response.status_code in (200, 204, 409), (response.status_code, response.text)
            offset = self.offset_in(response)
        assert offset == self.size
        assert self.ask(base) == self.size

    # --- checks ---
    def row(self) -> UploadSession:
        return UploadSession.objects.get(pk=self.id)

    def check(self, source: bytes, *, reconciled: bool = True) -> UploadSession:
        """assert_invariants (INV1/2/3/5), INV3 against the server's own Redis key, and INV4."""
        cached = _server_cached_offset(self.row())  # the cache before the truth
        row = assert_invariants(self.row(), source, acked=self.acked, reconciled=reconciled)
        assert cached is None or cached <= row.offset, f"the server's Redis says {cached}, ahead of {row.offset}"
        assert self.seen == sorted(self.seen), f"INV4: offsets shown to the client went back: {self.seen}"
        return row

    def check_complete(self, source: bytes) -> UploadSession:
        row = self.check(source)
        assert row.status == Status.COMPLETE and row.sha256 == _sha(source)
        return row


def _warm(server, workers: int) -> None:
    """Until each of the server's workers has answered once: a worker's first request imports the
    URLconf and views, seconds on a busy machine, which must not count against a time limit.
    Needs UPLOADS_TEST_HOOKS (the X-Worker-Pid header)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 30
    while len(seen) < workers:
        assert time.monotonic() < deadline, f"only workers {seen} ever answered"
        for result in _race([lambda: requests.options(f"{server.url}/files/", timeout=10)] * (2 * workers)):
            if isinstance(result, requests.Response):
                seen.add(result.headers["X-Worker-Pid"])


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def _read_reply(sock: socket.socket, timeout: float) -> bytes:
    """Whatever the server answers until it closes (or `timeout`, or a reset)."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received and not received.startswith(b"HTTP/1.1 1"):
                break
    except (ConnectionResetError, TimeoutError):
        pass
    return received


def _status_of(reply: bytes) -> int | None:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None


# --- A2, A3: deterministic crashes at every crash point ---------------------------------------------
#
# The crash point applies to every worker, replacements included, but `<point>@n` counts per
# process: a crashing server runs one worker, the crash is armed for the n-th pass, and the
# replacement worker (its count back at zero) serves the client's resume, which passes each
# point fewer than n times. One server per case, and its replacement worker does double duty:
# it shows that gunicorn respawned the worker and that the upload lock died with the old one.


def _crash(client: Client, server, offset: int, data: bytes) -> int:
    """Send the chunk that kills the worker: no answer at all. Returns the dead worker's pid."""
    before = set(server.workers())
    with pytest.raises(requests.ConnectionError):
        client.send(server.url, offset, data)
    _wait_for(lambda: server.process.poll() is None and set(server.workers()) - before, 15, "a replacement worker")
    (killed,) = before - set(server.workers())
    assert f"Worker (pid:{killed}) was sent SIGKILL" in server.output()
    return killed


CHUNK_POINTS = ["before_write", "mid_body", "after_write", "after_fsync", "after_commit", "after_redis", "before_response"]
# (DB_OFF, FILE_LEN) in MiB right after the second 4 MiB chunk dies there (the first was acked).
AFTER_CRASH = {
    "before_write": (4, 4), "mid_body": (4, 6), "after_write": (4, 8), "after_fsync": (4, 8),
    "after_commit": (8, 8), "after_redis": (8, 8), "before_response": (8, 8),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("point", CHUNK_POINTS)
def test_a2_crash_at_each_chunk_point_then_resume(serve, token, protocol, point):
    """A2: the worker dies at `point` in the second 4 MiB chunk (mid_body: after 2 of its 1 MiB
    blocks). No ack; DB_OFF ≤ FILE_LEN at once, exactly as far as the point implies. The new
    worker answers the client's HEAD/GET (which takes no stale lock) and its resume completes with
    the right SHA-256, the offsets shown never going back (a server ahead of the ack is adopted)."""
    source = os.urandom(8 * MiB + 123)
    # Armed for the second chunk (the first passes mid_body 4 times); the resume, one request of at
    # most 5 blocks, cannot reach it again.
    crashing = serve(**CRASH_ENV, UPLOADS_CRASH_POINT="mid_body@6" if point == "mid_body" else f"{point}@2")
    client = Client.create(protocol, crashing.url, token, len(source))
    first = client.send(crashing.url, 0, source[:4 * MiB])
    assert _ok(first.status_code) and client.acked == 4 * MiB, first.text

    killed = _crash(client, crashing, 4 * MiB, source[4 * MiB:8 * MiB])
    assert killed == int(first.headers["X-Worker-Pid"])
    row = client.check(source, reconciled=False)  # INV1 right after the crash: DB_OFF ≤ FILE_LEN
    assert (row.offset, storage.partial_size(row.pk)) == tuple(n * MiB for n in AFTER_CRASH[point])

    response = client.ask_response(crashing.url)  # tus HEAD takes the upload lock: 423 if it were stale
    assert response.status_code == 200 and int(response.headers["X-Worker-Pid"]) != killed
    assert client.observe(response) == row.offset
    client.finish(crashing.url, source, len(source))
    client.check_complete(source)


FINALIZE_POINTS = ["finalize_before_rename", "finalize_after_rename", "finalize_after_commit"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("point", FINALIZE_POINTS)
def test_a3_crash_while_finalizing_then_retry(serve, token, protocol, point):
    """A3: the worker dies at `point` while the last chunk finishes the upload. Nothing
    half-written is ever at the final path, and `complete` only with the right SHA. The client's
    retry of its last chunk (409, or tus 204, with offset == size) and the GET/HEAD after it
    finish the upload exactly once: one final file, no partial data left behind."""
    source = os.urandom(6 * MiB + 5)
    # Armed for the second finalize on this worker: a one-byte upload passes the first.
    crashing = serve(**CRASH_ENV, UPLOADS_CRASH_POINT=f"{point}@2")
    warm_up = Client.create(protocol, crashing.url, token, 1)
    assert _ok(warm_up.send(crashing.url, 0, b"x").status_code)
    client = Client.create(protocol, crashing.url, token, len(source))
    assert _ok(client.send(crashing.url, 0, source[:4 * MiB]).status_code)
    _crash(client, crashing, 4 * MiB, source[4 * MiB:])

    row = client.row()
    finals = final_files(row)
    assert row.offset == len(source)
    assert len(finals) <= 1 and all(_sha(path.read_bytes()) == _sha(source) for path in finals)
    published = point != "finalize_before_rename"
    assert (len(finals), storage.partial_size(row.pk) is None) == (int(published), published)
    assert (row.status == Status.COMPLETE) == (point == "finalize_after_commit")
    if row.status == Status.COMPLETE:
        assert row.sha256 == _sha(source)

    retry = client.send(crashing.url, 4 * MiB, source[4 * MiB:])  # its ack was lost: send it again
    assert retry.status_code in ((204, 409) if protocol == "tus" else (409,)), retry.text
    assert client.offset_in(retry) == len(source)
    assert client.ask(crashing.url) == len(source)  # GET / HEAD finishes what the crash left
    client.check_complete(source)
    warm_up.check_complete(b"x")
    # Nothing of the upload is left in the partial directory but (on SQLite) its empty lock file,
    # which any later request recreates anyway and which has no effect (RELIABILITY A4).
    partial_dir = storage.partial_dir()
    leftovers = sorted(path.name for path in partial_dir.iterdir()) if partial_dir.exists() else []
    assert [name for name in leftovers if not name.endswith(storage.LOCK_SUFFIX)] == [], leftovers


# --- A4, A5: the whole server killed, or stopped gracefully ----------------------------------------


def test_a4_whole_server_killed_mid_chunk_then_restarted(serve, token):
    """A4: master and workers SIGKILLed while a REST PUT and a tus PATCH stream. On a new server
    the first lock-taking request for each upload (tus HEAD; a REST PUT at a stale offset, refused
    under the lock) answers in < 1 s: no stale lock. Both resumes complete."""
    source = os.urandom(8 * MiB)
    first = serve()
    clients = [Client.create(protocol, first.url, token, len(source)) for protocol in PROTOCOLS]
    socks = [client.open_raw(first.url, 0, len(source))[0] for client in clients]
    try:
        for sock in socks:
            sock.sendall(source[:5 * MiB])
        for client in clients:
            _wait_for(lambda client=client: client.row().offset >= 2 * MiB, 10, "the chunk to commit as it streams")
        for pid in [first.process.pid, *first.workers()]:  # the master first, so it respawns nothing
            os.kill(pid, signal.SIGKILL)
        first.process.wait(timeout=5)
        for sock in socks:
            reply = _read_reply(sock, 5)
            assert not _ok(_status_of(reply) or 0), reply[:200]
    finally:
        for sock in socks:
            sock.close()
    for client in clients:
        client.check(source, reconciled=False)

    second = serve(UPLOADS_TEST_HOOKS="1")
    _warm(second, 2)
    rest, tus = clients
    started = time.monotonic()
    tus.ask(second.url)
    assert time.monotonic() - started < 1, "the first tus HEAD waited: a stale lock?"
    started = time.monotonic()
    stale = rest.send(second.url, 0, source[:KiB])
    assert stale.status_code == 409, stale.text
    assert time.monotonic() - started < 1, "the first REST PUT waited: a stale lock?"
    for client in clients:
        client.finish(second.url, source, 4 * MiB)
        client.check_complete(source)


def test_a5_sigterm_during_a_throttled_chunk(serve, token, fault_proxy):
    """A5: SIGTERM to the master 1 s into a 2 MiB chunk trickling at 1 MiB/s. The graceful stop
    lets the in-flight chunk finish: a 2xx only with the whole body stored (never for a partly
    read one), invariants hold, and a new server takes the resume. (A worker killed when the
    graceful timeout runs out is a SIGKILL mid-body: A1 in test_live.py, A2 mid_body here.)"""
    source = os.urandom(5 * MiB)
    first = serve(UPLOADS_TEST_HOOKS="1")
    _warm(first, 2)
    proxy = fault_proxy(first)
    client = Client.create("tus", first.url, token, len(source))
    proxy.throttle(MiB)
    timer = threading.Timer(1.0, first.process.send_signal, [signal.SIGTERM])
    timer.start()
    try:
        response = client.send(proxy.url, 0, source[:2 * MiB])
    except requests.ConnectionError:
        response = None
    timer.join()
    if response is not None and _ok(response.status_code):
        assert client.offset_in(response) == 2 * MiB, "a 2xx for a partly read body"
    first.process.wait(timeout=35)
    client.check(source, reconciled=False)

    proxy.throttle(None)
    second = serve()
    client.finish(second.url, source, 4 * MiB)
    client.check_complete(source)


# --- E: concurrency on one upload ------------------------------------------------------------------


def test_e3_stale_bytes_of_a_blackholed_patch_are_never_written(shared_server, token, fault_proxy):
    """E3: a PATCH goes silent 2 s into its body (proxy blackhole, connection kept open). HEAD and
    a PATCH on new connections are served at once (the holder is released), and when the proxy
    lets the old connection flow again its bytes (junk, so any write of them shows) land nowhere:
    FILE_LEN == DB_OFF == the new writer's end, and the upload completes with the right SHA."""
    server = shared_server
    source, junk = os.urandom(8 * MiB), os.urandom(8 * MiB)
    proxy = fault_proxy(server)
    client = Client.create("tus", server.url, token, len(source))
    proxy.throttle(MiB)
    old, head_len = client.open_raw(proxy.url, 0, len(source))
    blackholed = threading.Event()

    def feed() -> None:
        try:
            old.sendall(source[:2 * MiB])
            blackholed.wait(15)
            old.sendall(junk[2 * MiB:])  # held by the proxy until it unblocks
        except OSError:
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        _wait_for(lambda: proxy.links and proxy.links[-1].forwarded == head_len + 2 * MiB, 10, "2 MiB forwarded")
        proxy.blackhole()
        blackholed.set()
        committed = client.row().offset
        started = time.monotonic()
        offset = client.ask(server.url)
        assert time.monotonic() - started < 3, "HEAD waited for the silent PATCH"
        assert committed <= offset <= 2 * MiB
        response = client.send(server.url, offset, source[offset:offset + 3 * MiB])
        assert response.status_code == 204, response.text
        new_end = offset + 3 * MiB

        proxy.throttle(None)
        proxy.unblock()  # the old bytes flow now
        reply = _read_reply(old, 10)
        assert not _ok(_status_of(reply) or 0), reply[:300]
        time.sleep(1)  # anything the old request could still write would have landed by now
        row = client.check(source)
        assert row.offset == new_end and storage.partial_size(row.pk) == new_end
    finally:
        old.close()
        feeder.join(5)
    client.finish(server.url, source, 8 * MiB)
    client.check_complete(source)


def _race(requests_: list) -> list:
    """Send the requests at once (behind a barrier), each from its own thread; their results."""
    barrier = threading.Barrier(len(requests_))
    results: list = [None] * len(requests_)

    def run(slot: int) -> None:
        barrier.wait(10)
        try:
            results[slot] = requests_[slot]()
        except requests.RequestException as exc:
            results[slot] = exc

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(len(requests_))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


# Who races in each round, cycling: tus against tus, REST against REST, and one of each.
RIVALS = [("tus", "tus"), ("rest", "rest"), ("rest", "tus")]


@pytest.mark.parametrize("same_bytes", [False, True], ids=["E1-different-bytes", "E2-identical-bytes"])
def test_e1_e2_two_writers_at_the_same_offset(shared_server, token, same_bytes):
    """E1/E2: 21 rounds of two chunks sent at once (threading.Barrier) at the same offset, on two
    gthread workers, by tus PATCH and REST PUT. Each round exactly one 2xx, the other 409/423;
    the file holds the winner's bytes, once. (The upload is one byte longer than the rounds, so
    no round completes it.)"""
    server = shared_server
    chunk, rounds = 64 * KiB, 21
    client = Client.create("tus", server.url, token, rounds * chunk + 1)
    stored = bytearray()
    for round_ in range(rounds):
        offset = round_ * chunk
        bodies = [os.urandom(chunk)]
        bodies.append(bodies[0] if same_bytes else os.urandom(chunk))
        writers = [Client(protocol, token, client.id, client.size) for protocol in RIVALS[round_ % len(RIVALS)]]
        results = _race([
            functools.partial(writer.send, server.url, offset, body, record=False)
            for writer, body in zip(writers, bodies)
        ])
        statuses = [getattr(result, "status_code", result) for result in results]
        winners = [slot for slot in (0, 1) if isinstance(statuses[slot], int) and _ok(statuses[slot])]
        assert len(winners) == 1, f"round {round_} {RIVALS[round_ % len(RIVALS)]}: {statuses}"
        assert statuses[1 - winners[0]] in (409, 423), f"round {round_}: {statuses}"
        stored += bodies[winners[0]]
        on_disk = storage.partial_path(client.id).read_bytes()
        assert on_disk == bytes(stored), f"round {round_}: the file is not the winners' bytes, once each"
        client.seen.append(writers[winners[0]].observe(results[winners[0]]))
        client.acked = len(stored)
    source = bytes(stored) + b"!"
    client.finish(server.url, source, chunk)
    client.check_complete(source)
    # INV7 from the server's write log: every round's winner wrote, and no two writers overlapped.
    assert assert_single_writer(server.write_log) >= rounds


# --- F: protocol ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_f1_lost_ack_then_the_same_chunk_again(shared_server, token, fault_proxy, protocol):
    """F1: the server stores a chunk but its answer never reaches the client (the proxy drops
    it). The client sends the same chunk again: 409 with the current offset, nothing appended
    twice (FILE_LEN unchanged by the retry), and the upload completes with the right SHA."""
    server = shared_server
    source = os.urandom(6 * MiB)
    proxy = fault_proxy(server)
    client = Client.create(protocol, proxy.url, token, len(source))
    assert _ok(client.send(proxy.url, 0, source[:2 * MiB]).status_code)
    proxy.drop_responses(True)
    with pytest.raises(requests.ConnectionError):
        client.send(proxy.url, 2 * MiB, source[2 * MiB:4 * MiB])
    proxy.drop_responses(False)
    assert client.acked == 2 * MiB
    assert client.check(source).offset == 4 * MiB  # stored; only the ack was lost

    retry = client.send(proxy.url, 2 * MiB, source[2 * MiB:4 * MiB])
    assert retry.status_code == 409, retry.text
    assert client.offset_in(retry) == 4 * MiB
    assert storage.partial_size(client.id) == 4 * MiB
    client.check(source)
    client.finish(proxy.url, source, 2 * MiB)
    client.check_complete(source)


def test_f6_a_body_longer_than_the_declared_size(shared_server, token, fault_proxy):
    """F6: 10 KiB declared, 50 KiB sent through a 5 KB/s proxy. With Content-Length the answer
    (tus 413; REST 400/413, its Content-Range cannot even name the bytes) comes before the body
    is read; a chunked tus body is cut at the declared end after about 2 s, not 10 s, with 413.
    FILE_LEN never passes the declared size; the honest upload then completes."""
    server = shared_server
    declared, body = 10 * KiB, os.urandom(50 * KiB)
    source = body[:declared]
    proxy = fault_proxy(server)
    proxy.throttle(5000)
    clients = [Client.create(protocol, server.url, token, declared) for protocol in PROTOCOLS]
    for client in clients:
        sock, _ = client.open_raw(proxy.url, 0, len(body))
        with sock:
            started = time.monotonic()
            sock.sendall(body)
            status = _status_of(_read_reply(sock, 10))
            assert status in ((400, 413) if client.protocol == "rest" else (413,)), status
            assert time.monotonic() - started < 2, "the body was read before the size was checked"
        assert storage.partial_size(client.id) == 0
        client.check(source)

    tus = clients[1]
    sock, _ = tus.open_raw(proxy.url, 0, None)
    with sock:
        started = time.monotonic()
        sock.sendall(b"".join(b"%x\r\n%s\r\n" % (KiB, body[i:i + KiB]) for i in range(0, len(body), KiB)) + b"0\r\n\r\n")
        status = _status_of(_read_reply(sock, 15))
        elapsed = time.monotonic() - started
    assert status == 413, status
    assert elapsed < 6, f"the overlong chunked body was read for {elapsed:.1f} s"
    assert storage.partial_size(tus.id) <= declared
    tus.check(source)
    proxy.throttle(None)
    for client in clients:
        client.finish(proxy.url, source, declared)
        client.check_complete(source)


# --- G3: a bit flipped in transit ----------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_g3_a_byte_flipped_in_transit_is_refused(shared_server, token, fault_proxy, protocol):
    """G3: the proxy inverts one byte of a chunk sent with its digest (tus `Upload-Checksum`,
    REST `Content-Digest`): tus 460, REST 422, nothing of it kept; sent again it is stored."""
    server = shared_server
    source = os.urandom(3 * MiB)
    proxy = fault_proxy(server)
    client = Client.create(protocol, proxy.url, token, len(source))
    first = source[:MiB]
    assert _ok(client.send(proxy.url, 0, first, **client.digest_header(first)).status_code)

    second = source[MiB:2 * MiB]
    proxy.flip(200_000)  # well past the request head (< 1 KiB): a body byte of the next request
    response = client.send(proxy.url, MiB, second, **client.digest_header(second))
    assert response.status_code == (460 if protocol == "tus" else 422), response.text
    assert client.check(source).offset == MiB and storage.partial_size(client.id) == MiB

    response = client.send(proxy.url, MiB, second, **client.digest_header(second))
    assert _ok(response.status_code), response.text
    client.finish(proxy.url, source, MiB)
    client.check_complete(source)


# --- H5: a body trickling at 1 byte/s ------------------------------------------------------------


def test_h5_a_one_byte_per_second_body_is_cut_off(serve, token, fault_proxy):
    """H5 (R.U.D.Y.): after 64 KiB the body trickles at 1 B/s, so no single read ever idles for
    UPLOADS_BODY_TIMEOUT=2. The server must still end the request within the timeout + 5 s on its
    own (no other request asking it to), keeping what it durably had; HEAD then works."""
    server = serve(UPLOADS_BODY_TIMEOUT="2", UPLOADS_TEST_HOOKS="1")
    _warm(server, 2)
    proxy = fault_proxy(server)
    source = os.urandom(2 * MiB)
    client = Client.create("tus", server.url, token, len(source))
    sock, head_len = client.open_raw(proxy.url, 0, len(source))
    with sock:
        sock.sendall(source[:64 * KiB])
        _wait_for(lambda: proxy.links and proxy.links[-1].forwarded == head_len + 64 * KiB, 10, "64 KiB forwarded")
        proxy.throttle(1)
        sock.sendall(source[64 * KiB:72 * KiB])  # the proxy takes it at once and passes 1 B/s on
        started = time.monotonic()
        reply = _read_reply(sock, 2 + 5)
        elapsed = time.monotonic() - started
    assert elapsed < 2 + 5 and not _ok(_status_of(reply) or 0), (
        f"a 1 B/s body still held its worker and the upload after {elapsed:.1f} s: {reply[:200]!r}"
    )
    proxy.stop()
    started = time.monotonic()
    offset = client.ask(server.url)
    assert time.monotonic() - started < 2
    assert offset <= 72 * KiB
    client.check(source)
    client.finish(server.url, source, 2 * MiB)
    client.check_complete(source)


# --- L: cleanup -----------------------------------------------------------------------------------


def _cleanup_command(media_root, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "cleanup_uploads"], cwd=ROOT, env=project_environment(media_root, **env),
        capture_output=True, text=True, timeout=60,
    )


def test_l3_cleanup_killed_halfway_then_run_again(transactional_db, media_root, user):
    """L3: `cleanup_uploads` is SIGKILLed while expiring its third idle upload, after deleting its
    data and before marking its row. That upload already reads as expired; running the command
    again expires the rest, and a third run finds nothing. Live and complete uploads, and their
    bytes, are never touched."""
    def upload_with(data: bytes, name: str) -> UploadSession:
        upload, _ = services.upload_create(owner=user, filename=name, size=len(data) + 10)
        return services.upload_append(upload=upload, offset=0, stream=io.BytesIO(data), length=len(data))

    idle = [upload_with(os.urandom(1000 + n), f"idle-{n}.bin") for n in range(5)]
    UploadSession.objects.filter(pk__in=[u.pk for u in idle]).update(expires_at=timezone.now() - timedelta(hours=1))
    live_source = os.urandom(2010)
    live = upload_with(live_source[:2000], "live.bin")  # 2000 of 2010 bytes, within its window
    done_source = os.urandom(500)
    done, _ = services.upload_create(owner=user, filename="done.bin", size=len(done_source))
    services.upload_append(upload=done, offset=0, stream=io.BytesIO(done_source), length=len(done_source))

    killed = _cleanup_command(media_root, UPLOADS_CRASH_POINT="expire_after_delete@3")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    rows = list(UploadSession.objects.filter(pk__in=[u.pk for u in idle]))
    assert sum(row.status == Status.EXPIRED for row in rows) == 2
    half_done = [row for row in rows if row.status == Status.PARTIAL and storage.partial_size(row.pk) is None]
    assert len(half_done) == 1  # its data gone, its row not yet marked
    assert selectors.upload_effective_status(half_done[0]) == Status.EXPIRED  # clients already get 410

    again = _cleanup_command(media_root)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Expired 3 upload(s)" in again.stdout, again.stdout
    for row in UploadSession.objects.filter(pk__in=[u.pk for u in idle]):
        assert row.status == Status.EXPIRED and storage.partial_size(row.pk) is None
    assert assert_invariants(live, live_source, acked=2000).status == Status.PARTIAL
    assert assert_invariants(done, done_source, acked=len(done_source)).status == Status.COMPLETE

    third = _cleanup_command(media_root)
    assert third.returncode == 0 and "Expired 0 upload(s)" in third.stdout, third.stdout
